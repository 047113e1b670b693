"""Handing an adapter a prebuilt result (its ΔW or factors) for its next forward.

Used by :func:`mm_spectral.adapters.batched_spectra.enable_batched_spectra`, which builds
many adapters' spectra in one batched call, made by the first of them to run (its
*builder*). A stash is taken at most once and only while the adapter's parameters are
unchanged (their version counters, bumped by every in-place update such as an optimizer
step), so a stash left over by a forward that skipped the layer can never be read after the
parameters moved; nor is one built without gradient (a reentrant checkpoint's first pass)
taken where gradients are on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

_STASH = "_prebuilt_stash"
_BUILDER = "_stash_builder"
# Set on a low-rank linear's adapter by each plan: whether its stash holds its whole weight
# change (it then steps as W0 + ΔW) rather than what its own path takes (factors).
WHOLE_DELTA = "_whole_delta_planned"
# The tokens a low-rank linear saw in its last forward (what the next plan decides by).
TOKENS = "_last_tokens"


def _versions(adapter: nn.Module) -> list[int]:
    """The version counters of ``adapter``'s parameters, its children's included.

    Read twice per adapter and step, so through ``_parameters`` / ``_modules`` directly:
    ``adapter.parameters()`` (a generator with a de-duplication set) cost about 5 times as
    much host time, 1 ms per step for ViT-L's 96 FLoRA layers on this project's CPU.
    """
    versions = [p._version for p in adapter._parameters.values() if p is not None]
    for child in adapter._modules.values():
        if child is not None:
            versions += _versions(child)
    return versions


def stash(adapter: nn.Module, value: Any) -> None:
    """Hand ``adapter`` a prebuilt result, valid while its parameters are unchanged."""
    stash_all((adapter,), (value,))


def stash_all(adapters: Iterable[nn.Module], values: Iterable[Any]) -> None:
    """:func:`stash` each value in its adapter (a batched build's results), the grad mode
    read once: per member this ran once for every layer of the model and step."""
    with_grad = torch.is_grad_enabled()
    for adapter, value in zip(adapters, values):
        state = adapter.__dict__
        state.pop(_BUILDER, None)
        state[_STASH] = (value, _versions(adapter), with_grad)


def stash_builder(adapter: nn.Module, build: Callable[[], None]) -> None:
    """Register ``build``, which stashes ``adapter``'s result (and its batch-mates'),
    to run when the adapter first asks for its result; drops an earlier stash."""
    adapter.__dict__.pop(_STASH, None)
    adapter.__dict__[_BUILDER] = build


def take_stash(adapter: nn.Module) -> Any | None:
    """The result handed to ``adapter`` (once, built now if only its builder is there), or
    None if there is none or it is stale.

    None while ``torch.compile`` traces: a compiled model builds its own spectra (batched
    builds are refused with compile), and a dict pop would break the traced graph.
    """
    if torch.compiler.is_compiling():
        return None
    return take_stash_eagerly(adapter)


def take_stash_eagerly(adapter: nn.Module) -> Any | None:
    """:func:`take_stash` for a caller that already knows no ``torch.compile`` trace is
    running (one check less per layer and step)."""
    entry = adapter.__dict__.pop(_STASH, None)
    if entry is None:
        build = adapter.__dict__.pop(_BUILDER, None)
        if build is None:
            return None
        build()
        entry = adapter.__dict__.pop(_STASH, None)
        if entry is None:
            return None
    value, versions, with_grad = entry
    if versions != _versions(adapter) or (torch.is_grad_enabled() and not with_grad):
        return None
    return value
