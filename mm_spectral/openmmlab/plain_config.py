"""The adapter-free config of a merged model: stock OpenMMLab builds it, and without
mm_spectral installed whenever nothing of mm_spectral is left in it."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import mmengine.registry as mm_registries
from mmengine.registry import HOOKS, Registry

from ..flat_adamw import FlatAdamW

PACKAGE = "mm_spectral"
_TYPE_KEYS = ("type", "constructor")  # where configs name registered classes


def plain_config(cfg: Any) -> Any:
    """A copy of ``cfg`` for the merged model.

    Every AdaptedBackbone dict becomes its inner ``backbone`` (at any depth), hooks that
    declare ``needs_adapters`` leave ``custom_hooks``, ``load_from`` / ``resume`` are
    cleared, and a FlexibleRunner ``strategy`` (FSDP / DeepSpeed need a process group; the
    merged model runs on one device) is dropped, and a FlatAdamW optimizer becomes torch's
    AdamW (the same arithmetic). When no class registered by mm_spectral
    is left (e.g. a ResNet backbone),
    ``custom_imports`` loses mm_spectral and ``optim_wrapper`` its adapter-aware
    constructor, so the config runs where mm_spectral is not installed; a registered
    mm_spectral backbone (ConvNeXtV2, TimmViT, InternViT…) or hook keeps the import.
    """

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            if _type_name(node.get("type")) == "AdaptedBackbone":
                return strip(node["backbone"])
            return type(node)({k: strip(v) for k, v in node.items()})
        if isinstance(node, (list, tuple)):
            return type(node)(strip(v) for v in node)
        return node

    plain = copy.deepcopy(cfg)
    plain.model = strip(plain.model)
    hooks = plain.get("custom_hooks") or []
    plain.custom_hooks = [h for h in hooks if not needs_adapters(h)]
    plain.load_from, plain.resume = None, False  # the merged weights are loaded explicitly
    if plain.get("runner_type") in ("FlexibleRunner", "mmengine.FlexibleRunner"):
        plain.pop("runner_type")
        plain.pop("strategy", None)
    optimizer = (plain.get("optim_wrapper") or {}).get("optimizer") or {}
    if _type_name(optimizer.get("type")) == FlatAdamW.__name__:
        optimizer["type"] = "AdamW"  # the same arithmetic, in torch
    used = set(mm_spectral_names(plain))
    constructor = (plain.get("optim_wrapper") or {}).get("constructor")
    if used == {_type_name(constructor)}:  # the constructor alone: MMEngine's default does
        plain.optim_wrapper.pop("constructor")  # the same for a model with nothing frozen
        used = set()
    if not used:
        _drop_import(plain)
    return plain


def needs_adapters(hook_cfg: Mapping[str, Any]) -> bool:
    """Whether the hook a ``custom_hooks`` entry builds declares ``needs_adapters = True``
    (it fails or means nothing on a model without adapters, e.g. a merged one)."""
    kind = hook_cfg.get("type")
    if isinstance(kind, str):
        kind = HOOKS.get(kind)
    return bool(getattr(kind, "needs_adapters", False))


def mm_spectral_names(cfg: Any) -> Iterator[str]:
    """Names of classes registered by mm_spectral that ``cfg`` builds (``type=`` or
    ``constructor=`` anywhere in it)."""
    ours = _registered_names()

    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, Mapping):
            for key, value in node.items():
                if key in _TYPE_KEYS and _is_ours(value, ours):
                    yield _type_name(value)
                yield from walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                yield from walk(value)

    yield from walk(cfg._cfg_dict if hasattr(cfg, "_cfg_dict") else cfg)


def _drop_import(cfg: Any) -> None:
    imports = cfg.get("custom_imports")
    if not imports:
        return
    names = imports.get("imports", [])
    names = [names] if isinstance(names, str) else list(names)
    kept = [n for n in names if n != PACKAGE and not n.startswith(f"{PACKAGE}.")]
    if kept:
        imports["imports"] = kept
    else:
        cfg.pop("custom_imports")


def _registered_names() -> set[str]:
    """Every name mm_spectral registered in MMEngine's root registries."""
    names = set()
    for registry in vars(mm_registries).values():
        if isinstance(registry, Registry):
            names |= {
                name
                for name, obj in registry.module_dict.items()
                if getattr(obj, "__module__", "").split(".")[0] == PACKAGE
            }
    return names


def _is_ours(kind: Any, ours: set[str]) -> bool:
    if isinstance(kind, str):
        return kind in ours  # a scoped name ('mmdet.ResNet') is a toolbox's
    return getattr(kind, "__module__", "").split(".")[0] == PACKAGE


def _type_name(kind: Any) -> str | None:
    return kind if isinstance(kind, str) or kind is None else getattr(kind, "__name__", None)
