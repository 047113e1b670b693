"""When the fused low-rank kernels run instead of the plain-torch path, and with which options.

The fused kernels pay off for half-precision GEMMs on a GPU with shapes a tensor core
tiles well; everything else (CPU, float32, odd widths, large ranks) keeps the torch path,
whose results they reproduce. ``MM_SPECTRAL_FUSED_LOW_RANK`` (or
:func:`set_fused_low_rank_mode`) picks: ``auto`` (default) — use them when they qualify;
``off`` — never; ``force`` — whenever Triton can run at all, any device or dtype (used by
the tests, which run the kernels in Triton's CPU interpreter in float32; on a GPU a
float32 dot is TF32).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import torch
from torch import Tensor


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports (checked once, on first need: importing it takes a while)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install (e.g. no driver libraries) counts as absent
        return False
    return True


MODES = ("auto", "off", "force")
_HALF = (torch.float16, torch.bfloat16)
MAX_RANK = 64  # the rank tile is padded to a power of two ≥ 16; larger ranks spill registers


@dataclass
class FusedOptions:
    """Variants of the fused kernels (all exact; which is faster depends on the GPU).

    strategy: "cublas" — cuBLAS GEMMs over concatenated operands plus Triton passes
        (``low_rank_cublas``); "triton" — Triton GEMMs with the rank term in their
        epilogue/reduction (``low_rank_forward``/``low_rank_backward``), which the two
        options below tune.
    fuse_down: the forward accumulates h = x downᵀ inside its GEMM (R/BLOCK_N more
        tensor-core work) instead of one thin cuBLAS GEMM that reads x once more.
    fuse_gh: the backward takes g·up, d_up and d_bias from the dx GEMM's own g tiles
        (one kernel) instead of a separate memory-bound pass over g (two kernels).
    fourier_grad: how FourierFT's coefficient gradient is computed on linear layers.
    Options are read when an op is issued (so a CUDA graph keeps those of its capture).
    """

    strategy: str = "cublas"
    fuse_down: bool = False
    fuse_gh: bool = False
    # FourierFT on linear layers: "dense" (backpropagate through ΔW: a gᵀx GEMM) or
    # "sampled" (kernels.fourier_linear: the coefficients' gradient from row spectra).
    fourier_grad: str = "dense"


OPTIONS = FusedOptions()

_mode = os.environ.get("MM_SPECTRAL_FUSED_LOW_RANK", "auto")
if _mode not in MODES:
    raise ValueError(f"MM_SPECTRAL_FUSED_LOW_RANK must be one of {MODES}, got {_mode!r}")


def fused_low_rank_mode() -> str:
    """The current mode: 'auto', 'off' or 'force'."""
    return _mode


def set_fused_low_rank_mode(mode: str) -> str:
    """Set the mode (see the module docstring); returns the previous one."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"fused low-rank mode must be one of {MODES}, got {mode!r}")
    previous, _mode = _mode, mode
    return previous


def use_fused_low_rank(x2: Tensor, weight: Tensor, up: Tensor) -> bool:
    """Whether ``y = x2 Wᵀ + b + s (x2 downᵀ) upᵀ`` should run through the Triton kernels.

    All operands are already in the compute dtype; ``x2`` is 2-D (tokens × in-features).
    """
    if _mode == "off":
        return False
    if _mode == "force":
        return triton_available()
    out_features, in_features = weight.shape
    return (
        x2.is_cuda
        and x2.dtype in _HALF
        and up.shape[1] <= MAX_RANK
        # 16-byte aligned rows for vector loads; narrower layers gain nothing anyway.
        and out_features % 8 == 0
        and in_features % 8 == 0
        and out_features >= 64
        and in_features >= 64
        and x2.shape[0] > 0
        and triton_available()
    )


def fused_low_rank_forward(
    x2: Tensor, weight: Tensor, bias: Tensor | None, down: Tensor, up: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, x, w, h) by the fused kernels: the output and what the backward needs.

    ``weight`` may be in any float dtype (its cast to x2's is made here); the others are
    in x2's dtype. See ``low_rank_cublas.cublas_forward`` for the returned tensors.
    """
    if OPTIONS.strategy == "cublas":
        from .low_rank_cublas import cublas_forward

        return cublas_forward(x2, weight, bias, down, up, scale)
    from .low_rank_forward import low_rank_forward

    w = weight if weight.dtype == x2.dtype else weight.to(x2.dtype)
    y, h = low_rank_forward(x2, w, bias, down, up, scale, fuse_down=OPTIONS.fuse_down)
    return y, x2, w, h


def fused_low_rank_backward(
    grad_out: Tensor,
    x2: Tensor,
    weight: Tensor,
    down: Tensor,
    up: Tensor,
    hidden: Tensor,
    scale: float,
    need_x: bool,
    need_bias: bool,
    need_down: bool,
    need_up: bool,
    strategy: str,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(dx, d_bias, d_down, d_up) by the fused kernels of ``strategy`` (the forward's)."""
    if strategy == "cublas":
        from .low_rank_cublas import cublas_backward

        return cublas_backward(
            grad_out, x2, weight, down, up, hidden, scale, need_x, need_bias, need_down, need_up
        )
    from .low_rank_backward import low_rank_backward

    return low_rank_backward(
        grad_out, x2, weight, down, up, hidden, scale,
        need_x, need_bias, need_down, need_up, fuse_gh=OPTIONS.fuse_gh,
    )  # fmt: skip
