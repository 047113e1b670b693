"""OpenMMLab checkpoints: adapter-only files, and merging into plain checkpoints + configs.

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
from collections.abc import Mapping
from typing import Any

from mmengine.registry import HOOKS
from torch import Tensor, nn

from ..distributed import clean_name, is_sharded_checkpoint, read_sharded_checkpoint
from ..state import (
    atomic_save,
    is_adapter_key,
    load_adapter_state_dict,
    load_checkpoint_file,
    merged_state_dict,
)
from .adapted_backbone import adapted_backbones
from .scope import build_model

ADAPTER_STATE_KEY = "adapter_state_dict"


def frozen_backbone_keys(model: nn.Module) -> set[str]:
    """State-dict keys of frozen, non-adapter parameters inside AdaptedBackbone-built modules."""
    keys: set[str] = set()
    for prefix, backbone in adapted_backbones(model).items():
        head = f"{prefix}." if prefix else ""
        keys |= {
            clean_name(head + n)
            for n, p in backbone.named_parameters()
            if not p.requires_grad and not is_adapter_key(n)
        }
    return keys


def adapter_checkpoint(
    model: nn.Module,
    meta: Mapping[str, Any] | None = None,
    state: Mapping[str, Tensor] | None = None,
) -> dict:
    """{'adapter_state_dict', 'state_dict' (all but frozen backbone weights), 'meta'}.

    ``state``: those tensors already gathered (a sharded model's, see
    :func:`mm_spectral.openmmlab.distributed.trainable_state`); else read from ``model``.
    """
    frozen = frozen_backbone_keys(model)
    if state is None:
        state = model.state_dict()
    state = {k: v.detach().cpu() for k, v in state.items() if k not in frozen}
    adapters = {k: v for k, v in state.items() if is_adapter_key(k)}  # same tensors: once
    meta = dict(meta or {}, adapter_only=True)
    return {ADAPTER_STATE_KEY: adapters, "state_dict": state, "meta": meta}


def save_adapter_checkpoint(
    model: nn.Module,
    path: str,
    meta: Mapping[str, Any] | None = None,
    state: Mapping[str, Tensor] | None = None,
) -> None:
    """Write :func:`adapter_checkpoint` of ``model`` to ``path`` (atomically)."""
    atomic_save(adapter_checkpoint(model, meta, state), path)


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


def plain_config(cfg: Any) -> Any:
    """A copy of ``cfg`` with every AdaptedBackbone dict replaced by its inner ``backbone``
    (at any depth), the hooks that declare ``needs_adapters`` dropped from
    ``custom_hooks``, no ``load_from`` / ``resume``, and no FlexibleRunner ``strategy``
    (FSDP / DeepSpeed need a process group: the merged model runs on one device)."""

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
    plain.custom_hooks = [h for h in hooks if not needs_adapters(h)]
    plain.load_from, plain.resume = None, False  # the merged weights are loaded explicitly
    if plain.get("runner_type") in ("FlexibleRunner", "mmengine.FlexibleRunner"):
        plain.pop("runner_type")
        plain.pop("strategy", None)
    return plain


def needs_adapters(hook_cfg: Mapping[str, Any]) -> bool:
    """Whether the hook a ``custom_hooks`` entry builds declares ``needs_adapters = True``
    (it fails or means nothing on a model without adapters, e.g. a merged one)."""
    kind = hook_cfg.get("type")
    if isinstance(kind, str):
        kind = HOOKS.get(kind)
    return bool(getattr(kind, "needs_adapters", False))


def require_pretrained_base(model: nn.Module) -> None:
    """Raise unless every adapted backbone loads its base weights from a Pretrained init_cfg."""
    for prefix, backbone in adapted_backbones(model).items():
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

    ``checkpoint`` (a path or a loaded dict) is a full training checkpoint, an adapter-only
    one, whose base weights then come from the config's pretrained init_cfg, or a sharded
    one (a directory of ``rank{i}.pth``, FSDP's ``state_dict_cfg='local'``).
    """
    model = build_model(cfg)
    if isinstance(checkpoint, str) and is_sharded_checkpoint(checkpoint):
        checkpoint = read_sharded_checkpoint(checkpoint, like=model.state_dict())
    ckpt = load_checkpoint_file(checkpoint) if isinstance(checkpoint, str) else checkpoint
    if is_adapter_checkpoint(ckpt):
        require_pretrained_base(model)
        model.init_weights()
        load_adapter_checkpoint(model, ckpt)
    else:
        model.load_state_dict(ckpt.get("state_dict", ckpt), strict=True)
    return merged_state_dict(model), plain_config(cfg)
