"""FoRA ("LoRA Unleashed: … Arbitrary Rank"): LoRA whose factors are each Re(IDFT2) of
their own n-coefficient sparse spectrum, so the rank is free at a fixed parameter count.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import LayerSpec, LowRankAdapter, check_positive, register_adapter
from .spectral import (
    half_spectrum_positions,
    hermitian_weights,
    sample_entries,
    sparse_spectrum_to_real,
)
from .stash import take_stash


@register_adapter
class FoRA(LowRankAdapter):
    """ΔW = scale · B A with A = Re(ifft2(F_A)) (rank × fan_in), B = Re(ifft2(F_B)) (out × rank).

    Each spectrum has n learnable coefficients (clipped to the factor's size) at seeded
    entries kept as buffers ``a_indices``/``b_indices``: 2n trainable values at any rank.
    ``b_coefficients`` start at zero (ΔW = 0); ``a_coefficients`` start Gaussian with the
    standard deviation that makes Var(A), averaged over A's entries, equal a Kaiming-uniform
    (a = √5) matrix of A's shape, 1 / (3 fan_in) (paper §3.3). Training runs the LoRA path.

    Args:
        spec: the adapted layer.
        rank: rank of ΔW (free: it does not change the parameter count).
        n: coefficients per factor.
        scale: multiplies B A.
        seed: seed of the entry draws (A uses ``seed``, B ``seed + 1``).
    """

    method = "FoRA"
    fixed_buffers = ("a_indices", "b_indices")

    def __init__(
        self,
        spec: LayerSpec,
        rank: int = 16,
        n: int = 1000,
        scale: float = 1.0,
        seed: int = 777,
    ) -> None:
        super().__init__(spec)
        check_positive(spec, self.method, rank=rank, n=n)
        out_features, fan_in = spec.matrix_shape
        self.rank, self.n, self.scale, self.seed = rank, n, scale, seed
        self.a_shape, self.b_shape = (rank, fan_in), (out_features, rank)
        n_a, n_b = min(n, rank * fan_in), min(n, out_features * rank)
        self.register_buffer("a_indices", sample_entries(*self.a_shape, n_a, seed))
        self.register_buffer("b_indices", sample_entries(*self.b_shape, n_b, seed + 1))
        self.a_coefficients = nn.Parameter(torch.randn(n_a) * self._a_std(fan_in))
        self.b_coefficients = nn.Parameter(torch.zeros(n_b))
        empty = torch.empty(0, dtype=torch.long)
        self.register_buffer("a_positions", empty, persistent=False)
        self.register_buffer("b_positions", empty.clone(), persistent=False)
        self.refresh_buffers()

    def refresh_buffers(self) -> None:
        self.a_positions = half_spectrum_positions(self.a_indices, self.a_shape)
        self.b_positions = half_spectrum_positions(self.b_indices, self.b_shape)

    def _a_std(self, fan_in: int) -> float:
        # Var(A) averaged over entries = σ² Σ_k w_k / (rows·cols)² for N(0, σ²) coefficients
        # (w_k = mean of cos² over positions, see hermitian_weights); solve for σ.
        target_var = 1.0 / (3.0 * fan_in)
        rows, cols = self.a_shape
        weight_sum = hermitian_weights(self.a_indices, self.a_shape).sum().item()
        return (target_var / weight_sum) ** 0.5 * rows * cols

    def low_rank_factors(self) -> tuple[Tensor, Tensor, float]:
        prebuilt = take_stash(self)  # from mm_spectral.enable_batched_spectra
        if prebuilt is not None:
            return prebuilt
        down = sparse_spectrum_to_real(self.a_coefficients, self.a_positions, self.a_shape)
        up = sparse_spectrum_to_real(self.b_coefficients, self.b_positions, self.b_shape)
        return down, up, self.scale

    def size_warning(self) -> str | None:
        out_features, fan_in = self.spec.matrix_shape
        notes = []
        if self.rank > min(out_features, fan_in):
            notes.append(f"rank {self.rank} > min({out_features}, {fan_in})")
        kept = (self.a_coefficients.numel(), self.b_coefficients.numel())
        if kept != (self.n, self.n):
            notes.append(f"n={self.n} clipped to the factors' sizes {kept}")
        return f"FoRA {'; '.join(notes)}" if notes else None

    def extra_repr(self) -> str:
        n = self.a_coefficients.numel()
        return f"{super().extra_repr()}, rank={self.rank}, n={n}, scale={self.scale:g}"
