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
from torch import Tensor, nn

from ..kernels.dispatch import (
    OPTIONS,
    compute_dtype,
    fused_low_rank_backward,
    fused_low_rank_forward,
    fused_low_rank_mode,
    rank_term_code,
    rank_term_form,
    use_fused_low_rank,
)
from ..kernels.native import native_ops
from .bias_cast import compute_bias

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


def _zero(a: Tensor) -> Tensor | None:
    """A cached 0-d zero on ``a``'s device and dtype (None where none may be made now:
    while compiling or capturing a CUDA graph, no tensor is cached from inside a graph)."""
    key = (a.device, a.dtype)
    zero = _ZEROS.get(key)
    if zero is None:
        if torch.compiler.is_compiling() or (
            a.is_cuda and torch.cuda.is_current_stream_capturing()
        ):
            return None
        zero = _ZEROS[key] = torch.zeros((), device=a.device, dtype=a.dtype)
    return zero


def scaled_mm(a: Tensor, b: Tensor, scale: float) -> Tensor:
    """scale · a b (per batch entry for 3-D operands) with the scale in the GEMM's alpha
    (no multiply op, no pass over the product, none in the backward either): ``addmm`` /
    ``baddbmm`` of a cached 0-d zero with beta 0."""
    batched = a.dim() == 3
    if scale == 1.0:
        return torch.bmm(a, b) if batched else torch.mm(a, b)
    zero = _zero(a)
    if zero is None:
        return (torch.bmm(a, b) if batched else torch.mm(a, b)).mul_(scale)
    scaled = torch.baddbmm if batched else torch.addmm
    return scaled(zero, a, b, beta=0.0, alpha=scale)


def add_as(a: Tensor, b: Tensor, alpha: float, dtype: torch.dtype) -> Tensor:
    """a + alpha · b computed in the wider of their dtypes and stored as ``dtype``: one
    kernel where a sum and a cast would be two (the C++ nodes' ``add_as``)."""
    if _no_out(a, b):
        return _as(torch.add(a, b, alpha=alpha), dtype)
    return torch.add(a, b, alpha=alpha, out=torch.empty_like(a, dtype=dtype))


def mul_as(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """a ⊙ b (broadcast to a's shape) computed in the wider of their dtypes and stored as
    ``dtype``: the product and its cast in one kernel (the C++ nodes' ``mul_as``)."""
    if _no_out(a, b):
        return _as(torch.mul(a, b), dtype)
    return torch.mul(a, b, out=torch.empty_like(a, dtype=dtype))


def _no_out(a: Tensor, b: Tensor) -> bool:
    """Whether an op on ``a`` and ``b`` must not write into an ``out=`` tensor: while
    compiling (the compiler fuses the cast itself) or where autograd records it (a
    backward run with ``create_graph``)."""
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)


def _wide_sum(
    weight: Tensor, down: Tensor, up: Tensor, scale: float, dtype: torch.dtype | None = None
) -> Tensor:
    """W + scale · up down in the wider of W's and the factors' dtypes, stored as ``dtype``
    (default: that wider one): up down in one GEMM, then the sum and its cast in one pass
    (an addmm into W would first copy W, a memcpy per step, and still need the cast)."""
    wide = torch.promote_types(weight.dtype, down.dtype)
    return add_as(weight, torch.mm(_as(up, wide), _as(down, wide)), scale, dtype or wide)


def _weight_space(device_type: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with autocast off for ``device_type``: weight-space products in the
    parameters' precision, not autocast's half one."""
    if torch.is_autocast_enabled(device_type):
        return outside_autocast(device_type, fn, *args)
    return fn(*args)


def _summed_weight(
    weight: Tensor, down: Tensor, up: Tensor, scale: float, dtype: torch.dtype
) -> Tensor:
    """W + scale · up down in the compute dtype ``dtype``. A weight stored in it
    (frozen_dtype) takes the rank term in one GEMM epilogue, rounded once; a wider one is
    summed in the wider precision and cast once, as merging does."""
    if weight.dtype == dtype:
        return torch.addmm(weight, _as(up, dtype), _as(down, dtype), alpha=scale)
    return _weight_space(weight.device.type, _wide_sum, weight, down, up, scale, dtype)


def _dense_weight_grad(g: Tensor, x2: Tensor, factor_dtype: torch.dtype) -> Tensor:
    """dW = gᵀ x2, float32 out of cuBLAS for float32 factors on CUDA; at least as wide as
    the factors (the r-wide products with it run in their precision)."""
    full = factor_grad(g.t(), x2, 1.0, factor_dtype)
    return _as(full, torch.promote_types(full.dtype, factor_dtype))


def _low_rank_forward(ctx, x, weight, bias, down, up, scale: float):  # type: ignore[no-untyped-def]
    """(x Wᵀ + b + scale · (x downᵀ) upᵀ as rows (tokens × out) in the compute dtype, the
    tensors :func:`_low_rank_backward` needs); its options go on ``ctx``."""
    dtype = compute_dtype(x)
    x2 = _as(_rows(x), dtype)
    b = None if bias is None else _as(bias, dtype)
    ctx.fused = use_fused_low_rank(x2, weight, up)
    ctx.form = None if ctx.fused else rank_term_form(x2.shape[0], *weight.shape, up.shape[1])
    hidden = None
    if ctx.form == "dense":  # the backward's products with dW run in the factors' dtype
        d, u = down, up
    else:
        d, u = _as(down, dtype), _as(up, dtype)
    if ctx.fused:  # the rank-r term inside the GEMMs' reduction (mm_spectral.kernels)
        ctx.strategy = OPTIONS.strategy
        y, x2, w, hidden = fused_low_rank_forward(x2, weight, b, d, u, scale)
    elif ctx.form == "output":
        w = _as(weight, dtype)
        hidden = F.linear(x2, d)
        y = F.linear(x2, w, b)
        y.addmm_(hidden, u.t(), alpha=scale)
    else:  # y = x (W + s·up·down)ᵀ + b: one GEMM, no extra pass over y
        narrow = weight.dtype == dtype  # the weight form's cast factors serve the sum too
        w = _summed_weight(weight, d if narrow else down, u if narrow else up, scale, dtype)
        y = F.linear(x2, w, b)
    ctx.scale, ctx.x_shape = scale, x.shape
    ctx.factor_dtypes = (down.dtype, up.dtype)
    return y, (x2, w, d, u, hidden)


def _low_rank_backward(ctx, g, saved, need_x, need_w, need_b, need_d, need_u):  # type: ignore[no-untyped-def]
    """(dx, dW, db, d_down, d_up) of :func:`_low_rank_forward` for output gradient rows
    ``g`` (compute dtype); None where not needed. ``saved``: the tensors it saved."""
    x2, w, d, u, hidden = saved
    scale = ctx.scale
    grad_x = grad_w = grad_b = grad_d = grad_u = None
    if need_b and not ctx.fused:
        grad_b = g.sum(0)
    if ctx.fused:
        grad_x, grad_b, grad_d, grad_u = fused_low_rank_backward(
            g, x2, w, d, u, hidden, scale, need_x, need_b, need_d, need_u, ctx.strategy
        )
    elif ctx.form == "dense":  # dx in one GEMM; the factors' gradients from dW = gᵀx
        if need_x:
            grad_x = torch.mm(g, w)
        if need_d or need_u or need_w:
            full = _dense_weight_grad(g, x2, ctx.factor_dtypes[0])
            if need_d:
                grad_d = scaled_mm(_as(u, full.dtype).t(), full, scale)
            if need_u:
                grad_u = scaled_mm(full, _as(d, full.dtype).t(), scale)
            if need_w:
                grad_w = full
    elif ctx.form == "weight":  # w is W + s·up·down: dx in one GEMM
        if need_x:
            grad_x = torch.mm(g, w)
        if need_d:
            grad_d = factor_grad(torch.mm(g, u).t(), x2, scale, ctx.factor_dtypes[0])
        if need_u:
            grad_u = factor_grad(g.t(), F.linear(x2, d), scale, ctx.factor_dtypes[1])
    else:
        g_hidden = torch.mm(g, u) if (need_x or need_d) else None
        if need_x:
            grad_x = torch.mm(g, w).addmm_(g_hidden, d, alpha=scale)
        if need_d:
            grad_d = factor_grad(g_hidden.t(), x2, scale, ctx.factor_dtypes[0])
        if need_u:
            grad_u = factor_grad(g.t(), hidden, scale, ctx.factor_dtypes[1])
    if need_x and len(ctx.x_shape) != 2:
        grad_x = grad_x.view(ctx.x_shape)
    if need_w and grad_w is None:
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


def _rescaled_direction(weight, down, up, magnitude, scale: float):  # type: ignore[no-untyped-def]
    """(W0 + s·up·down, its clamped row norms, m / norms), in the wider of W0's and the
    parameters' dtypes."""
    wide = torch.promote_types(torch.promote_types(weight.dtype, down.dtype), magnitude.dtype)
    direction = _wide_sum(weight, _as(down, wide), up, scale, wide)
    norm = torch.linalg.vector_norm(direction, dim=1).clamp_min_(torch.finfo(wide).tiny)
    return direction, norm, torch.div(_as(magnitude, wide), norm)


def _rescaled_weight_grads(full, weight, down, up, norm, channel, scale: float, needs):  # type: ignore[no-untyped-def]
    """(dW, d_down, d_up, d_m) of :class:`RescaledWeightLinear` from dW'' = gᵀx (``full``)
    and p = dW'' downᵀ, without the summed weight again: Σ_in dW'' ⊙ (W0 + s·up·down) =
    Σ_in dW'' ⊙ W0 + s · Σ_r up ⊙ p; the factors see dW' = c ⊙ dW'', so d_up = s · c ⊙ p and
    d_down = s · (c ⊙ up)ᵀ dW''. The C++ node's ops, in its order."""
    need_w, need_d, need_u, need_m = needs
    grad_w = grad_d = grad_u = grad_m = None
    d, u = _as(down, full.dtype), _as(up, full.dtype)
    c = channel.unsqueeze(1)
    p = torch.mm(full, d.t()) if (need_m or need_u) else None
    if need_m:
        rows = full.shape[0]
        grad_m = _as((full * weight).sum(1), full.dtype)  # in place below: no copy of it
        grad_m.view(rows, 1, 1).baddbmm_(u.view(rows, 1, -1), p.view(rows, -1, 1), alpha=scale)
        grad_m.div_(norm)
    if need_u:
        grad_u = p.mul_(c) if scale == 1.0 else p.mul_(c).mul_(scale)
    if need_w:
        grad_w = full.mul_(c)
    if need_d:
        grad_d = scaled_mm(u.t(), grad_w, scale) if need_w else scaled_mm((u * c).t(), full, scale)
    return grad_w, grad_d, grad_u, grad_m


class RescaledWeightLinear(torch.autograd.Function):
    """DoRA's linear with the rescale in the weight: y = x W'ᵀ + b, W' = c ⊙ (W0 + s·up·down)
    per output row, c = m / ‖W0 + s·up·down‖ (the norm without gradient, paper §4.3).

    The dense form of :class:`RescaledLowRankLinear` (``OPTIONS.rank_term`` "dense"): no
    pass over the tokens beyond the frozen layer's GEMMs and one dW'' = gᵀx; from it
    ∂m = Σ_in dW'' ⊙ (W0 + s·up·down) / norm, and the factors see dW'' ⊙ c.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, magnitude, scale: float):  # type: ignore[override]
        dtype = compute_dtype(x)
        x2 = _as(_rows(x), dtype)
        direction, norm, channel = _weight_space(
            x2.device.type, _rescaled_direction, weight, down, up, magnitude, scale
        )
        w = mul_as(direction, channel.unsqueeze(1), dtype)  # scaled and cast at once
        y = F.linear(x2, w, None if bias is None else _as(bias, dtype))
        ctx.save_for_backward(x2, w, weight, down, up, norm, channel)
        ctx.scale, ctx.x_shape, ctx.magnitude_dtype = scale, x.shape, magnitude.dtype
        return _shaped(y, x)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x2, w, weight, down, up, norm, channel = ctx.saved_tensors
        need_x, need_w, need_b, need_d, need_u, need_m, _ = ctx.needs_input_grad
        g = _as(_rows(grad_out), w.dtype)
        grad_x = grad_w = grad_b = grad_d = grad_u = grad_m = None
        if need_x:
            grad_x = torch.mm(g, w)
            grad_x = grad_x if len(ctx.x_shape) == 2 else grad_x.view(ctx.x_shape)
        if need_b:
            grad_b = g.sum(0)
        if need_w or need_d or need_u or need_m:
            full = _dense_weight_grad(g, x2, norm.dtype)  # dW'' = gᵀx
            grad_w, grad_d, grad_u, grad_m = _weight_space(
                x2.device.type, _rescaled_weight_grads, full, weight, down, up, norm, channel,
                ctx.scale, (need_w, need_d, need_u, need_m),
            )  # fmt: skip
        return grad_x, grad_w, grad_b, grad_d, grad_u, grad_m, None


def _saved_linear(ctx, x: Tensor, w: Tensor, bias: Tensor | None, grad_dtype: torch.dtype):
    """y = x wᵀ + b for a weight ``w`` in the compute dtype (x and b cast to it); saves what
    :func:`_saved_linear_grads` reads, ``grad_dtype`` being the weight gradient's dtype."""
    x2 = _as(_rows(x), w.dtype)
    y = F.linear(x2, w, None if bias is None else _as(bias, w.dtype))
    ctx.save_for_backward(x2, w)
    ctx.x_shape, ctx.grad_dtype = x.shape, grad_dtype
    return _shaped(y, x)


def _saved_linear_grads(ctx, grad_out: Tensor, need_x: bool, need_weight: bool, need_b: bool):
    """(dx, gᵀx, Σ g) of :func:`_saved_linear`, None where not needed; gᵀx in the saved
    gradient dtype (from cuBLAS where it can write it)."""
    x2, w = ctx.saved_tensors
    g = _as(_rows(grad_out), w.dtype)
    grad_x = grad_weight = grad_b = None
    if need_x:
        grad_x = torch.mm(g, w)
        grad_x = grad_x if len(ctx.x_shape) == 2 else grad_x.view(ctx.x_shape)
    if need_weight:
        grad_weight = factor_grad(g.t(), x2, 1.0, ctx.grad_dtype)
    if need_b:
        grad_b = g.sum(0)
    return grad_x, grad_weight, grad_b


class DeltaLinear(torch.autograd.Function):
    """y = x (W + ΔW)ᵀ + b as one GEMM; ΔW's gradient goes back to its (small) graph, in
    ΔW's dtype straight from cuBLAS where it can write it (a float32 ΔW under autocast:
    no cast op after, and no rounding to half precision on the way)."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta):  # type: ignore[override]
        w = add_as(weight, delta, 1.0, compute_dtype(x))  # in the wider precision, cast on store
        return _saved_linear(ctx, x, w, bias, delta.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        need_x, need_w, need_b, need_delta = ctx.needs_input_grad
        if need_w and not need_delta:  # a trainable W alone: its gradient in g's dtype
            ctx.grad_dtype = ctx.saved_tensors[1].dtype
        grad_x, grad_full, grad_b = _saved_linear_grads(
            ctx, grad_out, need_x, need_w or need_delta, need_b
        )
        return grad_x, grad_full if need_w else None, grad_b, grad_full if need_delta else None


class WeightLinear(torch.autograd.Function):
    """y = x Wᵀ + b for a weight built this step (DoRA's W' from a batched build), cast to
    the compute dtype on the way in; its gradient gᵀx in W's dtype (as :class:`DeltaLinear`
    gives ΔW's)."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[override]
        return _saved_linear(ctx, x, _as(weight, compute_dtype(x)), bias, weight.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        return _saved_linear_grads(ctx, grad_out, *ctx.needs_input_grad)


def eager_native(x: Tensor, weight: Tensor, up: Tensor) -> Any:
    """The C++ module (:mod:`mm_spectral.kernels.native`) where this step should use it:
    eager, built, and not a step for the fused kernels; else None."""
    if torch.compiler.is_compiling():
        return None
    native = native_ops()
    if native is None or use_fused_low_rank(x, weight, up):
        return None
    return native


def form_code(x: Tensor, weight: Tensor, up: Tensor) -> int:
    """The form the low-rank linear of ``x``, ``weight`` and the up factor ``up`` takes,
    as the C++ nodes' code (:func:`mm_spectral.kernels.dispatch.rank_term_code`)."""
    return rank_term_code(x.numel() // x.shape[-1], *weight.shape, up.shape[1])


def low_rank_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, down: Tensor, up: Tensor, scale: float
) -> Tensor:
    """y = x Wᵀ + b + scale · (x downᵀ) upᵀ: eagerly by the C++ node
    (:mod:`mm_spectral.kernels.native`) where it built, else by :class:`LowRankLinear`
    (while compiling, where the fused kernels qualify, or without the C++ node)."""
    native = eager_native(x, weight, up)
    if native is not None:
        bias = compute_bias(bias, x)
        return native.low_rank_linear(x, weight, bias, down, up, scale, form_code(x, weight, up))
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
        return native.rescaled_low_rank_linear(
            x, weight, compute_bias(bias, x), down, up, scale, magnitude, inv_norm,
            form_code(x, weight, up),
        )  # fmt: skip
    return RescaledLowRankLinear.apply(x, weight, bias, down, up, magnitude, inv_norm, scale)


def rescale_in_weight(x: Tensor, weight: Tensor, up: Tensor) -> bool:
    """Whether DoRA's linear of ``x``, ``weight`` and ``up`` steps in the dense form
    (:class:`RescaledWeightLinear`): where the rank term takes it
    (:func:`mm_spectral.kernels.dispatch.rank_term_form`), in place of the fused kernels
    too unless they are forced on. Measured on an H100 under CUDA graphs, ViT-L 4 × 512²,
    DoRA r16: 39.8 ms and 6.25 GiB reserved against 45.4 ms and 8.97 GiB fused."""
    tokens = x.numel() // x.shape[-1]
    if rank_term_form(tokens, *weight.shape, up.shape[1]) != "dense":
        return False
    return fused_low_rank_mode() in ("auto", "off") or not use_fused_low_rank(x, weight, up)


def rescaled_weight_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    down: Tensor,
    up: Tensor,
    scale: float,
    magnitude: Tensor,
) -> Tensor:
    """DoRA's linear in the dense form (:class:`RescaledWeightLinear`), by the C++ node
    where :func:`low_rank_linear` would take it."""
    native = eager_native(x, weight, up)
    if native is not None:
        bias = compute_bias(bias, x)
        return native.rescaled_weight_linear(x, weight, bias, down, up, scale, magnitude)
    return RescaledWeightLinear.apply(x, weight, bias, down, up, magnitude, scale)


def _layer_bias(layer: nn.Module) -> Tensor | None:
    """A linear's bias from ``_parameters`` where it is registered (None included), else the
    attribute."""
    params = layer._parameters
    return params["bias"] if "bias" in params else layer.bias


def planned_delta_linear(x: Tensor, layer: nn.Module, delta: Tensor) -> Tensor:
    """:func:`delta_linear` of linear ``layer`` and the ΔW its batched build made, for an
    eager step (a build is only planned outside ``torch.compile``). W and b come from the
    layer's ``_parameters``: ``nn.Module.__getattr__`` cost about 1 µs per lookup, twice
    per layer and step."""
    weight = layer._parameters.get("weight")
    if weight is None:  # not a registered parameter (a parametrization): the attribute
        weight = layer.weight
    bias = _layer_bias(layer)
    native = native_ops()
    if native is not None:
        return native.delta_linear(x, weight, compute_bias(bias, x), delta)
    return DeltaLinear.apply(x, weight, bias, delta)


def planned_weight_linear(x: Tensor, layer: nn.Module, weight: Tensor) -> Tensor:
    """y = x Wᵀ + b for the whole weight ``weight`` a batched build made for linear ``layer``
    (DoRA's W'), b the layer's bias: as :func:`planned_delta_linear`, without W0."""
    bias = _layer_bias(layer)
    native = native_ops()
    if native is not None:
        return native.weight_linear(x, weight, compute_bias(bias, x))
    return WeightLinear.apply(x, weight, bias)


def delta_linear(x: Tensor, weight: Tensor, bias: Tensor | None, delta: Tensor) -> Tensor:
    """y = x (W + ΔW)ᵀ + b: eagerly by the C++ node where it built, else
    :class:`DeltaLinear`."""
    if not torch.compiler.is_compiling():
        native = native_ops()
        if native is not None:
            return native.delta_linear(x, weight, compute_bias(bias, x), delta)
    return DeltaLinear.apply(x, weight, bias, delta)
