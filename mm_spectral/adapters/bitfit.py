"""BitFit (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models"): only the biases train."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import BaseAdapter, LayerSpec, layer_op, register_adapter


@register_adapter
class BitFit(BaseAdapter):
    """b' = b + Δb with Δb learnable and zero at the start; ΔW = 0.

    A learnable Δb rather than the bias itself: the base layer stays frozen and intact, so
    BitFit is one more method of the matrix: merge writes b + Δb (the bias BitFit would
    have trained) and unmerge restores b, adapter-only files hold Δb alone and need the
    same ``Pretrained`` base as every other method, and checked loading, merged state
    dicts and the trainable table work unchanged. Every targeted layer needs a bias.

    Args:
        spec: the adapted layer.
    """

    method = "BitFit"

    def __init__(self, spec: LayerSpec) -> None:
        super().__init__(spec)
        if not spec.bias:
            raise ValueError(
                f"BitFit on layer '{spec.name}': the layer has no bias to tune (bias=False); "
                "leave it out of `targets`"
            )
        self.bias_delta = nn.Parameter(torch.zeros(spec.weight_shape[0]))

    def delta(self) -> Tensor:
        return self.bias_delta.new_zeros(self.spec.weight_shape)

    def delta_bias(self) -> Tensor:
        return self.bias_delta

    def merged_weight(self, weight: Tensor) -> tuple[Tensor, Any]:
        return weight, None  # the weight is left as it is

    def unmerged_weight(self, weight: Tensor, memo: Any) -> Tensor:
        return weight

    def forward(self, x: Tensor, layer: nn.Module) -> Tensor:
        return layer_op(layer, x, layer.weight, layer.bias + self.bias_delta)
