"""Fused autograd functions for adapted linear layers.

Autograd sees one node per adapted layer instead of the ~10 small ops (casts, scales,
adds, thin matmuls) of a composed forward. On a GPU the host's per-op dispatch cost
(tens of µs), not the arithmetic, sets the step time of a ViT with adapters on every
linear, so these functions issue as few ops as they can: no no-op casts or reshapes, no
autocast context switches (operands are cast once to the autocast dtype, as autocast
would cast F.linear's), and the factors' gradients leave cuBLAS in the parameters' dtype
where it can write it (no cast op after; elsewhere the autograd engine casts in C++).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.dispatch import (
    OPTIONS,
    compute_dtype,
    fused_low_rank_backward,
    fused_low_rank_forward,
    rank_term_in_weight,
    use_fused_low_rank,
)
from ..kernels.native import native_ops

_HALF = (torch.float16, torch.bfloat16)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _rows(t: Tensor) -> Tensor:
    """The tokens of ``t`` as rows of a matrix (a view; no op for 2-D input)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


@functools.cache
def _mm_has_out_dtype() -> bool:
    """Whether this torch has ``mm(a, b, out_dtype)`` (CUDA: float32 out of half inputs)."""
    return any(
        s.overload_name == "dtype" for s in torch._C._jit_get_schemas_for_operator("aten::mm")
    )


def factor_grad(a: Tensor, b: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """``scale · a b`` for a parameter of ``dtype``: on CUDA, half inputs and a float32
    parameter, cuBLAS writes float32 itself (one op instead of a GEMM and a cast)."""
    # Not while compiling: the compiler picks its own GEMMs, and tracing the cached
    # capability check would break the graph at every adapted layer.
    if (
        not torch.compiler.is_compiling()
        and dtype == torch.float32
        and a.dtype in _HALF
        and a.is_cuda
        and _mm_has_out_dtype()
    ):
        grad = torch.mm(a, b, torch.float32)
    else:
        grad = torch.mm(a, b)
    return grad if scale == 1.0 else grad.mul_(scale)


def outside_autocast(device_type: str, fn: Callable[..., Tensor], *args: Any) -> Any:
    """``fn(*args)`` with autocast off for ``device_type`` (enabled on entry): weight-space
    products that must stay float32. Flipping the flag directly costs the host a fraction
    of ``torch.autocast``'s context manager, which is kept while compiling (dynamo traces
    the context manager, not the flag)."""
    if torch.compiler.is_compiling():
        with torch.autocast(device_type, enabled=False):
            return fn(*args)
    torch.set_autocast_enabled(device_type, False)
    try:
        return fn(*args)
    finally:
        torch.set_autocast_enabled(device_type, True)


_ZEROS: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def scaled_mm(a: Tensor, b: Tensor, scale: float) -> Tensor:
    """scale · a b with the scale in the GEMM's alpha (no multiply op, none in the
    backward either): ``addmm`` of a cached 0-d zero with beta 0."""
    if scale == 1.0:
        return torch.mm(a, b)
    key = (a.device, a.dtype)
    zero = _ZEROS.get(key)
    if zero is None:
        if torch.compiler.is_compiling() or (
            a.is_cuda and torch.cuda.is_current_stream_capturing()
        ):
            return torch.mm(a, b).mul_(scale)  # no tensor cached from inside a graph
        zero = _ZEROS[key] = torch.zeros((), device=a.device, dtype=a.dtype)
    return torch.addmm(zero, a, b, beta=0.0, alpha=scale)


def _wide_sum(weight: Tensor, down: Tensor, up: Tensor, scale: float) -> Tensor:
    """W + scale · up down in the wider of W's and the factors' dtypes (one addmm)."""
    wide = torch.promote_types(weight.dtype, down.dtype)
    return torch.addmm(_as(weight, wide), _as(up, wide), _as(down, wide), alpha=scale)


def _low_rank_forward(ctx, x, weight, bias, down, up, scale: float):  # type: ignore[no-untyped-def]
    """(x Wᵀ + b + scale · (x downᵀ) upᵀ as rows (tokens × out) in the compute dtype, the
    tensors :func:`_low_rank_backward` needs); its options go on ``ctx``."""
    dtype = compute_dtype(x)
    x2 = _as(_rows(x), dtype)
    d, u = _as(down, dtype), _as(up, dtype)
    b = None if bias is None else _as(bias, dtype)
    ctx.fused = use_fused_low_rank(x2, weight, u)
    ctx.in_weight = not ctx.fused and rank_term_in_weight(x2.shape[0], *weight.shape)
    if ctx.fused:  # the rank-r term inside the GEMMs' reduction (mm_spectral.kernels)
        ctx.strategy = OPTIONS.strategy
        y, x2, w, hidden = fused_low_rank_forward(x2, weight, b, d, u, scale)
    elif ctx.in_weight:  # y = x (W + s·up·down)ᵀ + b: one GEMM, no extra pass over y
        # hidden = x downᵀ waits for the backward. A weight stored in the compute dtype
        # (frozen_dtype) takes the rank term in one GEMM epilogue, rounded once; a wider
        # one is summed in the wider precision and cast once, as merging does.
        if weight.dtype == dtype:
            w = torch.addmm(weight, u, d, alpha=scale)
        elif torch.is_autocast_enabled(x2.device.type):  # not autocast's half addmm
            w = _as(outside_autocast(x2.device.type, _wide_sum, weight, down, up, scale), dtype)
        else:
            w = _as(_wide_sum(weight, down, up, scale), dtype)
        hidden = None
        y = F.linear(x2, w, b)
    else:
        w = _as(weight, dtype)
        hidden = F.linear(x2, d)
        y = F.linear(x2, w, b)
        y.addmm_(hidden, u.t(), alpha=scale)
    ctx.scale, ctx.x_shape = scale, x.shape
    ctx.factor_dtypes = (down.dtype, up.dtype)
    return y, (x2, w, d, u, hidden)


def _low_rank_backward(ctx, g, saved, need_x, need_w, need_b, need_d, need_u):  # type: ignore[no-untyped-def]
    """(dx, dW, db, d_down, d_up) of :func:`_low_rank_forward` for output gradient rows
    ``g`` (compute dtype); None where not needed. ``saved``: the tensors it saved."""
    x2, w, d, u, hidden = saved
    scale = ctx.scale
    grad_x = grad_w = grad_b = grad_d = grad_u = None
    if ctx.fused:
        grad_x, grad_b, grad_d, grad_u = fused_low_rank_backward(
            g, x2, w, d, u, hidden, scale, need_x, need_b, need_d, need_u, ctx.strategy
        )
    elif ctx.in_weight:  # w is W + s·up·down: dx in one GEMM
        if need_x:
            grad_x = torch.mm(g, w)
        if need_b:
            grad_b = g.sum(0)
        if need_d:
            grad_d = factor_grad(torch.mm(g, u).t(), x2, scale, ctx.factor_dtypes[0])
        if need_u:
            grad_u = factor_grad(g.t(), F.linear(x2, d), scale, ctx.factor_dtypes[1])
    else:
        g_hidden = torch.mm(g, u) if (need_x or need_d) else None
        if need_x:
            grad_x = torch.mm(g, w).addmm_(g_hidden, d, alpha=scale)
        if need_b:
            grad_b = g.sum(0)
        if need_d:
            grad_d = factor_grad(g_hidden.t(), x2, scale, ctx.factor_dtypes[0])
        if need_u:
            grad_u = factor_grad(g.t(), hidden, scale, ctx.factor_dtypes[1])
    if need_x and len(ctx.x_shape) != 2:
        grad_x = grad_x.view(ctx.x_shape)
    if need_w:
        grad_w = torch.mm(g.t(), x2)
    return grad_x, grad_w, grad_b, grad_d, grad_u


def _shaped(y: Tensor, x: Tensor) -> Tensor:
    """Output rows back to the input's leading shape."""
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


class LowRankLinear(torch.autograd.Function):
    """y = x Wᵀ + b + scale · (x downᵀ) upᵀ, never forming ΔW = scale · up · down."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, scale: float):  # type: ignore[override]
        y, saved = _low_rank_forward(ctx, x, weight, bias, down, up, scale)
        ctx.save_for_backward(*saved)
        return _shaped(y, x)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        saved = ctx.saved_tensors
        need_x, need_w, need_b, need_d, need_u, _ = ctx.needs_input_grad
        g = _as(_rows(grad_out), saved[1].dtype)
        grads = _low_rank_backward(ctx, g, saved, need_x, need_w, need_b, need_d, need_u)
        return (*grads, None)


class RescaledLowRankLinear(torch.autograd.Function):
    """y = c ⊙ (x Wᵀ + scale · (x downᵀ) upᵀ) + b, c = magnitude · inv_norm per output
    channel: DoRA's factored linear in one autograd node.

    ``inv_norm`` is 1 / ‖W0 + ΔW‖_c, taken without gradient as in the DoRA paper §4.3, so
    the magnitude's gradient is inv_norm ⊙ Σ_tokens g ⊙ z (z the unscaled output, kept for
    it) and the low-rank part sees g ⊙ c.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, magnitude, inv_norm, scale: float):  # type: ignore[override]
        z, saved = _low_rank_forward(ctx, x, weight, None, down, up, scale)
        channel = _as(torch.mul(magnitude, inv_norm), z.dtype)
        y = z * channel if bias is None else torch.addcmul(_as(bias, z.dtype), z, channel)
        ctx.save_for_backward(*saved, z, channel, inv_norm)
        return _shaped(y, x)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        *saved, z, channel, inv_norm = ctx.saved_tensors
        need_x, need_w, need_b, need_d, need_u, need_m, _, _ = ctx.needs_input_grad
        g = _as(_rows(grad_out), z.dtype)
        grad_m = grad_b = None
        if need_m:
            grad_m = (g * z).sum(0, dtype=torch.float32).mul_(inv_norm)
        if need_b:
            grad_b = g.sum(0)
        grads = _low_rank_backward(ctx, g * channel, saved, need_x, need_w, False, need_d, need_u)
        grad_x, grad_w, _, grad_d, grad_u = grads
        return grad_x, grad_w, grad_b, grad_d, grad_u, grad_m, None, None


class DeltaLinear(torch.autograd.Function):
    """y = x (W + ΔW)ᵀ + b as one GEMM; ΔW's gradient goes back to its (small) graph."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta):  # type: ignore[override]
        dtype = compute_dtype(x)
        x2 = _as(_rows(x), dtype)
        # W + ΔW added in the higher of the two precisions, then cast once.
        wide = torch.promote_types(weight.dtype, delta.dtype)
        w = _as(_as(weight, wide) + _as(delta, wide), dtype)
        y = F.linear(x2, w, None if bias is None else _as(bias, dtype))
        ctx.save_for_backward(x2, w)
        ctx.x_shape = x.shape
        return _shaped(y, x)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x2, w = ctx.saved_tensors
        need_x, need_w, need_b, need_delta = ctx.needs_input_grad
        g = _as(_rows(grad_out), w.dtype)
        grad_x = grad_w = grad_b = grad_delta = None
        if need_x:
            grad_x = torch.mm(g, w)
            grad_x = grad_x if len(ctx.x_shape) == 2 else grad_x.view(ctx.x_shape)
        if need_w or need_delta:
            grad_full = torch.mm(g.t(), x2)
            grad_w = grad_full if need_w else None
            grad_delta = grad_full if need_delta else None
        if need_b:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, grad_delta


def eager_native(x: Tensor, weight: Tensor, up: Tensor) -> Any:
    """The C++ module (:mod:`mm_spectral.kernels.native`) where this step should use it:
    eager, built, and not a step for the fused kernels; else None."""
    if torch.compiler.is_compiling():
        return None
    native = native_ops()
    if native is None or use_fused_low_rank(x, weight, up):
        return None
    return native


def in_weight_form(x: Tensor, weight: Tensor) -> bool:
    """Whether the low-rank linear of ``x`` and ``weight`` takes the weight form."""
    return rank_term_in_weight(x.numel() // x.shape[-1], *weight.shape)


def low_rank_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, down: Tensor, up: Tensor, scale: float
) -> Tensor:
    """y = x Wᵀ + b + scale · (x downᵀ) upᵀ: eagerly by the C++ node
    (:mod:`mm_spectral.kernels.native`) where it built, else by :class:`LowRankLinear`
    (while compiling, where the fused kernels qualify, or without the C++ node)."""
    native = eager_native(x, weight, up)
    if native is not None:
        return native.low_rank_linear(x, weight, bias, down, up, scale, in_weight_form(x, weight))
    return LowRankLinear.apply(x, weight, bias, down, up, scale)


def rescaled_low_rank_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    down: Tensor,
    up: Tensor,
    scale: float,
    magnitude: Tensor,
    inv_norm: Tensor,
) -> Tensor:
    """DoRA's linear (:class:`RescaledLowRankLinear`), by the C++ node where
    :func:`low_rank_linear` would take it."""
    native = eager_native(x, weight, up)
    if native is not None:
        in_weight = in_weight_form(x, weight)
        return native.rescaled_low_rank_linear(
            x, weight, bias, down, up, scale, magnitude, inv_norm, in_weight
        )
    return RescaledLowRankLinear.apply(x, weight, bias, down, up, magnitude, inv_norm, scale)


def delta_linear(x: Tensor, weight: Tensor, bias: Tensor | None, delta: Tensor) -> Tensor:
    """y = x (W + ΔW)ᵀ + b: eagerly by the C++ node where it built, else
    :class:`DeltaLinear`."""
    if not torch.compiler.is_compiling():
        native = native_ops()
        if native is not None:
            return native.delta_linear(x, weight, bias, delta)
    return DeltaLinear.apply(x, weight, bias, delta)
