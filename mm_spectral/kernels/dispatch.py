"""When the fused low-rank kernels run instead of the plain-torch path, and with which options.

The fused kernels qualify for half-precision GEMMs on a GPU with shapes a tensor core
tiles well; everything else (CPU, float32, odd widths, large ranks) keeps the torch path,
whose results they reproduce. They save GPU time but issue more host work per layer than
the torch path (more ops, Triton launches), so they pay off where the host's cost is gone:
in CUDA graphs. Measured on an H100 (tools/benchmark_kernels.py, ViT-L fc1/fc2, bf16),
one adapted linear's step took 0.194 / 0.186 ms replayed as a graph against 0.213 / 0.216
ms for the torch path, but 2.15 / 1.83 ms eagerly against 1.35 / 0.97 ms.

``MM_SPECTRAL_FUSED_LOW_RANK`` (or :func:`set_fused_low_rank_mode`) picks:

- ``auto`` (default): where they qualify and the work runs off the default CUDA stream —
  as CUDA-graph warm-up and capture do (``torch.cuda.make_graphed_callables``, used by
  ``mm_spectral.cuda_graph``; the warm-up also compiles and tunes the kernels before the
  capture) — and the torch path for ordinary eager steps on the default stream;
- ``on``: wherever they qualify, eager steps included;
- ``off``: never;
- ``force``: whenever Triton can run at all, any device or dtype (the tests run the
  kernels in Triton's CPU interpreter in float32 this way).

Never while ``torch.compile`` traces (``mm_spectral.compile``): the compiler generates its
own fused kernels from the torch path.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from .mode_switch import ModeSwitch


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


MODES = ("auto", "on", "off", "force")
_HALF = (torch.float16, torch.bfloat16)
MAX_RANK = 64  # the rank tile is padded to a power of two ≥ 16; larger ranks spill registers


@dataclass
class FusedOptions:
    """Variants of the fused kernels (all exact; which is faster depends on the GPU).

    strategy: "cublas" — cuBLAS GEMMs over concatenated operands plus Triton passes
        (``low_rank_cublas``); "triton" — Triton GEMMs with the rank term in their
        epilogue/reduction (``low_rank_forward``/``low_rank_backward``).
    fuse_down: (strategy "triton") the forward accumulates h = x downᵀ inside its GEMM
        (R/BLOCK_N more tensor-core work) instead of one thin cuBLAS GEMM reading x again.
    fourier_grad: how FourierFT's coefficient gradient is computed on linear layers.
    rank_term: how the plain-torch path (not the fused kernels) takes a low-rank linear's
        rank-r term: "output" — y = x Wᵀ + s·(x downᵀ) upᵀ; "weight" — y = x (W + s·up·down)ᵀ,
        the factors' gradients from thin products with x and g; "dense" — the weight form,
        the factors' gradients from one dense dW = gᵀx (:func:`rank_term_form`); "auto" —
        by the layer's sizes (environment: ``MM_SPECTRAL_RANK_TERM``).
    Options are read when an op is issued (so a CUDA graph keeps those of its capture).
    """

    strategy: str = "cublas"
    fuse_down: bool = False
    # FourierFT on linear layers: "dense" (backpropagate through ΔW: a gᵀx GEMM) or
    # "sampled" (adapters.fourier_linear: the coefficients' gradient from row spectra).
    fourier_grad: str = "dense"
    rank_term: str = os.environ.get("MM_SPECTRAL_RANK_TERM", "auto")
    # Low-rank linears in a batched build (enable_batched_spectra) that step in the dense
    # form with few tokens: "on" — their whole ΔW from one batched product per chunk, each
    # layer then W0 + ΔW (see batched_delta_linear); "off" — each builds its own.
    batched_linears: str = os.environ.get("MM_SPECTRAL_BATCHED_LINEARS", "on")


OPTIONS = FusedOptions()
RANK_TERMS = ("auto", "weight", "output", "dense")
FORMS = ("output", "weight", "dense")  # index = the code the C++ nodes take
if OPTIONS.rank_term not in RANK_TERMS:
    raise ValueError(
        f"MM_SPECTRAL_RANK_TERM must be one of {RANK_TERMS}, got {OPTIONS.rank_term!r}"
    )
BATCHED_LINEARS = ("on", "off")
if OPTIONS.batched_linears not in BATCHED_LINEARS:
    raise ValueError(
        f"MM_SPECTRAL_BATCHED_LINEARS must be one of {BATCHED_LINEARS}, "
        f"got {OPTIONS.batched_linears!r}"
    )


# "auto": the dense form where tokens · (in + out) exceeds this multiple of in · out, or
# the rank is at most DENSE_MAX_RANK; else the output form (see rank_term_form).
WEIGHT_FORM_RATIO = 10
DENSE_MAX_RANK = 32


def rank_term_form(tokens: int, out_features: int, in_features: int, rank: int) -> str:
    """How a low-rank linear steps: "output", "weight" or "dense" (``OPTIONS.rank_term``).

    - output: y = x Wᵀ + s·(x downᵀ) upᵀ. Beyond the frozen layer, the rank term re-reads
      and rewrites y, and the input gradient is re-read and rewritten too.
    - weight: y = x (W + s·up·down)ᵀ, summed in float32 and cast, a few passes over
      in·out elements; the factors' gradients still come from thin GEMMs over the tokens
      ((g up)ᵀ x and gᵀ (x downᵀ)).
    - dense: the weight form whose factors' gradients come from one dense dW = gᵀx (float32
      out of cuBLAS) and two r-wide float32 products with it, as full fine-tuning's dW GEMM
      plus two small ones: four ops beyond the frozen layer's instead of about ten, for
      the host-bound eager step, and no pass over the tokens for DoRA's rescale.

    "auto" picks dense, but the output form where the layer has few tokens for its size
    (tokens · (in + out) ≤ ``WEIGHT_FORM_RATIO`` · in · out) and the rank is above
    ``DENSE_MAX_RANK`` (its float32 products then cost more than the ops they save).
    Measured on an H100, eager, interleaved, ms per step (auto before → dense):
    ViT-L 4 × 512² (ratios 4–8) LoRA r16 62.7 → 60.5, DoRA 100.5 → 76.3, FLoRA 77.6 → 68.6,
    but FoRA r64 70.1 → 73.2; ConvNeXt-V2-L 2 × 1024² (ratios mostly 13 and more, then in
    the weight form) LoRA 120.4 → 120.3, DoRA 154.2 → 134.3, FLoRA 145.6 → 133.5, FoRA r64
    143.1 → 138.5."""
    term = OPTIONS.rank_term
    if term != "auto":
        if term not in FORMS:
            raise ValueError(f"OPTIONS.rank_term must be one of {RANK_TERMS}, got {term!r}")
        return term
    if rank <= DENSE_MAX_RANK:
        return "dense"
    if tokens * (in_features + out_features) > WEIGHT_FORM_RATIO * in_features * out_features:
        return "dense"
    return "output"


def batched_delta_linear(
    tokens: int | None, out_features: int, in_features: int, rank: int
) -> bool:
    """Whether a low-rank linear takes its whole ΔW = s·up·down from a batched build
    (:func:`mm_spectral.enable_batched_spectra`, ``OPTIONS.batched_linears``) and steps as
    y = x (W0 + ΔW)ᵀ + b: the dense form (:func:`rank_term_form`) with its per-layer
    products batched. Beyond the frozen layer's ops each layer then issues one, dW = gᵀx;
    up·down forward and the two r-wide products with dW backward run once per chunk of
    same-shape layers, which saves the host three ops per layer and step.

    Only where the layer steps in the dense form and has few tokens for its size
    (tokens · (in + out) ≤ ``WEIGHT_FORM_RATIO`` · in · out): there the step is host-bound.
    ``tokens`` is what the layer saw in its previous forward (the plan is made before the
    forward), None before its first.

    Measured on H100 hosts, eager, interleaved, ViT-L 4 × 512² (ratios 5–8), ms, per layer
    → batched: LoRA r16 58.5 → 47.6 and 65.1 → 54.6, DoRA r16 75.5 → 63.6 and 78.7 → 65.8,
    FLoRA r16 66.3 → 56.1 and 64.8 → 59.0 (two invocations, the variants' order reversed).
    ConvNeXt-V2-L's Mask R-CNN step, 2 × 1024², where the GPU sets the pace, with every
    linear batched (most at ratios 13 and more; before the ratio rule): LoRA 223.1 → 232.8,
    FLoRA 238.3 → 243.8, DoRA 243.2 → 247.1."""
    if OPTIONS.batched_linears != "on" or tokens is None:
        return False
    if rank_term_form(tokens, out_features, in_features, rank) != "dense":
        return False
    return tokens * (in_features + out_features) <= WEIGHT_FORM_RATIO * in_features * out_features


def rank_term_code(tokens: int, out_features: int, in_features: int, rank: int) -> int:
    """:func:`rank_term_form` as the C++ nodes' code (its index in ``FORMS``)."""
    return FORMS.index(rank_term_form(tokens, out_features, in_features, rank))


_FUSED = ModeSwitch("MM_SPECTRAL_FUSED_LOW_RANK", MODES, "fused low-rank mode")


def fused_low_rank_mode() -> str:
    """The current mode: 'auto', 'on', 'off' or 'force'."""
    return _FUSED.get()


def set_fused_low_rank_mode(mode: str) -> str:
    """Set the mode (see the module docstring); returns the previous one."""
    return _FUSED.set(mode)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype ``x``'s op computes in: autocast's on x's device where it is on, else x's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def use_fused_low_rank(x2: Tensor, weight: Tensor, up: Tensor) -> bool:
    """Whether ``y = x2 Wᵀ + b + s (x2 downᵀ) upᵀ`` should run through the Triton kernels.

    ``x2``'s last dimension holds the in-features; the compute dtype is autocast's where it
    is on (x2 may not be cast to it yet), else x2's. Asked per adapted layer and step, so
    the answer for eager default-stream work (no) comes first.
    """
    mode = _FUSED.value
    if mode == "off" or torch.compiler.is_compiling():  # the compiler makes its own kernels
        return False
    if mode == "force":
        return triton_available()
    if not x2.is_cuda or (mode == "auto" and not off_default_stream(x2.device)):
        return False
    out_features, in_features = weight.shape
    return (
        compute_dtype(x2) in _HALF
        and up.shape[1] <= MAX_RANK
        # 16-byte aligned rows for vector loads; narrower layers gain nothing anyway.
        and out_features % 8 == 0
        and in_features % 8 == 0
        and out_features >= 64
        and in_features >= 64
        and x2.numel() > 0
        and triton_available()
    )


def off_default_stream(device: torch.device) -> bool:
    """Whether work on ``device`` (CUDA) is being issued to a side stream or captured in a
    graph. Asked per adapted layer and step, so it compares the streams' (id, device,
    type) triples without building ``torch.cuda.Stream`` objects."""
    if torch.cuda.is_current_stream_capturing():
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch._C._cuda_getCurrentStream(index) != torch._C._cuda_getDefaultStream(index)


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
        grad_out, x2, weight, down, up, hidden, scale, need_x, need_bias, need_down, need_up
    )
