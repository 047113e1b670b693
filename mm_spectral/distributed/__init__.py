"""Multi-process training helpers, PyTorch only: FSDP-aware tensor access (full tensors
and parameter counts from sharded models, plain names), an auto-wrap policy that keeps
frozen and trainable parameters in separate FSDP units, and reading of sharded
(per-rank) checkpoints. Not imported by ``import mm_spectral``; import it explicitly."""

from .fsdp import (
    clean_name,
    fsdp_units,
    full_numels,
    full_parameters,
    full_tensors,
    is_fsdp,
    own_parameters,
    unit_summary,
)
from .sharded_checkpoint import (
    is_sharded_checkpoint,
    read_sharded_checkpoint,
    sharded_checkpoint_meta,
    unshard_state,
)
from .wrap_policy import frozen_apart_wrap_policy

__all__ = [
    "clean_name",
    "frozen_apart_wrap_policy",
    "fsdp_units",
    "full_numels",
    "full_parameters",
    "full_tensors",
    "is_fsdp",
    "is_sharded_checkpoint",
    "own_parameters",
    "read_sharded_checkpoint",
    "sharded_checkpoint_meta",
    "unit_summary",
    "unshard_state",
]
