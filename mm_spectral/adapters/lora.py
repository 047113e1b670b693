"""LoRA (Hu et al. 2021): ΔW = (alpha / rank) · B A, the baseline low-rank adapter."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import LayerSpec, LowRankAdapter, check_positive, register_adapter

CONV_FACTORS = ("matrix", "loralib")


def lora_factor_shapes(
    spec: LayerSpec, rank: int, conv_factors: str, method: str = "LoRA"
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(A's shape, B's shape) for a layer: (r, fan_in) and (out, r) for 'matrix' and every
    linear; loralib's ConvLoRA for convs with 'loralib': (r·k, in·k) and (out/groups·k, r·k)."""
    if conv_factors not in CONV_FACTORS:
        raise ValueError(
            f"{method} on layer '{spec.name}': conv_factors must be one of {CONV_FACTORS}, "
            f"got {conv_factors!r}"
        )
    out, fan_in = spec.matrix_shape
    if spec.kind == "linear" or conv_factors == "matrix":
        return (rank, fan_in), (out, rank)
    in_per_group, kh, kw = spec.weight_shape[1:]
    if kh != kw:
        raise ValueError(
            f"{method} on layer '{spec.name}': conv_factors='loralib' needs a square kernel, "
            f"got {kh}x{kw}"
        )
    return (rank * kh, in_per_group * spec.groups * kh), (out // spec.groups * kh, rank * kh)


@register_adapter
class LoRA(LowRankAdapter):
    """ΔW = (alpha / rank) · B A with A (rank × fan_in) and B (out × rank).

    A starts Kaiming-uniform (a = √5, as nn.Linear), B at zero, so ΔW starts at zero.

    Conv weights, ``conv_factors='matrix'`` (default): the weight seen as the matrix
    (out, in/groups · kh · kw); ungrouped convs run factored (a conv with r outputs, then a
    1×1 conv). ``conv_factors='loralib'``: loralib's ConvLoRA, the parameterisation the
    FLoRA paper's LoRA/DoRA budgets count: A (r·k, in·k), B (out/groups·k, r·k) and
    ΔW = (B A).view(weight shape). That view puts k consecutive rows of B A into one output
    channel, so ΔW has no two-conv form: it is built (one GEMM of the weight's size) and
    the layer runs once with W0 + ΔW, as loralib does. A factored form would need r·k²
    intermediate channels per position, more than the layer's own output for the layers
    the paper adapts (e.g. 392 for r = 8 on a 7×7 conv). Linears are the same either way.

    Args:
        spec: the adapted layer.
        rank: inner dimension r.
        alpha: scale numerator; defaults to ``rank`` (scale 1).
        conv_factors: 'matrix' or 'loralib' (how conv weights are factored).
    """

    method = "LoRA"

    def __init__(
        self,
        spec: LayerSpec,
        rank: int = 8,
        alpha: float | None = None,
        conv_factors: str = "matrix",
    ) -> None:
        super().__init__(spec)
        alpha = float(rank) if alpha is None else alpha
        check_positive(spec, self.method, rank=rank)
        a_shape, b_shape = lora_factor_shapes(spec, rank, conv_factors, self.method)
        self.rank, self.conv_factors = rank, conv_factors
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(a_shape))
        self.lora_B = nn.Parameter(torch.zeros(b_shape))
        # Asked every forward, fixed by the shapes: loralib's factors equal the matrix ones
        # for linears and 1×1 kernels.
        self._factored = spec.factorable and tuple(a_shape) == (rank, spec.matrix_shape[1])
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def factored(self) -> bool:
        return self._factored

    def low_rank_factors(self) -> tuple[Tensor, Tensor, float]:
        return self.lora_A, self.lora_B, self.scale

    def size_warning(self) -> str | None:
        (inner, cols), (rows, _) = self.lora_A.shape, self.lora_B.shape
        params = self.lora_A.numel() + self.lora_B.numel()
        entries = math.prod(self.spec.weight_shape)
        if inner <= min(rows, cols) and params <= entries:
            return None
        return (
            f"{self.method} rank {self.rank}: B A is {rows}x{inner} · {inner}x{cols} (rank at most "
            f"{min(rows, cols)}), {params:,} parameters for a weight of {entries:,}"
        )

    def extra_repr(self) -> str:
        extra = "" if self.conv_factors == "matrix" else f", conv_factors={self.conv_factors!r}"
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}{extra}"
