"""Checkpoints: adapter-only files, and merging adapters into plain checkpoints + configs.

An adapter-only checkpoint holds everything training changed — adapter tensors (spectral
entries included), necks, heads, ``trainable`` backbone parameters and buffers — but not
the frozen backbone weights, which come back from the config's pretrained ``init_cfg``.
Its ``state_dict`` also loads through MMEngine's ``load_from`` (strict=False).

``merge_checkpoint`` is a pure function of (config, checkpoint): the result loads with
``strict=True`` into the model of the adapter-free config, which stock OpenMMLab
inference runs unchanged.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .inject import (
    adapted_layers,
    adapter_state_dict,
    load_adapter_state_dict,
    merge,
    remove_adapters,
)

ADAPTER_STATE_KEY = "adapter_state_dict"
ADAPTER_HOOKS = ("AdapterHook", "DeltaStatsHook")


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key belongs to an adapter ('<layer>.adapter.<tensor>')."""
    return ".adapter." in f".{key}"


def _adapted_backbones(model: nn.Module) -> dict[str, nn.Module]:
    from .models.adapted_backbone import adapted_backbones  # needs mmengine

    return adapted_backbones(model)


def frozen_backbone_keys(model: nn.Module) -> set[str]:
    """State-dict keys of frozen, non-adapter parameters inside AdaptedBackbone-built modules."""
    keys: set[str] = set()
    for prefix, backbone in _adapted_backbones(model).items():
        head = f"{prefix}." if prefix else ""
        keys |= {
            head + n
            for n, p in backbone.named_parameters()
            if not p.requires_grad and not is_adapter_key(n)
        }
    return keys


def adapter_checkpoint(model: nn.Module, meta: Mapping[str, Any] | None = None) -> dict:
    """{'adapter_state_dict', 'state_dict' (all but frozen backbone weights), 'meta'}."""
    frozen = frozen_backbone_keys(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in frozen}
    adapters = {k: state[k] for k in adapter_state_dict(model)}  # same tensors: stored once
    meta = dict(meta or {}, adapter_only=True)
    return {ADAPTER_STATE_KEY: adapters, "state_dict": state, "meta": meta}


def save_adapter_checkpoint(
    model: nn.Module, path: str, meta: Mapping[str, Any] | None = None
) -> None:
    """Write :func:`adapter_checkpoint` of ``model`` to ``path``."""
    torch.save(adapter_checkpoint(model, meta), path)


def load_checkpoint_file(path: str) -> dict:
    """A checkpoint this project or MMEngine wrote (full unpickling: the user chose it)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def is_adapter_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    return ADAPTER_STATE_KEY in checkpoint


def load_adapter_checkpoint(model: nn.Module, checkpoint: str | Mapping[str, Any]) -> dict:
    """Load an adapter-only checkpoint (path or loaded dict) into ``model``; return its meta.

    Adapter tensors are checked layer by layer; the other tensors must all exist in the
    model. Frozen backbone weights are left as they are (load the pretrained ones first).
    """
    ckpt = load_checkpoint_file(checkpoint) if isinstance(checkpoint, str) else checkpoint
    if not is_adapter_checkpoint(ckpt):
        raise ValueError("not an adapter-only checkpoint (no 'adapter_state_dict')")
    adapters = ckpt[ADAPTER_STATE_KEY]
    load_adapter_state_dict(model, adapters)
    rest = {k: v for k, v in ckpt.get("state_dict", {}).items() if k not in adapters}
    unknown = sorted(set(rest) - set(model.state_dict()))
    if unknown:
        raise ValueError(f"checkpoint tensors the model does not have: {unknown[:20]}")
    model.load_state_dict(rest, strict=False)
    return dict(ckpt.get("meta", {}))


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The plain state dict with every ΔW folded in, leaving ``model`` untouched."""
    state = model.state_dict()
    for name, layer in adapted_layers(model):
        if not layer.merged:
            delta = layer.adapter.delta_weight()
            if not torch.isfinite(delta).all():
                raise ValueError(f"ΔW of layer '{name}' is not finite; nothing merged")
            key = f"{name}.weight" if name else "weight"
            state[key] = state[key] + delta
    adapter_keys = set(adapter_state_dict(model))
    return {k: v.detach().cpu() for k, v in state.items() if k not in adapter_keys}


def plain_config(cfg: Any) -> Any:
    """A copy of ``cfg`` with every AdaptedBackbone dict replaced by its inner ``backbone``
    (at any depth), the hooks that need adapters dropped from ``custom_hooks``, and no
    ``load_from`` / ``resume``."""

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            kind = node.get("type")
            if kind == "AdaptedBackbone" or getattr(kind, "__name__", None) == "AdaptedBackbone":
                return strip(node["backbone"])
            return type(node)({k: strip(v) for k, v in node.items()})
        if isinstance(node, (list, tuple)):
            return type(node)(strip(v) for v in node)
        return node

    plain = copy.deepcopy(cfg)
    plain.model = strip(plain.model)
    hooks = plain.get("custom_hooks") or []
    plain.custom_hooks = [h for h in hooks if h.get("type") not in ADAPTER_HOOKS]
    plain.load_from, plain.resume = None, False  # the merged weights are loaded explicitly
    return plain


def build_model(cfg: Any) -> nn.Module:
    """Build ``cfg.model`` on the CPU through the registry of the config's default_scope."""
    from mmengine.registry import DefaultScope

    from .registration import init_toolbox

    scope = cfg.get("default_scope")
    init_toolbox(scope)
    registry = importlib.import_module(f"{scope or 'mmengine'}.registry").MODELS
    with DefaultScope.overwrite_default_scope(scope):
        return registry.build(copy.deepcopy(cfg.model))


def require_pretrained_base(model: nn.Module) -> None:
    """Raise unless every adapted backbone loads its base weights from a Pretrained init_cfg."""
    for prefix, backbone in _adapted_backbones(model).items():
        init_cfg = getattr(backbone, "init_cfg", None) or []
        init_cfgs = [init_cfg] if isinstance(init_cfg, Mapping) else list(init_cfg)
        if not any(c.get("type") == "Pretrained" for c in init_cfgs):
            raise ValueError(
                f"an adapter-only checkpoint needs the base weights of '{prefix}' from its "
                "init_cfg=dict(type='Pretrained', ...), and the config has none: merge the "
                "full checkpoint (epoch_N.pth / iter_N.pth) instead"
            )


def merge_checkpoint(
    cfg: Any, checkpoint: str | Mapping[str, Any]
) -> tuple[dict[str, Tensor], Any]:
    """(plain state dict with every ΔW folded in, adapter-free config) of a trained model.

    ``checkpoint`` (a path or a loaded dict) is a full training checkpoint, or an
    adapter-only one, whose base weights then come from the config's pretrained init_cfg.
    """
    model = build_model(cfg)
    ckpt = load_checkpoint_file(checkpoint) if isinstance(checkpoint, str) else checkpoint
    if is_adapter_checkpoint(ckpt):
        require_pretrained_base(model)
        model.init_weights()
        load_adapter_checkpoint(model, ckpt)
    else:
        model.load_state_dict(ckpt.get("state_dict", ckpt), strict=True)
    merge(model)
    remove_adapters(model, merge_first=False)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return state, plain_config(cfg)
