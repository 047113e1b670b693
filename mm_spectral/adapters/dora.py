"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"): a learnable
magnitude per output channel times the direction of W0 + ΔW, ΔW a LoRA update.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..kernels.dispatch import off_default_stream
from ..kernels.native import native_ops
from .base import LayerSpec, conv_options, layer_op, native_conv_ops, register_adapter
from .bias_cast import compute_bias
from .functional import (
    _as,
    outside_autocast,
    planned_weight_linear,
    rescale_in_weight,
    rescaled_low_rank_linear,
    rescaled_weight_linear,
)
from .lora import LoRA


def channel_norm(weight: Tensor) -> Tensor:
    """‖W‖_c: the norm of each output channel over every other axis (in, kh, kw)."""
    return torch.linalg.vector_norm(weight.reshape(weight.shape[0], -1), dim=1)


@torch.no_grad()
def low_rank_row_norms(
    weight: Tensor, down: Tensor, up: Tensor, scale: float, base_squares: Tensor | None = None
) -> Tensor:
    """‖W0 + scale · up @ down‖_c per output channel, in float32, without forming the sum
    (see :func:`low_rank_row_squares`)."""
    squares = low_rank_row_squares(weight, down, up, scale, base_squares)
    return squares.clamp_min_(0.0).sqrt_()


def low_rank_inverse_norms(
    weight: Tensor, down: Tensor, up: Tensor, scale: float, base_squares: Tensor | None = None
) -> Tensor:
    """1 / ‖W0 + scale · up @ down‖_c in float32, finite for a zero row (its square is
    clamped at float32's smallest normal number): two ops past the squares. Eagerly by
    the C++ module where it built (:mod:`mm_spectral.kernels.native`)."""
    if not torch.compiler.is_compiling():
        native = native_ops()
        if native is not None:
            if base_squares is None:  # a trainable base (rare): not cached by the adapter
                base_squares = row_squares(weight)
            return native.low_rank_inverse_norms(weight, down, up, scale, base_squares)
    return _inverse_norms(weight, down, up, scale, base_squares)


@torch.no_grad()
def _inverse_norms(
    weight: Tensor, down: Tensor, up: Tensor, scale: float, base_squares: Tensor | None = None
) -> Tensor:
    squares = low_rank_row_squares(weight, down, up, scale, base_squares)
    return squares.clamp_min_(torch.finfo(torch.float32).tiny).rsqrt_()


@torch.no_grad()
def low_rank_row_squares(
    weight: Tensor, down: Tensor, up: Tensor, scale: float, base_squares: Tensor | None = None
) -> Tensor:
    """‖W0 + scale · up @ down‖²_c per output channel, in float32, without forming the sum.

    ‖W0ᵢ + sΔᵢ‖² = ‖W0ᵢ‖² + upᵢ · (2s·(down W0ᵢᵀ) + s²·(down downᵀ) upᵢᵀ): one thin
    product with W0 and an r × r Gram matrix instead of writing and reading weight-sized ΔW
    and W0 + ΔW, in few ops (each costs the host more than its arithmetic on a GPU).
    ``base_squares`` (‖W0ᵢ‖², see :func:`row_squares`) may be passed when known: W0 is
    frozen. Cancellation is harmless while ΔW stays small against W0 (float32 keeps ~7
    digits of ‖W0ᵢ‖²); callers clamp the result at zero.
    """
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):  # float32 GEMMs, not autocast's half ones
        return outside_autocast(
            device_type, low_rank_row_squares, weight, down, up, scale, base_squares
        )
    w = weight.reshape(weight.shape[0], -1)
    a, b = _as(down, torch.float32), _as(up, torch.float32)
    if base_squares is None:
        base_squares = row_squares(weight)
    cross = torch.mm(w.to(a.dtype) if w.dtype != a.dtype else w, a.t())  # (out, r)
    mixed = cross.addmm_(b, torch.mm(a, a.t()), beta=2.0 * scale, alpha=scale**2)
    # ‖W0ᵢ‖² + bᵢ · mixedᵢ for every row i at once: one batched (1 × r)·(r × 1) product.
    rows = b.shape[0]
    return torch.baddbmm(
        base_squares.view(rows, 1, 1), b.view(rows, 1, -1), mixed.view(rows, -1, 1)
    ).view(rows)


@torch.no_grad()
def row_squares(weight: Tensor) -> Tensor:
    """‖Wᵢ‖² per output channel, in float32."""
    w = weight.reshape(weight.shape[0], -1)
    return torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).square_()


def _per_row(values: Tensor, weight: Tensor) -> Tensor:
    """(out,) → broadcastable against a weight (out, …)."""
    return values.view(-1, *[1] * (weight.dim() - 1))


@register_adapter
class DoRA(LoRA):
    """W' = m · (W0 + ΔW) / ‖W0 + ΔW‖_c with ΔW = (alpha / rank) · B A (LoRA's factors).

    ``magnitude`` m has one entry per output channel and starts at ‖W0‖_c, the norm over
    every axis but the output one (so convs, depthwise included, work), making W' = W0 at
    the start (B starts at zero).

    Forward on linears and ungrouped convs (``conv_factors='matrix'``) runs factored,
    y = (m / ‖W0 + ΔW‖_c) ⊙ (x W0ᵀ + s · (x Aᵀ) Bᵀ) + b, with the norm computed without
    gradient as in the DoRA paper §4.3: the output value is exact, only the gradient
    through the norm is dropped (the paper's memory saving). Linears in the dense rank-term
    form (``OPTIONS.rank_term``; when ``auto`` takes it: ``kernels.dispatch.rank_term_form``)
    put the rescale into the weight instead, y = x (m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖_c)ᵀ + b, the
    same norm without gradient. Grouped/depthwise convs and loralib conv factors build W'
    (same detached norm). On the factored path the norm
    never builds ΔW: with ΔW = s·B A, ‖W0ᵢ + ΔWᵢ‖² = ‖W0ᵢ‖² + 2s·Bᵢ·(A W0ᵢᵀ) + s²·Bᵢ (A Aᵀ) Bᵢᵀ,
    one thin product with W0 and an r × r Gram matrix (see :func:`low_rank_row_norms`).

    Merging writes W' exactly (norm with gradient or not: the same value) and keeps the
    column norms ‖W0 + ΔW‖_c (one number per output channel) to undo it:
    W0 = W' · ‖W0 + ΔW‖_c / m − ΔW; rows whose m is 0 keep W0 itself.

    The magnitude follows the base weight until it is trained or loaded: set from W0 at
    injection, and set again from the new W0 when a base checkpoint is loaded into the
    layer afterwards (OpenMMLab's ``init_weights``) unless that state dict, or an earlier
    one, holds the magnitude itself (see :meth:`reset_from_base`).

    Args:
        spec: the adapted layer.
        **lora_args: ``rank``, ``alpha``, ``conv_factors``, as :class:`LoRA`.
    """

    method = "DoRA"
    additive = False
    base_dependent = ("magnitude",)

    def __init__(self, spec: LayerSpec, **lora_args: Any) -> None:
        super().__init__(spec, **lora_args)
        self.magnitude = nn.Parameter(torch.ones(spec.weight_shape[0]))
        self.magnitude_loaded = False  # True once a state dict set it: then it is kept

    @torch.no_grad()
    def reset_from_base(self, weight: Tensor) -> None:
        """m = ‖W0‖_c, unless the magnitude came from a state dict (trained values)."""
        if not self.magnitude_loaded:
            self.magnitude.copy_(channel_norm(weight.to(self._wide(weight))))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if f"{prefix}magnitude" in state_dict:
            self.magnitude_loaded = True

    def _base_squares(self, weight: Tensor) -> Tensor | None:
        """‖W0ᵢ‖², computed once per state of the frozen base weight (its storage and
        version counter, which every in-place write such as a checkpoint load or a merge
        bumps). None for a trainable base, while a graph is traced or captured (the graph
        computes it itself, so it never holds a value computed outside it), and off the
        default CUDA stream (a cached tensor must not cross streams)."""
        if weight.requires_grad or torch.compiler.is_compiling():
            return None
        if weight.is_cuda and off_default_stream(weight.device):
            return None  # side streams: CUDA-graph warm-up and capture among them
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, weight.shape)
        cached = self.__dict__.get("_base_squares_cache")
        if cached is None or cached[0] != key:
            cached = (key, row_squares(weight))
            self.__dict__["_base_squares_cache"] = cached
        return cached[1]

    def _wide(self, weight: Tensor) -> torch.dtype:
        return torch.promote_types(weight.dtype, self.magnitude.dtype)

    def _direction(self, weight: Tensor) -> Tensor:
        """W0 + ΔW in the wider of the two dtypes, with gradient to the factors."""
        return weight.to(self._wide(weight)) + self.delta_weight(self._wide(weight))

    def _scale(self, norm: Tensor) -> Tensor:
        """m / ‖W0 + ΔW‖_c for a detached norm (paper §4.3): (out,)."""
        return self.magnitude / norm.clamp_min(torch.finfo(norm.dtype).tiny)

    def forward(self, x: Tensor, layer: nn.Module) -> Tensor:
        if not self.factored:
            native = native_conv_ops(layer) if self.spec.kind == "conv2d" else None
            if native is not None:  # the lines below as one C++ node
                return native.rescaled_delta_conv2d(
                    x, layer.weight, compute_bias(layer.bias, x), self.delta(), self.magnitude,
                    *conv_options(layer),
                )  # fmt: skip
            direction = self._direction(layer.weight)
            scale = self._scale(channel_norm(direction.detach()))
            return layer_op(layer, x, direction * _per_row(scale, layer.weight), layer.bias)
        if self.spec.kind == "linear":
            rescaled = self.planned_delta(x)  # W' itself, from a batched build
            if rescaled is not None:
                return planned_weight_linear(x, layer, rescaled)
        down, up, s = self.low_rank_factors()
        if self.spec.kind == "linear" and rescale_in_weight(x, layer.weight, up):
            # The rescale in the weight: its norms from the summed weight itself.
            return rescaled_weight_linear(
                x, layer.weight, layer.bias, down, up, s, self.magnitude
            )  # fmt: skip
        base_squares = self._base_squares(layer.weight)
        if self.spec.kind == "linear":  # one autograd node (adapters.functional)
            inv_norms = low_rank_inverse_norms(layer.weight, down, up, s, base_squares)
            return rescaled_low_rank_linear(
                x, layer.weight, layer.bias, down, up, s, self.magnitude, inv_norms
            )
        scale = self._scale(low_rank_row_norms(layer.weight, down, up, s, base_squares))
        out = self.factored_forward(x, layer, None)
        # Output channels are axis 1 of a conv's output.
        scale = scale.to(out.dtype).view(-1, 1, 1)
        bias = compute_bias(layer.bias, x)
        if bias is None:
            return out * scale
        return torch.addcmul(bias.to(out.dtype).view(-1, 1, 1), out, scale)

    def merged_weight(self, weight: Tensor) -> tuple[Tensor, Any]:
        direction = self._direction(weight)
        norm = channel_norm(direction)
        scale = self.magnitude / norm.clamp_min(torch.finfo(norm.dtype).tiny)
        merged = direction * _per_row(scale, weight)
        dead = (self.magnitude == 0).nonzero().flatten()  # W' rows of 0 say nothing of W0
        return merged.to(weight.dtype), (norm, dead, weight[dead].clone())

    def unmerged_weight(self, weight: Tensor, memo: Any) -> Tensor:
        norm, dead, dead_rows = memo
        wide = self._wide(weight)
        direction = weight.to(wide) * _per_row(norm / self.magnitude, weight)
        restored = (direction - self.delta_weight(wide)).to(weight.dtype)
        restored[dead] = dead_rows
        return restored

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, magnitude per output channel"
