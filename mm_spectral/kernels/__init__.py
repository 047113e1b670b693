"""GPU kernels for the adapters' training step (Triton; optional).

Nothing here is needed for correctness: every adapter has a plain-torch path, and the
package imports with Triton absent. The Triton modules (``low_rank_forward``,
``low_rank_backward``, ``low_rank_passes``, ``low_rank_cublas``, ``spectral_grad_kernel``)
import Triton at module level and are imported lazily, only where
:func:`triton_available` says they can be; ``dispatch`` decides when they run.
Measurements: ``tools/benchmark_kernels.py``.
"""

from .dispatch import (
    OPTIONS,
    FusedOptions,
    fused_low_rank_mode,
    set_fused_low_rank_mode,
    triton_available,
    use_fused_low_rank,
)

__all__ = [
    "triton_available",
    "OPTIONS",
    "FusedOptions",
    "fused_low_rank_mode",
    "set_fused_low_rank_mode",
    "use_fused_low_rank",
]

_LAZY = {
    "batched_fora_factors": "batched_spectra",
    "batched_fourierft_deltas": "batched_spectra",
    "batched_sparse_spectrum_to_real": "batched_spectra",
    "build_batched_spectra": "batched_spectra",
    "enable_batched_spectra": "batched_spectra",
    "sampled_spectrum_grad": "spectral_grad",
}


def __getattr__(name: str):
    """Helpers that import the adapters, loaded on first use (the adapters import this
    package, so importing them here eagerly would be circular)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
