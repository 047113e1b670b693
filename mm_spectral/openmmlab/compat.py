"""The torch ≥ 2.6 checkpoint-loading fix and atomic checkpoint saving for mmengine
0.10.7, applied explicitly by :mod:`mm_spectral.openmmlab` when it is imported.

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``; since torch 2.6 that
defaults to True and loading or resuming an MMEngine checkpoint fails ("Unsupported
global … HistoryBuffer"). Two parts:

1. Narrow: the types MMEngine checkpoints hold (``HistoryBuffer`` and the numpy arrays,
   scalars and dtypes inside it) are added to ``torch.serialization``'s safe globals, so
   those checkpoints load with ``weights_only=True``. A pickled ``HistoryBuffer`` also
   names its statistics methods through ``getattr``; that name resolves to a getattr that
   only returns those methods of ``HistoryBuffer``.
2. Everything else: the mmengine modules that call ``torch.load`` (its checkpoint loaders
   and hub helper) read through :func:`mm_spectral.state.load_checkpoint_file`, which
   falls back to full unpickling, with a warning naming the global, only for files a
   user named explicitly (``load_from``, ``--resume``, ``init_cfg``); an explicit
   ``weights_only`` is passed through untouched.

Saving: mmengine writes a checkpoint by truncating the final file and writing into it,
so a kill mid-save leaves a truncated ``epoch_N.pth``. :func:`patch_mmengine_save` makes
its ``save_checkpoint`` write local files through :func:`mm_spectral.state.atomic_save`
(a temporary name, then a rename); other backends are left as they are.

Adapter-only files: their ``state_dict`` is a sentence, so mmengine's loader fails on them
where mm_spectral is absent. Where it is imported, :func:`patch_mmengine_adapter_loading`
makes that loader (the Runner's ``load_from`` / ``resume``, ``load_checkpoint``,
inferencers) load them the checked way instead, over the model's Pretrained base.
"""

from __future__ import annotations

import functools
import importlib
import os
import pickle
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ..state import atomic_save, load_checkpoint_file

# Every module of mmengine 0.10.7 that calls torch.load (grep "torch.load").
_CHECKPOINT_MODULES = ("mmengine.runner.checkpoint", "mmengine.utils.dl_utils.hub")
# Modules that bind mmengine.runner.checkpoint._load_checkpoint_to_model at import.
_MODEL_LOADER_MODULES = (
    "mmengine.runner.checkpoint",
    "mmengine.runner.runner",
    "mmengine.infer.infer",
)
# Modules that bind mmengine.runner.checkpoint.save_checkpoint at import (the strategies
# of FlexibleRunner import it when they save, so patching its home module serves them).
_SAVER_MODULES = ("mmengine.runner.checkpoint", "mmengine.runner.runner")


def mmengine_safe_globals() -> list[Any]:
    """The globals an MMEngine checkpoint pickles besides tensors and containers."""
    from mmengine.logging import HistoryBuffer

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    # Numeric and boolean dtypes only: an object array would unpickle arbitrary objects.
    dtypes = {type(np.dtype(t)) for t in np.sctypeDict.values() if np.dtype(t).kind in "biufc"}
    safe: list[Any] = [HistoryBuffer, np.ndarray, np.dtype, *sorted(dtypes, key=str)]
    safe += [
        (_history_buffer_getattr, name) for name in ("builtins.getattr", "__builtin__.getattr")
    ]
    for name in ("_reconstruct", "scalar"):
        func = getattr(multiarray, name)
        safe.append(func)
        # numpy 1.x pickles name numpy.core, numpy 2.x numpy._core: accept both.
        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            safe.append((func, f"{module}.{name}"))
    return safe


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """``getattr`` as a pickled HistoryBuffer uses it: its registered statistics methods."""
    from mmengine.logging import HistoryBuffer

    if obj is HistoryBuffer and name in HistoryBuffer._statistics_methods:
        return getattr(obj, name)
    raise pickle.UnpicklingError(f"getattr({obj!r}, {name!r}) is not allowed in a checkpoint")


class _TorchWithCheckedLoad(ModuleType):
    """``torch`` as a patched module sees it: everything as is, but ``load`` goes through
    :func:`load_checkpoint_file` unless the caller chose ``weights_only`` itself."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    @functools.wraps(torch.load)
    def load(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return torch.load(f, map_location, *args, **kwargs)
        return load_checkpoint_file(f, map_location, trusted=True)


def patch_mmengine_torch_load() -> list[str]:
    """Make mmengine's checkpoint loading work on torch >= 2.6 (idempotent).

    Returns the names of the modules that are patched.
    """
    torch.serialization.add_safe_globals(mmengine_safe_globals())
    patched = []
    for name in _CHECKPOINT_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is None:
            continue
        if not isinstance(module.torch, _TorchWithCheckedLoad):
            module.torch = _TorchWithCheckedLoad()
        patched.append(name)
    return patched


def patch_mmengine_save() -> list[str]:
    """Make mmengine's ``save_checkpoint`` write local files atomically (idempotent).

    Returns the names of the modules whose ``save_checkpoint`` is the atomic one.
    """

    def make(original: Callable) -> Callable:
        def save_checkpoint(checkpoint, filename, file_client_args=None, backend_args=None):
            if file_client_args is None and backend_args is None and _is_local(filename):
                return atomic_save(checkpoint, filename)
            return original(checkpoint, filename, file_client_args, backend_args)

        return save_checkpoint

    return _replace("save_checkpoint", _SAVER_MODULES, make)


def _is_local(filename: Any) -> bool:
    return isinstance(filename, (str, os.PathLike)) and "://" not in os.fspath(filename)


def patch_mmengine_adapter_loading() -> list[str]:
    """Let mmengine's ``_load_checkpoint_to_model`` load adapter-only checkpoints through
    :func:`~mm_spectral.openmmlab.checkpoint.load_adapter_checkpoint` (idempotent).

    Returns the names of the modules whose ``_load_checkpoint_to_model`` is patched.
    """
    from .checkpoint import is_adapter_checkpoint, load_adapter_checkpoint

    def make(original: Callable) -> Callable:
        def _load_checkpoint_to_model(model, checkpoint, *args: Any, **kwargs: Any):
            if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), str):
                if is_adapter_checkpoint(checkpoint):
                    load_adapter_checkpoint(model, checkpoint, source="the adapter-only checkpoint")
                    return checkpoint
            return original(model, checkpoint, *args, **kwargs)

        return _load_checkpoint_to_model

    return _replace("_load_checkpoint_to_model", _MODEL_LOADER_MODULES, make)


def _replace(
    attr: str, modules: tuple[str, ...], make: Callable[[Callable], Callable]
) -> list[str]:
    """Replace the function ``attr`` of ``mmengine.runner.checkpoint`` by ``make(original)``
    in ``modules`` and in the already imported strategies that bind it (idempotent: the
    replacement keeps the original as ``__wrapped__``). Returns the modules patched."""
    current = getattr(importlib.import_module("mmengine.runner.checkpoint"), attr)
    if getattr(current, "_mm_spectral", False):
        original, replacement = current.__wrapped__, current
    else:
        original = current
        replacement = functools.wraps(original)(make(original))
        replacement._mm_spectral = True  # type: ignore[attr-defined]
    patched = []
    for name in modules:
        setattr(importlib.import_module(name), attr, replacement)
        patched.append(name)
    for name, module in list(sys.modules.items()):  # FlexibleRunner strategies bind it too
        if name.startswith("mmengine._strategy") and getattr(module, attr, None) is original:
            setattr(module, attr, replacement)
            patched.append(name)
    return patched
