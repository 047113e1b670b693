"""Checks that every rank holds the same adapters (entries and weights), under DDP, or
under FSDP on the gathered (unsharded) tensors."""

from __future__ import annotations

import torch
from mmengine.dist import all_gather, get_world_size
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ...distributed import full_tensors
from ...state import is_adapter_key
from .gather import gather_target


def _checksum(tensor: torch.Tensor) -> torch.Tensor:
    """(sum, Σ xᵢ·cos(i)) in float64: cheap, and sensitive to order as well as value."""
    flat = tensor.detach().reshape(-1).double()
    weights = torch.arange(flat.numel(), device=flat.device, dtype=torch.float64).cos()
    return torch.stack([flat.sum(), (flat * weights).sum()])


@HOOKS.register_module()
class AdapterSyncCheckHook(Hook):
    """After training, all-gathers float64 checksums of every adapter tensor (spectral
    entries included) and raises if any rank differs; logs the agreement.

    Each tensor gives its sum and a position-weighted sum, so drift, swapped entries and
    reordered indices all show; any difference at all fails (ranks must be bit-identical).
    Under FSDP each rank checks the full tensors gathered from the shards (comparing the
    shards themselves would always fail): replicated buffers such as spectral entries, and
    replicas of hybrid sharding, must agree.
    """

    priority = "LOWEST"
    needs_adapters = True

    @torch.no_grad()
    def after_train(self, runner) -> None:
        state = full_tensors(gather_target(runner.model), keep=is_adapter_key, rank0_only=False)
        sums = torch.stack([_checksum(t) for t in state.values()])
        gathered = all_gather(sums)
        worst = max((g - gathered[0]).abs().max().item() for g in gathered)
        if worst != 0.0:
            raise RuntimeError(f"adapters differ across ranks (max checksum gap {worst:g})")
        runner.logger.info(
            f"AdapterSyncCheckHook: {len(state)} adapter tensors identical on all "
            f"{get_world_size()} ranks after {runner.iter} iterations"
        )
