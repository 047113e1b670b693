"""What the hooks read from a model that may be sharded (FSDP) or replicated (DDP).

Under FSDP these gather, so every rank must call them (a hook that acts on rank 0 only
still runs them everywhere); elsewhere they read the unwrapped model and communicate
nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from mmengine.dist import broadcast_object_list, get_rank
from torch import Tensor, nn

from ...distributed import (
    clean_name,
    full_numels,
    full_parameters,
    full_tensors,
    is_fsdp,
    unit_summary,
)
from ...report import trainable_report
from ...state import finite_folds, is_adapter_key
from ..checkpoint import frozen_backbone_keys
from .base import unwrap


def gather_target(model: nn.Module) -> nn.Module:
    """What :mod:`mm_spectral.distributed` reads: the FSDP root itself (it gathers through
    it), else the model inside DDP / MMEngine wrappers."""
    return model if is_fsdp(model) else unwrap(model)


def trainable_table(model: nn.Module) -> str:
    """The trainable-parameter table of a (wrapped) model with unsharded counts, plus the
    FSDP units by kind under FSDP. Every rank must call it under FSDP."""
    numels = full_numels(model)
    table = trainable_report(unwrap(model), numel=lambda p: numels.get(id(p), p.numel()))
    return table + ("\n" + unit_summary(model, numels) if is_fsdp(model) else "")


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """Under FSDP: the tensors an adapter-only checkpoint holds (all but the frozen
    backbone weights), whole, on rank 0 ({} elsewhere). Every rank must call it."""
    frozen = frozen_backbone_keys(unwrap(model))
    return full_tensors(gather_target(model), keep=lambda key: key not in frozen)


@torch.no_grad()
def merged_full_state(model: nn.Module) -> dict[str, Tensor]:
    """Under FSDP: the plain state dict with every ΔW folded in, on rank 0 ({} elsewhere),
    as :func:`mm_spectral.merged_state_dict` gives for an unsharded model."""
    state = full_tensors(gather_target(model))
    with full_parameters(model):  # folding needs whole adapter tensors
        folds = finite_folds(unwrap(model)) if get_rank() == 0 else {}
    for name, fold in folds.items():
        prefix = clean_name(f"{name}.") if name else ""
        if fold.weight is not None:
            state[f"{prefix}weight"] = fold.weight.detach().cpu()
        if fold.bias is not None:
            state[f"{prefix}bias"] = fold.bias.detach().cpu()
    return {k: v for k, v in state.items() if not is_adapter_key(k)}


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (for decisions that lead into collectives)."""
    box = [obj]
    broadcast_object_list(box)
    return box[0]
