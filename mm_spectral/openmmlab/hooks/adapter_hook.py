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

from ...distributed import clean_name, is_fsdp
from ...state import atomic_save, is_adapter_key, merged_state_dict
from ..adapted_backbone import ADAPTER_CFG_ATTR, adapted_backbones
from ..checkpoint import plain_config, save_adapter_checkpoint
from ..log_filters import AdapterKeySummary
from .base import unwrap
from .gather import broadcast_from_main, merged_full_state, trainable_state, trainable_table

ADAPTER_SUFFIX = "_adapter"


def adapter_checkpoint_path(full_path: str) -> str:
    """``epoch_3.pth`` → ``epoch_3_adapter.pth``."""
    root, ext = osp.splitext(full_path)
    return f"{root}{ADAPTER_SUFFIX}{ext or '.pth'}"


@HOOKS.register_module()
class AdapterHook(Hook):
    """Guards what trains, logs the trainable table, keeps adapter-only checkpoints.

    Before training it raises if a backbone parameter requires grad without being an
    adapter, a ``trainable`` match of its AdaptedBackbone, or an ``allowed`` match
    (necks and heads, outside the adapted backbones, always train). Beside every
    checkpoint CheckpointHook writes (``epoch_3.pth``, ``best_*.pth``) it writes
    ``epoch_3_adapter.pth`` (see :func:`mm_spectral.openmmlab.checkpoint.adapter_checkpoint`), and
    removes it again when CheckpointHook's ``max_keep_ckpts`` removes the full one.

    Args:
        merge_at_end: after training, also save ``merged.pth`` (every ΔW folded in, plain
            keys) and ``merged_config.py`` (the adapter-free config) in the work dir.
        save_adapter_only: write the adapter-only checkpoints.
        allowed: extra regexes over full model parameter names (e.g.
            ``'backbone\\.norm.*'``) that may train.
    """

    priority = "LOWEST"  # after CheckpointHook (VERY_LOW): the file it names exists
    needs_adapters = True

    def __init__(
        self,
        merge_at_end: bool = False,
        save_adapter_only: bool = True,
        allowed: Sequence[str] = (),
    ) -> None:
        self.merge_at_end = merge_at_end
        self.save_adapter_only = save_adapter_only
        self.allowed = [re.compile(p) for p in ([allowed] if isinstance(allowed, str) else allowed)]
        self._seen: dict[str, str] = {}  # message-hub key → checkpoint path handled
        self._written: list[str] = []
        self._meta: dict = {}
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
        # Paths already in the message hub (restored by a resume) were handled before.
        self._seen = self._ckpt_infos(runner)

    # -- adapter-only checkpoints ----------------------------------------------------------
    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        self._meta = dict(checkpoint.get("meta", {}))  # dataset_meta, cfg, seed, …

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self._save_new_checkpoints(runner)

    def after_train_epoch(self, runner) -> None:
        self._save_new_checkpoints(runner)

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._save_new_checkpoints(runner)  # best_*.pth

    @staticmethod
    def _ckpt_infos(runner) -> dict[str, str]:
        infos = runner.message_hub.runtime_info
        return {
            k: v
            for k, v in infos.items()
            if (k == "last_ckpt" or k.startswith("best_ckpt")) and isinstance(v, str)
        }

    def _save_new_checkpoints(self, runner) -> None:
        # Under FSDP every rank gathers the shards (rank 0 decides which files are new);
        # otherwise rank 0 alone reads its whole model.
        sharded = is_fsdp(runner.model)
        if not self.save_adapter_only or not (sharded or is_main_process()):
            return
        new = [
            (key, path)
            for key, path in self._ckpt_infos(runner).items()
            if self._seen.get(key) != path and osp.exists(path)  # a directory if sharded
        ]
        for key, path in broadcast_from_main(new) if sharded else new:
            self._seen[key] = path
            state = trainable_state(runner.model) if sharded else None
            if not is_main_process():
                continue
            model = unwrap(runner.model)
            meta = dict(
                self._meta,  # from the full checkpoint: epoch, iter, cfg, dataset_meta, …
                full_checkpoint=osp.basename(path),
                mm_spectral={
                    prefix: getattr(b, ADAPTER_CFG_ATTR)
                    for prefix, b in adapted_backbones(model).items()
                },
            )
            target = adapter_checkpoint_path(path)
            save_adapter_checkpoint(model, target, meta, state=state)
            if target not in self._written:
                self._written.append(target)
        if is_main_process():
            self._drop_orphans()

    def _drop_orphans(self) -> None:
        """Remove adapter files whose full checkpoint CheckpointHook has removed."""
        for path in list(self._written):
            full = path[: -len(ADAPTER_SUFFIX + osp.splitext(path)[1])] + osp.splitext(path)[1]
            if not osp.exists(full):
                if osp.exists(path):
                    os.remove(path)
                self._written.remove(path)

    # -- merging at the end ----------------------------------------------------------------
    @torch.no_grad()
    def after_train(self, runner) -> None:
        self._save_new_checkpoints(runner)
        if not self.merge_at_end or not (is_fsdp(runner.model) or is_main_process()):
            return
        if is_fsdp(runner.model):
            state = merged_full_state(runner.model)  # every rank gathers; rank 0 gets it
            if not is_main_process():
                return
        else:
            state = merged_state_dict(unwrap(runner.model))  # the model itself stays adapted
        path = osp.join(runner.work_dir, "merged.pth")
        meta = dict(self._meta, epoch=runner.epoch, iter=runner.iter, merged=True)
        atomic_save(dict(state_dict=state, meta=meta), path)
        message = f"AdapterHook: merged checkpoint (adapters folded in, plain keys): {path}"
        if runner.cfg.get("model") is not None:
            cfg_path = osp.join(runner.work_dir, "merged_config.py")
            plain_config(runner.cfg).dump(cfg_path)
            message += f", adapter-free config: {cfg_path}"
        runner.logger.info(message)
