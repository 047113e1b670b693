"""‖ΔW‖_F and the feature amplification factor of a model's adapters (pure PyTorch).

Amplification (FLoRA paper §5.2 / Fig. 4, after LoRA §7.3): ‖ΔW‖_F / ‖Uᵀ W V‖_F with U, V
the top-r left / right singular vectors of ΔW, seen as the matrix (out, fan_in): how much
ΔW amplifies directions that the frozen W itself barely uses.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .adapters.base import BaseAdapter
from .state import adapted_layers

DEFAULT_RANK = 16  # for adapters without a rank (FourierFT)


def top_singular_vectors(
    matrix: Tensor, rank: int, oversample: int = 4, power_iters: int = 2
) -> tuple[Tensor, Tensor]:
    """(U (m, r), V (n, r)): the top-``rank`` singular vectors of a float32 ``matrix``.

    Exact SVD for small matrices; otherwise a randomized range finder with a fixed
    private generator (deterministic, and the training RNG stays untouched).
    """
    m, n = matrix.shape
    rank = max(1, min(rank, m, n))
    q = rank + oversample
    if q >= min(m, n) or min(m, n) <= 64:
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], vh[:rank].mT
    gen = torch.Generator(device=matrix.device).manual_seed(0)
    probe = torch.randn(n, q, generator=gen, device=matrix.device, dtype=matrix.dtype)
    basis = torch.linalg.qr(matrix @ probe).Q
    for _ in range(power_iters):  # sharpens the spectrum's decay
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.mT @ basis).Q).Q
    u_small, _, vh = torch.linalg.svd(basis.mT @ matrix, full_matrices=False)
    return (basis @ u_small)[:, :rank], vh[:rank].mT


def amplification(delta: Tensor, weight: Tensor, rank: int) -> float:
    """‖ΔW‖_F / ‖Uᵀ W V‖_F for the top-``rank`` singular directions of ΔW (2-D, float32)."""
    u, v = top_singular_vectors(delta, rank)
    projected = torch.linalg.matrix_norm(u.mT @ weight @ v)
    return (torch.linalg.matrix_norm(delta) / projected.clamp_min(1e-12)).item()


def _adapter_of(layer: torch.nn.Module) -> BaseAdapter:
    """The layer's adapter itself, also when a wrapper holds it (an FSDP unit, whose own
    ``rank`` attribute, the process rank, would shadow the adapter's)."""
    return next(m for m in layer.adapter.modules() if isinstance(m, BaseAdapter))


@torch.no_grad()
def delta_stats(model: torch.nn.Module, default_rank: int = DEFAULT_RANK) -> dict[str, float]:
    """{'delta_norm': mean ‖ΔW‖_F, 'delta_amplification': mean factor over layers with
    ΔW ≠ 0} over the adapted layers of ``model`` (keys absent when undefined)."""
    norms, amps = [], []
    for _, layer in adapted_layers(model):
        shape = layer.adapter.spec.matrix_shape
        delta = layer.delta_weight().float().reshape(shape)
        weight = layer.weight.float().reshape(shape)
        if layer.merged:
            weight = weight - delta
        norm = torch.linalg.matrix_norm(delta).item()
        norms.append(norm)
        if norm > 0:
            rank = getattr(_adapter_of(layer), "rank", None) or min(default_rank, *shape)
            amps.append(amplification(delta, weight, int(rank)))
    stats = {}
    if norms:
        stats["delta_norm"] = sum(norms) / len(norms)
    if amps:
        stats["delta_amplification"] = sum(amps) / len(amps)
    return stats
