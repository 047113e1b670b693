"""OpenMMLab checkpoints: what each kind records, adapter-only files, merging.

Every checkpoint mm_spectral writes says what it is in ``meta['mm_spectral']``:
``kind`` ('full', 'adapter-only' or 'merged'), the format ``version`` and, per
AdaptedBackbone, the record of its adapters (``backbones``: method, hyper-parameters,
targets, adapted layers). Loading compares that record with the config's model and
refuses a mismatch (:class:`~mm_spectral.provenance.CheckpointMismatch`).

An adapter-only file holds everything training changed (adapters, spectral entries,
necks, heads, ``trainable`` parameters, buffers) and, when written during training, what
resume needs (message hub, optimizer, schedulers, RNG states); not the frozen backbone
weights, whose fingerprint it records instead. Its tensors are under
:data:`ADAPTER_TENSORS_KEY` and its ``state_dict`` is a sentence saying so: stock
loading (``load_from``, ``init_detector``) fails on it instead of running a backbone
without its base weights.

``merge_checkpoint`` is a pure function of (config, checkpoint): the result loads with
``strict=True`` into the model of the adapter-free config, which stock OpenMMLab
inference runs unchanged.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from ..distributed import (
    clean_name,
    is_sharded_checkpoint,
    read_sharded_checkpoint,
)
from ..provenance import (
    CheckpointMismatch,
    base_fingerprint,
    fingerprint_problems,
    record_problems,
)
from ..state import (
    adapted_layers,
    atomic_save,
    atomic_write_text,
    is_adapter_key,
    load_adapter_state_dict,
    load_checkpoint_file,
    merged_state_dict,
)
from .adapted_backbone import ADAPTER_CFG_ATTR, adapted_backbones
from .plain_config import needs_adapters, plain_config
from .scope import build_model

__all__ = [
    "ADAPTER_TENSORS_KEY",
    "CheckpointMismatch",
    "adapter_checkpoint",
    "check_adapter_records",
    "checkpoint_kind",
    "load_adapter_checkpoint",
    "merge_checkpoint",
    "merge_to_files",
    "needs_adapters",
    "plain_config",
    "save_merged",
]

FORMAT_VERSION = 2
META_KEY = "mm_spectral"
ADAPTER_TENSORS_KEY = "mm_spectral_state_dict"
LEGACY_ADAPTER_KEY = "adapter_state_dict"  # format 1: tensors under 'state_dict'
TRAINING_STATE_KEYS = ("message_hub", "optimizer", "param_schedulers", "rng_state")
NOT_A_STATE_DICT = (
    "mm_spectral adapter-only checkpoint: no frozen backbone weights in it; its tensors "
    f"are under '{ADAPTER_TENSORS_KEY}'. Load it over the Pretrained base with mm_spectral "
    "(tools/test.py, AdapterHook in custom_hooks, load_adapter_checkpoint), or use the "
    "full checkpoint."
)


# ------------------------------------------------------------------------ records
def adapter_records(model: nn.Module) -> dict[str, dict]:
    """{AdaptedBackbone prefix: its record (adapter config, adapted layers, …)}."""
    return {
        prefix: copy.deepcopy(getattr(backbone, ADAPTER_CFG_ATTR))
        for prefix, backbone in adapted_backbones(model).items()
    }


def describe(model: nn.Module, kind: str, **extra: Any) -> dict:
    """The ``meta['mm_spectral']`` entry of a checkpoint of ``model``."""
    return dict(kind=kind, version=FORMAT_VERSION, backbones=adapter_records(model), **extra)


def checkpoint_kind(checkpoint: Mapping[str, Any]) -> str | None:
    """'adapter-only', 'merged', 'full', or None for a file mm_spectral did not describe."""
    if LEGACY_ADAPTER_KEY in checkpoint:
        return "adapter-only"
    return (_meta(checkpoint).get(META_KEY) or {}).get("kind")


def is_adapter_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    return checkpoint_kind(checkpoint) == "adapter-only"


def saved_records(meta: Mapping[str, Any]) -> dict[str, dict] | None:
    """The per-backbone records of a checkpoint's meta; format 1 adapter files kept them
    directly under ``meta['mm_spectral']``; None when the file has none."""
    entry = meta.get(META_KEY)
    if not isinstance(entry, Mapping):
        return None
    if "backbones" in entry:
        return dict(entry["backbones"])
    if entry and all(isinstance(r, Mapping) and "adapter" in r for r in entry.values()):
        return dict(entry)
    return None


def check_adapter_records(model: nn.Module, meta: Mapping[str, Any], source: str) -> None:
    """Raise if the checkpoint's adapters were built otherwise than ``model``'s (method,
    hyper-parameters, targets, layers), naming backbone, key and both values. A
    checkpoint without a record (written before they existed) only warns."""
    current = adapter_records(model)
    saved = saved_records(meta)
    if saved is None:
        if current:
            warnings.warn(
                f"{source}: no adapter record in the checkpoint (written before mm_spectral "
                "recorded them); the config's adapter hyper-parameters are not checked",
                stacklevel=2,
            )
        return
    problems = []
    for prefix in sorted(set(saved) | set(current)):
        where = f"backbone '{prefix}'"
        if prefix not in current:
            problems.append(
                f"{where}: built by AdaptedBackbone in the checkpoint, not in the config"
            )
        elif prefix not in saved:
            problems.append(
                f"{where}: built by AdaptedBackbone in the config, not in the checkpoint"
            )
        else:
            problems += record_problems(saved[prefix], current[prefix], where)
    if problems:
        raise CheckpointMismatch(
            f"{source} was trained with other adapters than the config builds "
            "(nothing was loaded):\n  " + "\n  ".join(problems)
        )


# ------------------------------------------------------------------ adapter-only files
def frozen_backbone_keys(model: nn.Module) -> set[str]:
    """State-dict keys of frozen, non-adapter parameters inside AdaptedBackbone-built modules."""
    keys: set[str] = set()
    for prefix, backbone in adapted_backbones(model).items():
        head = f"{prefix}." if prefix else ""
        keys |= {
            clean_name(head + n)  # under FSDP, names carry its wrappers
            for n, p in backbone.named_parameters()
            if not p.requires_grad and not is_adapter_key(n)
        }
    return keys


def frozen_fingerprint(model: nn.Module) -> dict[str, dict]:
    """:func:`~mm_spectral.provenance.base_fingerprint` of the frozen backbone weights."""
    state = model.state_dict()
    return base_fingerprint({k: state[k] for k in frozen_backbone_keys(model)})


def adapter_checkpoint(
    model: nn.Module,
    meta: Mapping[str, Any] | None = None,
    state_dict: Mapping[str, Tensor] | None = None,
    training_state: Mapping[str, Any] | None = None,
    fingerprint: Mapping[str, dict] | None = None,
) -> dict:
    """The adapter-only checkpoint of ``model`` (see the module docstring).

    ``state_dict`` (default: the model's) is filtered to all but the frozen backbone
    weights; ``training_state`` adds what resume needs (:data:`TRAINING_STATE_KEYS`);
    ``fingerprint`` saves recomputing the frozen weights' fingerprint.
    """
    frozen = frozen_backbone_keys(model)
    source = model.state_dict() if state_dict is None else state_dict
    tensors = {k: v.detach().cpu() for k, v in source.items() if k not in frozen}
    meta = {k: v for k, v in (meta or {}).items() if k not in ("adapter_only", META_KEY)}
    meta[META_KEY] = describe(
        model, "adapter-only", base_fingerprint=dict(fingerprint or frozen_fingerprint(model))
    )
    ckpt = {"meta": meta, ADAPTER_TENSORS_KEY: tensors, "state_dict": NOT_A_STATE_DICT}
    ckpt.update({k: v for k, v in (training_state or {}).items() if k in TRAINING_STATE_KEYS})
    return ckpt


def save_adapter_checkpoint(
    model: nn.Module, path: str, meta: Mapping[str, Any] | None = None
) -> None:
    """Write :func:`adapter_checkpoint` of ``model`` to ``path`` (atomically)."""
    atomic_save(adapter_checkpoint(model, meta), path)


def adapter_tensors(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """The tensors of an adapter-only checkpoint (either format)."""
    if LEGACY_ADAPTER_KEY in checkpoint:
        return dict(checkpoint["state_dict"])
    return dict(checkpoint[ADAPTER_TENSORS_KEY])


def load_adapter_checkpoint(
    model: nn.Module,
    checkpoint: str | Mapping[str, Any],
    allow_other_base: bool = False,
    source: str | None = None,
) -> dict:
    """Load an adapter-only checkpoint (path or loaded dict) into ``model``; return its meta.

    In order, all before anything is loaded: the adapter records must equal the
    model's; the frozen backbone weights must be the recorded base (if they are not,
    ``model.init_weights()`` loads the Pretrained ones first and they are checked
    again; ``allow_other_base=True`` turns a remaining difference into a warning);
    adapter tensors are checked layer by layer and every other tensor must exist in
    the model.
    """
    source = source or (os.fspath(checkpoint) if isinstance(checkpoint, str) else "checkpoint")
    ckpt = load_checkpoint_file(checkpoint) if isinstance(checkpoint, str) else checkpoint
    if not is_adapter_checkpoint(ckpt):
        raise CheckpointMismatch(f"{source} is not an adapter-only checkpoint")
    meta = _meta(ckpt)
    check_adapter_records(model, meta, source)
    tensors = adapter_tensors(ckpt)
    unknown = sorted(set(tensors) - set(model.state_dict()))
    if unknown:
        raise CheckpointMismatch(f"{source}: tensors the model does not have: {unknown[:20]}")
    _ensure_base(
        model, (meta.get(META_KEY) or {}).get("base_fingerprint"), source, allow_other_base
    )
    adapters = {k: v for k, v in tensors.items() if is_adapter_key(k)}
    load_adapter_state_dict(model, adapters)
    model.load_state_dict({k: v for k, v in tensors.items() if k not in adapters}, strict=False)
    return dict(meta)


def _ensure_base(
    model: nn.Module, fingerprint: Mapping[str, dict] | None, source: str, allow_other: bool
) -> None:
    """Make the frozen backbone weights the base the adapters were trained on."""
    problems = None if fingerprint is None else _base_problems(model, fingerprint)
    if problems == []:
        return  # already there (a training run's base, or loaded before)
    require_pretrained_base(model)
    model.init_weights()
    if fingerprint is None:
        return  # format 1: no fingerprint to check
    problems = _base_problems(model, fingerprint)
    if not problems:
        return
    shown = "\n  ".join(problems[:10]) + (
        f"\n  … {len(problems) - 10} more" if len(problems) > 10 else ""
    )
    message = (
        f"{source} was trained on other base weights than the config's Pretrained "
        f"backbone ({len(problems)} of {len(fingerprint)} frozen tensors differ):\n  {shown}"
    )
    if not allow_other:
        raise CheckpointMismatch(
            message + "\nUse the base it was trained on, or pass --allow-other-base "
            "(allow_other_base=True) to apply it anyway."
        )
    warnings.warn(message + "\nApplied anyway (allow_other_base=True).", stacklevel=3)


def _base_problems(model: nn.Module, fingerprint: Mapping[str, dict]) -> list[str]:
    state = model.state_dict()
    return fingerprint_problems(fingerprint, {k: state[k] for k in fingerprint if k in state})


def require_pretrained_base(model: nn.Module) -> None:
    """Raise unless every adapted backbone loads its base weights from a Pretrained init_cfg."""
    for prefix, backbone in adapted_backbones(model).items():
        init_cfg = getattr(backbone, "init_cfg", None) or []
        init_cfgs = [init_cfg] if isinstance(init_cfg, Mapping) else list(init_cfg)
        if not any(c.get("type") == "Pretrained" for c in init_cfgs):
            raise CheckpointMismatch(
                f"an adapter-only checkpoint needs the base weights of '{prefix}' from its "
                "init_cfg=dict(type='Pretrained', ...), and the config has none: use the "
                "full checkpoint (epoch_N.pth / iter_N.pth) instead"
            )


# ------------------------------------------------------------------------- merging
def merge_checkpoint(
    cfg: Any, checkpoint: str | Mapping[str, Any], allow_other_base: bool = False
) -> tuple[dict[str, Tensor], Any]:
    """(plain state dict with every ΔW folded in, adapter-free config) of a trained model.

    ``checkpoint`` (a path or a loaded dict) is a full training checkpoint, an adapter-only
    one, whose base weights then come from the config's pretrained init_cfg, or a sharded
    one (a directory of ``rank{i}.pth``, FSDP's ``state_dict_cfg='local'``).
    Raises :class:`CheckpointMismatch`, changing nothing, when there is nothing to merge
    (a config without adapters, a merged checkpoint) or the checkpoint does not fit.
    """
    state, plain, _ = _merge(cfg, checkpoint, allow_other_base)
    return state, plain


def merge_to_files(
    cfg: Any,
    checkpoint: str | Mapping[str, Any],
    ckpt_path: str,
    cfg_path: str | None = None,
    allow_other_base: bool = False,
    source: str | None = None,
    **provenance: Any,
) -> tuple[dict[str, Tensor], Any]:
    """:func:`merge_checkpoint`, then write the merged checkpoint (meta: the training
    meta, the adapter-free config, what was merged, ``provenance``) and the config.
    ``source`` names a loaded ``checkpoint`` in messages."""
    state, plain, meta = _merge(cfg, checkpoint, allow_other_base, source)
    save_merged(state, plain, merged_meta(meta, plain, **provenance), ckpt_path, cfg_path)
    return state, plain


def _merge(
    cfg: Any, checkpoint: str | Mapping[str, Any], allow_other_base: bool, source: str | None = None
) -> tuple[dict[str, Tensor], Any, dict]:
    """(merged state dict, plain config, the checkpoint's meta with the model's records)."""
    if source is None:
        source = os.fspath(checkpoint) if isinstance(checkpoint, str) else "the checkpoint"
    model = build_model(cfg)
    if not any(True for _ in adapted_layers(model)):
        raise CheckpointMismatch(
            "the config builds no adapters (no AdaptedBackbone with an adapter): nothing to "
            "merge; its checkpoints are plain already"
        )
    if isinstance(checkpoint, str) and is_sharded_checkpoint(checkpoint):
        ckpt = read_sharded_checkpoint(checkpoint, like=model.state_dict())
    elif isinstance(checkpoint, str):
        ckpt = load_checkpoint_file(checkpoint, mmap=True)
    else:
        ckpt = checkpoint
    require_unmerged(ckpt, source)
    if is_adapter_checkpoint(ckpt):
        load_adapter_checkpoint(model, ckpt, allow_other_base, source)
    else:
        check_adapter_records(model, _meta(ckpt), source)
        model.load_state_dict(ckpt.get("state_dict", ckpt), strict=True)
    meta = dict(_meta(ckpt), **{META_KEY: describe(model, "source")})
    return merged_state_dict(model), plain_config(cfg), meta


def require_unmerged(checkpoint: Mapping[str, Any], source: str) -> None:
    """Raise if ``checkpoint`` is a merged one (marked so, or holding no adapter tensor)."""
    if is_adapter_checkpoint(checkpoint):
        return
    state = checkpoint.get("state_dict", checkpoint)
    merged = checkpoint_kind(checkpoint) == "merged"
    if merged or (isinstance(state, Mapping) and not any(is_adapter_key(k) for k in state)):
        origin = (_meta(checkpoint).get(META_KEY) or {}).get("merged_from")
        detail = f" (merged from {origin})" if origin else ""
        raise CheckpointMismatch(
            f"{source} is a merged checkpoint{detail}: its adapters are folded into plain "
            "weights already. Merge the training checkpoint instead, or run this one with its "
            "adapter-free config (meta['cfg'], *_merged.py)"
        )


def merged_meta(meta: Mapping[str, Any], plain_cfg: Any | None, **provenance: Any) -> dict:
    """Meta of a merged checkpoint: the training meta (epoch, iter, dataset_meta, …), the
    adapter-free config as MMEngine writes it (``cfg``: an inferencer given only weights
    builds the model from it) and what was merged (the records in ``meta``)."""
    keep = {k: v for k, v in meta.items() if k not in ("cfg", "adapter_only", META_KEY)}
    records = saved_records(meta) or {}
    entry = dict(kind="merged", version=FORMAT_VERSION, backbones=records, **provenance)
    if plain_cfg is not None:
        keep["cfg"] = plain_cfg.pretty_text
    return dict(keep, **{META_KEY: entry})


def save_merged(
    state: Mapping[str, Tensor],
    plain_cfg: Any | None,
    meta: Mapping[str, Any],
    ckpt_path: str,
    cfg_path: str | None = None,
) -> None:
    """Write the merged checkpoint (and the adapter-free config), each atomically."""
    atomic_save(dict(state_dict=dict(state), meta=dict(meta)), ckpt_path)
    if cfg_path is not None and plain_cfg is not None:
        atomic_write_text(plain_cfg.pretty_text, cfg_path)


def _meta(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = checkpoint.get("meta")
    return meta if isinstance(meta, Mapping) else {}
