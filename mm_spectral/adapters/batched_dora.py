"""DoRA's rescaled linear weights for many same-shape layers in one batched build (torch,
and in eager steps the same ops as a C++ autograd node, :mod:`mm_spectral.kernels.native`).

Stepped per layer in the dense form, DoRA's linear forms W0 + s·B A, its row norms and the
rescaled weight, and in the backward the magnitude's gradient and the factors' from dW:
about twenty ops per layer and step beyond the frozen layer's, on a GPU host-bound. Here
those run once per chunk of same-shape layers (``bmm``/``baddbmm`` and reductions with a
leading layer dimension), and each layer steps with the rescaled weight W' itself
(:func:`mm_spectral.adapters.functional.planned_weight_linear`): one op beyond the frozen
layer's (dW' = gᵀx), and no float32 W' − W0 written by the build and read back by the layer
(which the additive methods' W0 + ΔW needs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .batched_tucker import _float32s, native_builds
from .functional import _as, outside_autocast, scaled_mm
from .packed_weights import stacked


def _stacked(weights: Sequence[Tensor]) -> Tensor:
    """(L, out, in) float32: the base weights W0_ℓ (a view where the plan packed them)."""
    return _as(stacked(weights), torch.float32)


class _BatchedRescaledWeight(torch.autograd.Function):
    """W'_ℓ = c_ℓ ⊙ S_ℓ for L layers, S_ℓ = W0_ℓ + s·B_ℓ A_ℓ and c_ℓ = m_ℓ / ‖S_ℓ‖
    per output row, the norm without gradient (DoRA paper §4.3): (L, out, in) float32.

    Inputs: the scale, then per layer W0 (frozen: no gradient), B, A, m. The sums S are not
    kept for the backward (a float32 copy of every layer's weight until then); it forms
    them again, and from dW' gives ∂m = Σ_in dW' ⊙ S / ‖S‖, and the factors see c ⊙ dW'.
    """

    @staticmethod
    def forward(ctx, scale, *tensors):  # type: ignore[override]
        weights = tensors[0::4]
        ups, downs, magnitudes = (torch.stack(tensors[k::4]) for k in (1, 2, 3))
        base = _stacked(weights)
        summed = torch.baddbmm(base, ups, downs, alpha=scale)
        norm = torch.linalg.vector_norm(summed, dim=2).clamp_min_(torch.finfo(torch.float32).tiny)
        channel = magnitudes / norm
        out = summed.mul_(channel.unsqueeze(2))
        ctx.save_for_backward(ups, downs, norm, channel, *weights)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        ups, downs, norm, channel, *weights = ctx.saved_tensors
        scale = ctx.scale
        g = grad_out.to(torch.float32)
        summed = torch.baddbmm(_stacked(weights), ups, downs, alpha=scale)
        grad_m = summed.mul_(g).sum(2).div_(norm)
        g_sum = g.mul_(channel.unsqueeze(2)) if g is not grad_out else g * channel.unsqueeze(2)
        grad_up = scaled_mm(g_sum, downs.transpose(1, 2), scale)
        grad_down = scaled_mm(ups.transpose(1, 2), g_sum, scale)
        per_layer = zip(grad_up.unbind(0), grad_down.unbind(0), grad_m.unbind(0))
        return (None, *(t for up, down, m in per_layer for t in (None, up, down, m)))


def batched_rescaled_weights(
    weights: Sequence[Tensor],
    ups: Sequence[Tensor],
    downs: Sequence[Tensor],
    magnitudes: Sequence[Tensor],
    scale: float,
) -> Tensor:
    """(L, out, in) float32: layer ℓ's DoRA weight W' = m ⊙ S / ‖S‖ with
    S = W0 + scale · ups[ℓ] downs[ℓ] (norm without gradient), all in one batched build.
    ``weights`` are the frozen base weights (no gradient flows to them). Float32 under
    autocast too."""
    if not weights:
        raise ValueError("batched_rescaled_weights needs at least one layer")
    if any(w.requires_grad for w in weights):
        raise ValueError("batched_rescaled_weights: the base weights must be frozen")
    native = native_builds()
    if native is not None:  # float32 inside, autocast or not (the C++ node's same ops)
        return native.batched_rescaled_weight(
            list(weights), _float32s(ups), _float32s(downs), _float32s(magnitudes), float(scale)
        )
    device_type = weights[0].device.type
    if torch.is_autocast_enabled(device_type):
        return outside_autocast(
            device_type, batched_rescaled_weights, weights, ups, downs, magnitudes, scale
        )
    tensors = [
        t if i == 0 else _as(t, torch.float32)
        for quad in zip(weights, ups, downs, magnitudes)
        for i, t in enumerate(quad)
    ]
    return _BatchedRescaledWeight.apply(float(scale), *tensors)
