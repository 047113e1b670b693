"""The hook that guards what trains and keeps adapter-only checkpoints beside full ones."""

from __future__ import annotations

import os
import os.path as osp
import re
from collections.abc import Sequence

import torch
from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from torch import nn

from ...distributed import clean_name, full_tensors, is_fsdp
from ...provenance import base_fingerprint
from ...state import adapted_layers, atomic_save, is_adapter_key, merged_state_dict
from ..adapted_backbone import ADAPTER_CFG_ATTR, adapted_backbones
from ..checkpoint import (
    META_KEY,
    CheckpointMismatch,
    adapter_checkpoint,
    check_adapter_records,
    checkpoint_kind,
    describe,
    frozen_backbone_keys,
    frozen_fingerprint,
    load_adapter_checkpoint,
    merged_meta,
    plain_config,
    require_unmerged,
    save_merged,
    saved_records,
)
from ..log_filters import AdapterKeySummary
from .base import unwrap
from .gather import gather_target, merged_full_state, trainable_state, trainable_table

ADAPTER_SUFFIX = "_adapter"
WRITTEN_INFO = "mm_spectral_adapter_ckpts"
"""Message-hub entry listing the adapter files written so far; checkpoints carry it, so a
resumed run still removes the old ones when their full checkpoint goes."""


def adapter_checkpoint_path(full_path: str) -> str:
    """``epoch_3.pth`` → ``epoch_3_adapter.pth``."""
    root, ext = osp.splitext(full_path)
    return f"{root}{ADAPTER_SUFFIX}{ext or '.pth'}"


def full_checkpoint_path(adapter_path: str) -> str:
    """``epoch_3_adapter.pth`` → ``epoch_3.pth``."""
    root, ext = osp.splitext(adapter_path)
    return root.removesuffix(ADAPTER_SUFFIX) + ext


@HOOKS.register_module()
class AdapterHook(Hook):
    """Guards what trains, logs the trainable table, keeps adapter-only checkpoints.

    Before training it raises if a backbone parameter requires grad without being an
    adapter, a ``trainable`` match of its AdaptedBackbone, or an ``allowed`` match
    (necks and heads, outside the adapted backbones, always train).

    Checkpoints: every checkpoint the Runner saves records the adapters
    (``meta['mm_spectral']``); beside each (``epoch_3.pth``, ``best_*.pth``) it writes
    ``epoch_3_adapter.pth`` (:func:`~mm_spectral.openmmlab.checkpoint.adapter_checkpoint`,
    with the training state, so ``--resume`` accepts it), and removes it again when
    CheckpointHook's ``max_keep_ckpts`` removes the full one, across resumes too. When
    the Runner loads an adapter-only file (``load_from``, ``resume``, stock
    ``tools/test.py``) it checks and loads it over the Pretrained base; a full checkpoint
    of other adapters is refused.

    Args:
        merge_at_end: after training, also save ``merged.pth`` (every ΔW folded in, plain
            keys, the adapter-free config in its meta) and ``merged_config.py`` in the
            work dir.
        save_adapter_only: write the adapter-only checkpoints.
        allowed: extra regexes over full model parameter names (e.g.
            ``'backbone\\.norm.*'``) that may train.
        allow_other_base: load adapter-only files even onto base weights other than
            those they were trained on (a warning instead of an error).
    """

    priority = "LOWEST"
    needs_adapters = True

    def __init__(
        self,
        merge_at_end: bool = False,
        save_adapter_only: bool = True,
        allowed: Sequence[str] = (),
        allow_other_base: bool = False,
    ) -> None:
        self.merge_at_end = merge_at_end
        self.save_adapter_only = save_adapter_only
        self.allowed = [re.compile(p) for p in ([allowed] if isinstance(allowed, str) else allowed)]
        self.allow_other_base = allow_other_base
        self._paths: dict[str, str] = {}  # message-hub checkpoint entries at the last save
        self._meta: dict = {}
        self._fingerprint: dict | None = None  # the frozen weights do not change
        self._key_summary = AdapterKeySummary()

    # -- readable logs ---------------------------------------------------------------------
    def before_run(self, runner) -> None:
        """Adapter keys missing from ``load_from`` / init_cfg checkpoints: one count, not a list."""
        runner.logger.addFilter(self._key_summary)

    def after_run(self, runner) -> None:
        runner.logger.removeFilter(self._key_summary)

    # -- the trainable-parameter guard -----------------------------------------------------
    def unexpected_trainable(self, model: nn.Module) -> list[str]:
        """Full names of backbone parameters that require grad although nothing allows it."""
        backbones = adapted_backbones(model)
        if not backbones:
            raise RuntimeError(
                "AdapterHook: the model has no backbone built by AdaptedBackbone "
                "(use TrainableReportHook for full fine-tuning)"
            )
        offending = []
        for prefix, backbone in backbones.items():
            patterns = [re.compile(p) for p in getattr(backbone, ADAPTER_CFG_ATTR)["trainable"]]
            for name, param in backbone.named_parameters():
                name = clean_name(name)  # under FSDP, names carry its wrappers
                full = f"{prefix}.{name}" if prefix else name
                if (
                    not param.requires_grad
                    or is_adapter_key(name)
                    or any(p.fullmatch(name) for p in patterns)
                    or any(p.fullmatch(full) for p in self.allowed)
                ):
                    continue
                offending.append(full)
        return offending

    def before_train(self, runner) -> None:
        model = unwrap(runner.model)
        offending = self.unexpected_trainable(model)
        if offending:
            shown = "\n  ".join(offending[:20])
            more = f"\n  … and {len(offending) - 20} more" if len(offending) > 20 else ""
            raise RuntimeError(
                f"AdapterHook: {len(offending)} backbone parameters require grad but are "
                f"neither adapters nor allowed by `trainable` / `allowed`:\n  {shown}{more}"
            )
        runner.logger.info("trainable parameters:\n" + trainable_table(runner.model))
        self._paths = self._ckpt_infos(runner)  # restored by a resume: saved before

    # -- saving ----------------------------------------------------------------------------
    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """Record the adapters in the checkpoint; write its adapter-only twin.

        Under FSDP (FlexibleRunner calls this on every rank) the twin's tensors and the
        base fingerprint are gathered from the shards by every rank; rank 0 writes."""
        model = unwrap(runner.model)
        meta = checkpoint.setdefault("meta", {})
        meta[META_KEY] = describe(model, "full")
        self._meta = dict(meta)  # dataset_meta, seed, … for merge_at_end
        path = self._target(runner)
        if not self.save_adapter_only or path is None:
            return
        state, training_state = checkpoint.get("state_dict"), checkpoint
        if is_fsdp(runner.model):  # collectives: every rank, before rank 0 goes on alone
            # The shards' optimizer state is per rank: resume from the sharded checkpoint.
            state, training_state = trainable_state(runner.model), None
            if self._fingerprint is None:
                self._fingerprint = self._sharded_fingerprint(runner.model)
        if not is_main_process():
            return
        if not osp.isdir(osp.dirname(path) or "."):
            runner.logger.warning(f"AdapterHook: {path} is not a local file; no adapter file")
            return
        target = adapter_checkpoint_path(path)
        written = self._drop_orphans(runner, osp.dirname(target))
        written = [*(p for p in written if p != target), target]
        runner.message_hub.update_info(WRITTEN_INFO, written)
        if isinstance(checkpoint.get("message_hub"), dict):
            checkpoint["message_hub"].setdefault("runtime_info", {})[WRITTEN_INFO] = written
        if self._fingerprint is None:
            self._fingerprint = frozen_fingerprint(model)
        adapter_meta = dict(meta, full_checkpoint=osp.basename(path))
        ckpt = adapter_checkpoint(model, adapter_meta, state, training_state, self._fingerprint)
        atomic_save(ckpt, target)

    @staticmethod
    def _sharded_fingerprint(model: nn.Module) -> dict:
        """The frozen backbone weights' fingerprint of an FSDP model (gathered unit by unit;
        every rank calls it, rank 0 gets the result)."""
        frozen = frozen_backbone_keys(unwrap(model))
        return base_fingerprint(full_tensors(gather_target(model), keep=frozen.__contains__))

    @staticmethod
    def _ckpt_infos(runner) -> dict[str, str]:
        infos = runner.message_hub.runtime_info
        return {
            k: v
            for k, v in infos.items()
            if (k == "last_ckpt" or k.startswith("best_ckpt")) and isinstance(v, str)
        }

    def _target(self, runner) -> str | None:
        """The file being saved: CheckpointHook names it in the message hub just before
        saving; no new name means it saves the last checkpoint again (after a new best)."""
        now = self._ckpt_infos(runner)
        changed = [path for key, path in now.items() if self._paths.get(key) != path]
        self._paths = now
        return changed[-1] if changed else now.get("last_ckpt")

    @staticmethod
    def _drop_orphans(runner, directory: str) -> list[str]:
        """Remove adapter files in ``directory`` whose full checkpoint CheckpointHook has
        removed; return the files still kept."""
        kept = []
        for path in runner.message_hub.runtime_info.get(WRITTEN_INFO) or []:
            if not osp.exists(path):
                continue
            if osp.dirname(path) == directory and not osp.exists(full_checkpoint_path(path)):
                os.remove(path)
                runner.logger.info(f"AdapterHook: removed {path} with its full checkpoint")
            else:
                kept.append(path)
        return kept

    # -- loading ---------------------------------------------------------------------------
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Check what the Runner loads against the model's adapters; load adapter-only files
        over the Pretrained base (the Runner's loader then finds every key)."""
        model = unwrap(runner.model)
        if not any(True for _ in adapted_layers(model)):
            return
        source = getattr(runner, "_load_from", None) or "the loaded checkpoint"
        kind, meta = checkpoint_kind(checkpoint), checkpoint.get("meta") or {}
        if kind == "merged":  # training on merged weights starts new adapters: fine
            if not self._training(runner):
                require_unmerged(checkpoint, source)
            return
        if kind != "adapter-only":  # a full checkpoint, adapted or a plain pretrained one
            state = checkpoint.get("state_dict", {})
            if saved_records(meta) is not None or any(is_adapter_key(k) for k in state):
                check_adapter_records(model, meta, source)
            return
        if getattr(runner, "_resume", False):
            missing = [k for k in ("message_hub", "optimizer") if k not in checkpoint]
            if missing:
                full = meta.get("full_checkpoint", "the full checkpoint")
                raise CheckpointMismatch(
                    f"{source} holds no training state ({', '.join(missing)}): resume from "
                    f"{osp.join(osp.dirname(source), full)} instead"
                )
        load_adapter_checkpoint(model, checkpoint, self.allow_other_base, source)
        checkpoint["state_dict"] = model.state_dict()
        runner.logger.info(f"adapter-only checkpoint loaded over the base weights: {source}")

    @staticmethod
    def _training(runner) -> bool:
        loop = getattr(runner, "_train_loop", None)
        return loop is not None and not isinstance(loop, dict)

    # -- merging at the end ----------------------------------------------------------------
    @torch.no_grad()
    def after_train(self, runner) -> None:
        if not self.merge_at_end:
            return
        model = unwrap(runner.model)
        if is_fsdp(runner.model):
            state = merged_full_state(runner.model)  # every rank gathers; rank 0 gets it
        elif is_main_process():
            state = merged_state_dict(model)  # the model itself stays adapted
        if not is_main_process():
            return
        has_cfg = runner.cfg.get("model") is not None
        plain = plain_config(runner.cfg) if has_cfg else None
        meta = dict(self._meta, epoch=runner.epoch, iter=runner.iter)
        meta[META_KEY] = describe(model, "full")
        meta = merged_meta(meta, plain, merged_from="AdapterHook(merge_at_end=True)")
        path = osp.join(runner.work_dir, "merged.pth")
        cfg_path = osp.join(runner.work_dir, "merged_config.py") if has_cfg else None
        save_merged(state, plain, meta, path, cfg_path)
        message = f"AdapterHook: merged checkpoint (adapters folded in, plain keys): {path}"
        if cfg_path:
            message += f", adapter-free config: {cfg_path}"
        runner.logger.info(message)
