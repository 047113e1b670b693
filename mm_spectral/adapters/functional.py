"""Fused autograd functions for adapted linear layers.

Autograd sees one node per adapted layer instead of the ~10 small ops (casts, scales,
adds, thin matmuls) of a composed forward. On a GPU the host's per-op dispatch cost
(tens of µs), not the arithmetic, sets the step time of a ViT with adapters on every
linear, so these functions issue as few ops as they can: no no-op casts or reshapes, no
autocast context switches (operands are cast once to the autocast dtype, as autocast
would cast F.linear's), and gradients are returned in the compute dtype (the autograd
engine casts them to each input's dtype in C++).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.dispatch import (
    OPTIONS,
    fused_low_rank_backward,
    fused_low_rank_forward,
    use_fused_low_rank,
)


def _compute_dtype(x: Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _rows(t: Tensor) -> Tensor:
    """The tokens of ``t`` as rows of a matrix (a view; no op for 2-D input)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


class LowRankLinear(torch.autograd.Function):
    """y = x Wᵀ + b + scale · (x downᵀ) upᵀ, never forming ΔW = scale · up · down."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, scale: float):  # type: ignore[override]
        dtype = _compute_dtype(x)
        x2 = _as(_rows(x), dtype)
        d, u = _as(down, dtype), _as(up, dtype)
        b = None if bias is None else _as(bias, dtype)
        ctx.fused = use_fused_low_rank(x2, weight, u)
        if ctx.fused:  # the rank-r term inside the GEMMs' reduction (mm_spectral.kernels)
            ctx.strategy = OPTIONS.strategy
            y, x2, w, hidden = fused_low_rank_forward(x2, weight, b, d, u, scale)
        else:
            w = _as(weight, dtype)
            hidden = F.linear(x2, d)
            y = F.linear(x2, w, b)
            y.addmm_(hidden, u.t(), alpha=scale)
        ctx.save_for_backward(x2, w, d, u, hidden)
        ctx.scale, ctx.x_shape = scale, x.shape
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x2, w, d, u, hidden = ctx.saved_tensors
        need_x, need_w, need_b, need_d, need_u, _ = ctx.needs_input_grad
        scale = ctx.scale
        g = _as(_rows(grad_out), w.dtype)
        grad_x = grad_w = grad_b = grad_d = grad_u = None
        if ctx.fused:
            grad_x, grad_b, grad_d, grad_u = fused_low_rank_backward(
                g, x2, w, d, u, hidden, scale, need_x, need_b, need_d, need_u, ctx.strategy
            )
            if need_x and len(ctx.x_shape) != 2:
                grad_x = grad_x.view(ctx.x_shape)
            if need_w:
                grad_w = torch.mm(g.t(), x2)
            return grad_x, grad_w, grad_b, grad_d, grad_u, None
        g_hidden = torch.mm(g, u) if (need_x or need_d) else None
        if need_x:
            grad_x = torch.mm(g, w).addmm_(g_hidden, d, alpha=scale)
            grad_x = grad_x if len(ctx.x_shape) == 2 else grad_x.view(ctx.x_shape)
        if need_w:
            grad_w = torch.mm(g.t(), x2)
        if need_b:
            grad_b = g.sum(0)
        if need_d:
            grad_d = torch.mm(g_hidden.t(), x2)
            grad_d = grad_d if scale == 1.0 else grad_d.mul_(scale)
        if need_u:
            grad_u = torch.mm(g.t(), hidden)
            grad_u = grad_u if scale == 1.0 else grad_u.mul_(scale)
        return grad_x, grad_w, grad_b, grad_d, grad_u, None


class DeltaLinear(torch.autograd.Function):
    """y = x (W + ΔW)ᵀ + b as one GEMM; ΔW's gradient goes back to its (small) graph."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta):  # type: ignore[override]
        dtype = _compute_dtype(x)
        x2 = _as(_rows(x), dtype)
        # W + ΔW added in the higher of the two precisions, then cast once.
        wide = torch.promote_types(weight.dtype, delta.dtype)
        w = _as(_as(weight, wide) + _as(delta, wide), dtype)
        y = F.linear(x2, w, None if bias is None else _as(bias, dtype))
        ctx.save_for_backward(x2, w)
        ctx.x_shape = x.shape
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])

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


def low_rank_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, down: Tensor, up: Tensor, scale: float
) -> Tensor:
    return LowRankLinear.apply(x, weight, bias, down, up, scale)


def delta_linear(x: Tensor, weight: Tensor, bias: Tensor | None, delta: Tensor) -> Tensor:
    return DeltaLinear.apply(x, weight, bias, delta)
