"""The torch ≥ 2.6 checkpoint-loading fix for mmengine 0.10.7, applied explicitly by
:mod:`mm_spectral.openmmlab` when it is imported.

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
"""

from __future__ import annotations

import functools
import importlib
import pickle
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ..state import load_checkpoint_file

# Every module of mmengine 0.10.7 that calls torch.load (grep "torch.load").
_CHECKPOINT_MODULES = ("mmengine.runner.checkpoint", "mmengine.utils.dl_utils.hub")


def mmengine_safe_globals() -> list[Any]:
    """The globals an MMEngine checkpoint pickles besides tensors and containers."""
    from mmengine.logging import HistoryBuffer

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    # Numeric and boolean dtypes only: an object array would unpickle arbitrary objects.
    dtypes = {type(np.dtype(t)) for t in np.sctypeDict.values() if np.dtype(t).kind in "biufc"}
    safe: list[Any] = [HistoryBuffer, np.ndarray, np.dtype, *sorted(dtypes, key=str)]
    safe += [(_history_buffer_getattr, name) for name in ("builtins.getattr", "__builtin__.getattr")]
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
