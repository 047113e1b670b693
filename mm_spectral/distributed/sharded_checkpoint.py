"""Reading sharded checkpoints: a directory of ``rank{i}.pth`` files, one per rank, as
MMEngine's ``FSDPStrategy`` writes with its default ``state_dict_cfg='local'``.

Each file holds that rank's local FSDP state dict. With ``use_orig_params=True`` every
original parameter appears under its plain name as the rank's 1-D slice of it (FSDP
shards the flattened parameters contiguously, in rank order, so the slices concatenate
to the whole parameter); buffers appear whole in every file; ``*._flat_param`` entries
are ShardedTensors, which unpickle only inside a process group of the same size, so they
are read as placeholders here and dropped. The shapes come from the model the state will
be loaded into (``like``): a checkpoint does not record them.
"""

from __future__ import annotations

import os
import pickle
import re
import types
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.distributed._shard.sharded_tensor import ShardedTensor

RANK_FILE = re.compile(r"rank(\d+)\.pth")


def rank_files(directory: str | os.PathLike) -> list[str]:
    """``rank0.pth`` … ``rank{N-1}.pth`` of a sharded checkpoint, in rank order."""
    directory = os.fspath(directory)
    found = {}
    for name in os.listdir(directory):
        match = RANK_FILE.fullmatch(name)
        if match:
            found[int(match.group(1))] = os.path.join(directory, name)
    if not found or sorted(found) != list(range(len(found))):
        raise ValueError(
            f"{directory} is not a sharded checkpoint: expected rank0.pth … rank{{N-1}}.pth, "
            f"found ranks {sorted(found)}"
        )
    return [found[rank] for rank in range(len(found))]


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory with ``rank0.pth`` (a sharded checkpoint)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "rank0.pth"))


class _FlatShardPlaceholder(torch.Tensor):
    """Stands in for a ShardedTensor (a ``_flat_param``) read without a process group.
    Carries nothing: the same values are in the per-parameter slices of the file."""

    ProcessGroupState = ShardedTensor.ProcessGroupState  # pickled as its attribute

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ARG003
        raise RuntimeError("a ShardedTensor read from a sharded checkpoint holds no data here")

    def __setstate__(self, state: Any) -> None:
        pass


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name == "ShardedTensor" and module.startswith("torch.distributed._shard"):
            return _FlatShardPlaceholder
        return super().find_class(module, name)


_PICKLE = types.SimpleNamespace(Unpickler=_Unpickler, load=pickle.load, __name__="pickle")


def load_rank_file(path: str | os.PathLike) -> dict[str, Any]:
    """One rank's file, memory-mapped and fully unpickled (it holds MMEngine objects: only
    read files you trust), ShardedTensors replaced by placeholders."""
    return torch.load(
        path, map_location="cpu", weights_only=False, mmap=True, pickle_module=_PICKLE
    )


def unshard_state(
    rank_states: Sequence[Mapping[str, Tensor]], like: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The full state dict of ``like``'s keys from per-rank local state dicts.

    A key whose rank-0 tensor already has the full shape (a buffer, an unsharded
    parameter) is taken from rank 0, as a full checkpoint would hold it; any other key
    must be 1-D slices on every rank that concatenate, in rank order, to the full size.
    """
    state, problems = {}, []
    for key, ref in like.items():
        parts = [rs.get(key) for rs in rank_states]
        if any(p is None for p in parts):
            missing = [r for r, p in enumerate(parts) if p is None]
            problems.append(f"'{key}' is missing from the files of ranks {missing}")
        elif parts[0].shape == ref.shape:
            state[key] = parts[0]
        elif all(p.dim() == 1 for p in parts) and sum(p.numel() for p in parts) == ref.numel():
            state[key] = torch.cat(parts).reshape(ref.shape)
        else:
            sizes = [tuple(p.shape) for p in parts]
            problems.append(
                f"'{key}': shards {sizes} do not make the model's {tuple(ref.shape)} "
                "(another model, a missing rank file, or use_orig_params=False?)"
            )
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"cannot rebuild the full state from the shards:\n  {shown}{more}")
    return state


def read_sharded_checkpoint(
    directory: str | os.PathLike, like: Mapping[str, Tensor]
) -> dict[str, Any]:
    """A sharded checkpoint as a full one: ``{'state_dict': full tensors of like's keys,
    'meta': rank 0's meta, 'sharded_from': number of ranks}`` (no optimizer state)."""
    files = [load_rank_file(path) for path in rank_files(directory)]
    states = [f.get("state_dict", f) for f in files]
    return dict(
        state_dict=unshard_state(states, like),
        meta=dict(files[0].get("meta", {})),
        sharded_from=len(files),
    )


def sharded_checkpoint_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """Rank 0's ``meta`` of a sharded checkpoint (epoch, iter, cfg, …)."""
    return dict(load_rank_file(rank_files(directory)[0]).get("meta", {}))
