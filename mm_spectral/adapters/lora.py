"""LoRA (Hu et al. 2021): ΔW = (alpha / rank) · B A, the baseline low-rank adapter."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import LayerSpec, LowRankAdapter, check_positive, register_adapter


@register_adapter
class LoRA(LowRankAdapter):
    """ΔW = (alpha / rank) · B A with A (rank × fan_in) and B (out × rank).

    A starts Kaiming-uniform (a = √5, as nn.Linear), B at zero, so ΔW starts at zero.
    Conv weights are seen as the matrix (out, in/groups · kh · kw).

    Args:
        spec: the adapted layer.
        rank: inner dimension r.
        alpha: scale numerator; defaults to ``rank`` (scale 1).
    """

    method = "LoRA"

    def __init__(
        self, spec: LayerSpec, rank: int = 8, alpha: float | None = None
    ) -> None:
        super().__init__(spec)
        alpha = float(rank) if alpha is None else alpha
        check_positive(spec, self.method, rank=rank)
        out_features, fan_in = spec.matrix_shape
        self.rank = rank
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, fan_in))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def low_rank_factors(self) -> tuple[Tensor, Tensor, float]:
        return self.lora_A, self.lora_B, self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}"
