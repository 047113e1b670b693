"""Handing an adapter a prebuilt result (its ΔW or factors) for its next forward.

Used by :func:`mm_spectral.adapters.batched_spectra.enable_batched_spectra`, which builds
many adapters' spectra in one batched call before the model runs. A stash is taken at
most once and only while the adapter's parameters are unchanged (their version counters,
bumped by every in-place update such as an optimizer step), so a stash left over by a
forward that skipped the layer can never be read after the parameters moved.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_STASH = "_prebuilt_stash"


def _versions(adapter: nn.Module) -> tuple[int, ...]:
    return tuple(p._version for p in adapter.parameters())


def stash(adapter: nn.Module, value: Any) -> None:
    """Hand ``adapter`` a prebuilt result, valid while its parameters are unchanged."""
    adapter.__dict__[_STASH] = (value, _versions(adapter))


def take_stash(adapter: nn.Module) -> Any | None:
    """The result handed to ``adapter`` (once), or None if there is none or it is stale.

    None while ``torch.compile`` traces: a compiled model builds its own spectra (batched
    builds are refused with compile), and a dict pop would break the traced graph.
    """
    if torch.compiler.is_compiling():
        return None
    entry = adapter.__dict__.pop(_STASH, None)
    if entry is None:
        return None
    value, versions = entry
    return value if versions == _versions(adapter) else None
