"""A model's adapted layers, found by one walk of its module tree and kept while the tree
is unchanged.

The batched builds (:mod:`mm_spectral.adapters.batched_spectra`) are planned before every
forward, and walking ViT-L's ~600 modules was most of that plan's host time (about 1 ms
per step on an H100 host). A kept walk is checked instead: no module anywhere registered
a submodule since (a global ``nn.Module`` registration hook counts them) and every module
the walk passed (all but plain leaves) still has its class and its number of children,
which catches a layer turned back into its plain class, an adapter wrapped as an FSDP
unit, and ``fully_shard`` (which changes classes in place). Removing a module with ``del`` goes unseen: the plan
then builds for a layer that no longer runs, which costs time but changes no result.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

from .base import AdaptedLayerMixin

OTHER, ADAPTED, SHARDED = 0, 1, 2
_KEPT = "_mm_spectral_layer_walk"  # the kept walk, in the walked model's __dict__
_REGISTRATIONS = [0]  # submodules registered anywhere since the hook was installed


@functools.cache
def role(cls: type) -> int:
    """What a module of class ``cls`` is to the walk: an FSDP unit (FSDP1 or
    ``fully_shard``: between its own forwards its parameters are shards, which a build
    before the model's forward must not read), an adapted layer or another module.

    Asked once per class (``fully_shard`` makes a new class per wrapped one): two
    ``isinstance`` checks per module and step cost more than the walk."""
    if issubclass(cls, (FullyShardedDataParallel, FSDPModule)):
        return SHARDED
    return ADAPTED if issubclass(cls, AdaptedLayerMixin) else OTHER


def _count_registration(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
    _REGISTRATIONS[0] += 1


@functools.cache
def _install_hook() -> None:
    """Count every submodule registration from now on (once per process)."""
    nn.modules.module.register_module_module_registration_hook(_count_registration)


class _Walk:
    """One walk's result and what it must find unchanged to stay valid."""

    __slots__ = ("registrations", "passed", "layers")

    def __init__(self, registrations: int) -> None:
        self.registrations = registrations
        # Every module the walk passed but plain leaves (which hold no adapted layer: one
        # that gains a child or becomes adapted registers a module), with its class and
        # child count.
        self.passed: list[tuple[nn.Module, type, int]] = []
        # (layer, adapter) of each adapted layer, in the walk's (last-first) order; None
        # where an FSDP unit sits inside the model.
        self.layers: list[tuple[nn.Module, nn.Module]] | None = []

    def valid(self) -> bool:
        if self.registrations != _REGISTRATIONS[0]:
            return False
        return all(type(m) is cls and len(m._modules) == n for m, cls, n in self.passed)


def _walk(model: nn.Module) -> _Walk:
    walk = _Walk(_REGISTRATIONS[0])
    passed = walk.passed
    passed.append((model, type(model), len(model._modules)))
    stack = list(model._modules.values())
    while stack:
        module = stack.pop()
        if module is None:
            continue
        cls, children = type(module), module._modules
        kind = role(cls)
        if kind == OTHER and not children:
            continue  # a plain leaf: nothing below it to build for
        passed.append((module, cls, len(children)))
        if kind == OTHER:
            stack.extend(children.values())
            continue
        if kind == SHARDED:
            walk.layers = None
            return walk
        adapter = module._modules["adapter"]
        passed.append((adapter, type(adapter), len(adapter._modules)))
        if role(type(adapter)) == SHARDED:  # wrapped as its own unit (frozen_apart_wrap_policy)
            walk.layers = None
            return walk
        walk.layers.append((module, adapter))
    return walk


def adapted_layer_walk(model: nn.Module) -> list[tuple[nn.Module, nn.Module]] | None:
    """(layer, adapter) of every adapted layer below ``model``, last layer first (a layer
    reached twice is listed twice); None where FSDP units sit inside ``model`` (their
    layers build their own). Walks ``_modules`` directly and stops at adapted layers; kept
    on ``model`` between calls while its module tree is unchanged (see the module
    docstring)."""
    _install_hook()
    kept = model.__dict__.get(_KEPT)
    if kept is None or not kept.valid():
        kept = _walk(model)
        model.__dict__[_KEPT] = kept
    return kept.layers
