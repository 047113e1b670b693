"""Fixes for known traps of this stack, applied once when mm_spectral.registration is imported.

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``; since torch 2.6 that
defaults to True and loading or resuming an MMEngine checkpoint fails ("Unsupported
global … HistoryBuffer"). The mmengine modules that call ``torch.load`` (all four loaders
of ``mmengine.runner.checkpoint`` — local, pavi, ceph/petrel, mmcls — and the hub helper)
get a ``torch`` whose ``load`` defaults to ``weights_only=False``: these are checkpoints
the user chose to load. That covers every entry point: --resume, load_from, init_cfg
Pretrained, tools/test.py, the merge tool. An explicit ``weights_only`` is respected.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

import torch

# Every module of mmengine 0.10.7 that calls torch.load (grep "torch.load").
_CHECKPOINT_MODULES = ("mmengine.runner.checkpoint", "mmengine.utils.dl_utils.hub")


class _TorchWithFullLoad(ModuleType):
    """``torch`` as a patched module sees it: everything as is, but ``load`` unpickles."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    @functools.wraps(torch.load)
    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("weights_only", False)
        return torch.load(*args, **kwargs)


def patch_mmengine_torch_load() -> list[str]:
    """Make mmengine's checkpoint loading work on torch >= 2.6 (idempotent).

    Returns the names of the modules that are patched.
    """
    patched = []
    for name in _CHECKPOINT_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is None:
            continue
        if not isinstance(module.torch, _TorchWithFullLoad):
            module.torch = _TorchWithFullLoad()
        patched.append(name)
    return patched
