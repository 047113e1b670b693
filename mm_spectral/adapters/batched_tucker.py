"""Many same-shape FLoRA Tucker products as one batched build (torch; the linears' builds
also as C++ autograd nodes, :mod:`mm_spectral.kernels.native`).

FLoRA multiplies its core by factors every forward: on a grouped (depthwise) conv the whole
ΔW = s · U_out · G₍₁₎ · (U_in ⊗ U_h ⊗ U_w)ᵀ, a handful of small ops forward and about a dozen
backward per layer (:func:`mm_spectral.adapters.flora.conv_tucker_down`); on a linear the
down factor s · G U_inᵀ, one GEMM forward and two backward. ConvNeXt-V2-L has 36 depthwise
convs in four shapes and 72 linears in eight, ViT-L 96 linears in four, so these products
are hundreds of host-bound launches per eager step. Here all layers of one shape (and core
shape and scale) take the same ops once, batched over the layers: ``bmm`` for the GEMMs,
broadcasts with a leading layer dimension for the Kronecker products, and written-out
backwards. The same batched product serves LoRA, DoRA and FoRA where they build
ΔW = s · B A (grouped convs): :func:`batched_low_rank_products`. In eager steps the
products of two factors and the linears' Tucker products run as C++ nodes where those
built: the same ops, without a Python autograd Function's host cost per chunk and step
(about 45 µs forward and 85 µs backward each on an H100 host, by the profiler).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..kernels.native import native_builds_mode, native_ops
from .functional import _as, outside_autocast, scaled_mm


def native_builds() -> Any:
    """The C++ module for a batched build (:mod:`mm_spectral.kernels.native`) where this
    step may use it: eager (dynamo cannot trace it), built and not turned off for the builds
    (``MM_SPECTRAL_NATIVE_BUILDS``); else None."""
    if torch.compiler.is_compiling() or native_builds_mode() == "off":
        return None
    return native_ops()


def _float32s(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [_as(t, torch.float32) for t in tensors]


def _kron(u_in: Tensor, u_h: Tensor, u_w: Tensor) -> tuple[Tensor, Tensor]:
    """(U_h ⊗ U_w, U_in ⊗ U_h ⊗ U_w) per layer: (L, h·w, r_h·r_w), (L, i·h·w, r_in·r_h·r_w)."""
    (layers, i, r_in), (_, h, r_h), (_, w, r_w) = u_in.shape, u_h.shape, u_w.shape
    spatial = (u_h.view(layers, h, 1, r_h, 1) * u_w.view(layers, 1, w, 1, r_w)).view(
        layers, h * w, r_h * r_w
    )
    kron = u_in.view(layers, i, 1, r_in, 1) * spatial.view(layers, 1, h * w, 1, r_h * r_w)
    return spatial, kron.view(layers, i * h * w, r_in * r_h * r_w)


class _BatchedConvTucker(torch.autograd.Function):
    """ΔW_ℓ = scale · U_out,ℓ · G_ℓ₍₁₎ · (U_in,ℓ ⊗ U_h,ℓ ⊗ U_w,ℓ)ᵀ for L layers at once:
    (L, out, in·kh·kw) float32. Inputs: the scale, then per layer core, U_out, U_in, U_h,
    U_w (five tensors each, layer after layer)."""

    @staticmethod
    def forward(ctx, scale, *tensors):  # type: ignore[override]
        parts = [torch.stack(tensors[k::5]) for k in range(5)]  # (L, …) per role
        core, u_out, u_in, u_h, u_w = parts
        unfolded = core.view(core.shape[0], core.shape[1], -1)
        spatial, kron = _kron(u_in, u_h, u_w)
        down = torch.bmm(unfolded, kron.transpose(1, 2))  # (L, J_out, i·h·w)
        delta = torch.bmm(u_out, down)
        ctx.save_for_backward(unfolded, u_out, u_in, u_h, u_w, spatial, kron, down)
        ctx.scale, ctx.core_shape = scale, core.shape
        return delta if scale == 1.0 else delta.mul_(scale)

    @staticmethod
    def backward(ctx, grad_delta):  # type: ignore[override]
        unfolded, u_out, u_in, u_h, u_w, spatial, kron, down = ctx.saved_tensors
        (layers, i, r_in), (_, h, r_h), (_, w, r_w) = u_in.shape, u_h.shape, u_w.shape
        g = grad_delta.to(unfolded.dtype)  # float32 (the build's dtype) whatever came back
        g = g if ctx.scale == 1.0 else g * ctx.scale
        grad_out = torch.bmm(g, down.transpose(1, 2))
        grad_down = torch.bmm(u_out.transpose(1, 2), g)
        grad_core = torch.bmm(grad_down, kron).view(ctx.core_shape)
        grad_kron = torch.bmm(grad_down.transpose(1, 2), unfolded)
        grad_kron = grad_kron.view(layers, i, h * w, r_in, r_h * r_w)
        grad_in = (grad_kron * spatial.view(layers, 1, h * w, 1, r_h * r_w)).sum((2, 4))
        grad_spatial = (grad_kron * u_in.view(layers, i, 1, r_in, 1)).sum((1, 3))
        grad_spatial = grad_spatial.view(layers, h, w, r_h, r_w)
        grad_h = (grad_spatial * u_w.view(layers, 1, w, 1, r_w)).sum((2, 4))
        grad_w = (grad_spatial * u_h.view(layers, h, 1, r_h, 1)).sum((1, 3))
        per_role = [grad_core, grad_out, grad_in, grad_h, grad_w]
        grads = [g for layer in zip(*(p.unbind(0) for p in per_role)) for g in layer]
        return (None, *grads)


def batched_conv_tucker_deltas(
    cores: Sequence[Tensor], factors: Sequence[Sequence[Tensor]], scale: float
) -> Tensor:
    """(L, out, in/groups·kh·kw) float32: layer ℓ's ``conv_tucker_down(cores[ℓ],
    factors[ℓ], scale, with_up=True)``, all in one batched build (same shapes throughout).
    Float32 under autocast too, as the per-layer build."""
    if not cores:
        raise ValueError("batched_conv_tucker_deltas needs at least one layer")
    device_type = cores[0].device.type
    if torch.is_autocast_enabled(device_type):
        return outside_autocast(device_type, batched_conv_tucker_deltas, cores, factors, scale)
    tensors = [_as(t, torch.float32) for core, fs in zip(cores, factors) for t in (core, *fs)]
    return _BatchedConvTucker.apply(float(scale), *tensors)


class _BatchedProduct(torch.autograd.Function):
    """scale · X_ℓ Y_ℓ (or X_ℓ Y_ℓᵀ with ``transpose``) for L layers at once, float32.
    Inputs: the scale, ``transpose``, then per layer its X and Y. Stacked inside the node,
    so the backward hands back each layer's gradients from one ``unbind`` per operand
    (through ``torch.stack``, autograd would add a ``select`` per layer and operand)."""

    @staticmethod
    def forward(ctx, scale, transpose, *tensors):  # type: ignore[override]
        xs, ys = torch.stack(tensors[0::2]), torch.stack(tensors[1::2])
        ctx.save_for_backward(xs, ys)
        ctx.scale, ctx.transpose = scale, transpose
        # The scale in the GEMMs' alpha: no pass over the (weight-sized) product or its
        # gradient to scale them.
        return scaled_mm(xs, ys.transpose(1, 2) if transpose else ys, scale)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        xs, ys = ctx.saved_tensors
        g, s = grad_out.to(xs.dtype), ctx.scale
        if ctx.transpose:  # out = s·X Yᵀ: dX = s·g Y, dY = s·gᵀ X
            grad_x, grad_y = scaled_mm(g, ys, s), scaled_mm(g.transpose(1, 2), xs, s)
        else:  # out = s·X Y: dX = s·g Yᵀ, dY = s·Xᵀ g
            grad_x = scaled_mm(g, ys.transpose(1, 2), s)
            grad_y = scaled_mm(xs.transpose(1, 2), g, s)
        pairs = zip(grad_x.unbind(0), grad_y.unbind(0))
        return (None, None, *(t for pair in pairs for t in pair))


def _batched_products(
    xs: Sequence[Tensor], ys: Sequence[Tensor], scale: float, transpose: bool, caller: str
) -> Tensor:
    if not xs:
        raise ValueError(f"{caller} needs at least one layer")
    native = native_builds()
    if native is not None:  # float32 inside, autocast or not
        return native.batched_product(_float32s(xs), _float32s(ys), float(scale), transpose)
    device_type = xs[0].device.type
    if torch.is_autocast_enabled(device_type):
        return outside_autocast(device_type, _batched_products, xs, ys, scale, transpose, caller)
    tensors = [_as(t, torch.float32) for pair in zip(xs, ys) for t in pair]
    return _BatchedProduct.apply(float(scale), transpose, *tensors)


def batched_core_products(cores: Sequence[Tensor], u_in: Sequence[Tensor], scale: float) -> Tensor:
    """(L, J_out, in) float32: layer ℓ's FLoRA linear down factor scale · cores[ℓ] u_in[ℓ]ᵀ,
    all in one ``bmm`` (same shapes throughout). Float32 under autocast too."""
    return _batched_products(cores, u_in, scale, True, "batched_core_products")


def batched_low_rank_products(
    ups: Sequence[Tensor], downs: Sequence[Tensor], scale: float
) -> Tensor:
    """(L, out, fan_in) float32: layer ℓ's ΔW = scale · ups[ℓ] downs[ℓ] (LoRA's B A), all
    in one ``bmm``. Float32 under autocast too, as :meth:`LowRankAdapter.delta`."""
    return _batched_products(ups, downs, scale, False, "batched_low_rank_products")


class _BatchedTuckerLinear(torch.autograd.Function):
    """ΔW_ℓ = scale · U_out,ℓ G_ℓ U_in,ℓᵀ for L linears at once: (L, out, in) float32.
    Inputs: the scale, then per layer core, U_out, U_in. The whole ΔW of a FLoRA linear,
    for the layers that step as W0 + ΔW (:func:`mm_spectral.kernels.dispatch.batched_delta_linear`)."""

    @staticmethod
    def forward(ctx, scale, *tensors):  # type: ignore[override]
        core, u_out, u_in = (torch.stack(tensors[k::3]) for k in range(3))
        # The scale goes into the small down factor, never over the weight-sized product.
        down = scaled_mm(core, u_in.transpose(1, 2), scale)  # (L, J_out, in)
        ctx.save_for_backward(core, u_out, u_in, down)
        ctx.scale = scale
        return torch.bmm(u_out, down)

    @staticmethod
    def backward(ctx, grad_delta):  # type: ignore[override]
        core, u_out, u_in, down = ctx.saved_tensors
        g, s = grad_delta.to(core.dtype), ctx.scale
        grad_out = torch.bmm(g, down.transpose(1, 2))  # down holds the scale
        grad_down = torch.bmm(u_out.transpose(1, 2), g)  # (L, J_out, in), of the scaled down
        grad_core = scaled_mm(grad_down, u_in, s)
        grad_in = scaled_mm(grad_down.transpose(1, 2), core, s)
        per_role = (grad_core, grad_out, grad_in)
        return (None, *(t for layer in zip(*(p.unbind(0) for p in per_role)) for t in layer))


def batched_tucker_linear_deltas(
    cores: Sequence[Tensor], u_out: Sequence[Tensor], u_in: Sequence[Tensor], scale: float
) -> Tensor:
    """(L, out, in) float32: layer ℓ's FLoRA linear ΔW = scale · u_out[ℓ] cores[ℓ] u_in[ℓ]ᵀ,
    from two ``bmm`` (same shapes throughout). Float32 under autocast too."""
    if not cores:
        raise ValueError("batched_tucker_linear_deltas needs at least one layer")
    native = native_builds()
    if native is not None:  # float32 inside, autocast or not
        return native.batched_tucker_linear(
            _float32s(cores), _float32s(u_out), _float32s(u_in), float(scale)
        )
    device_type = cores[0].device.type
    if torch.is_autocast_enabled(device_type):
        return outside_autocast(
            device_type, batched_tucker_linear_deltas, cores, u_out, u_in, scale
        )
    tensors = [_as(t, torch.float32) for trio in zip(cores, u_out, u_in) for t in trio]
    return _BatchedTuckerLinear.apply(float(scale), *tensors)
