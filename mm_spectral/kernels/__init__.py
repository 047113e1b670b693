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
from .native import (
    native_builds_mode,
    native_mode,
    native_status,
    set_native_builds_mode,
    set_native_mode,
)

__all__ = [
    "triton_available",
    "OPTIONS",
    "FusedOptions",
    "fused_low_rank_mode",
    "set_fused_low_rank_mode",
    "use_fused_low_rank",
    "native_mode",
    "native_status",
    "set_native_mode",
    "native_builds_mode",
    "set_native_builds_mode",
]
