"""Logs the trainable-parameter table once before training (any model, adapters or not)."""

from __future__ import annotations

from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from .gather import trainable_table


@HOOKS.register_module()
class TrainableReportHook(Hook):
    """Logs the trainable-parameter table once, before training (full fine-tuning too);
    under FSDP with unsharded counts and the units by kind."""

    priority = "NORMAL"

    def before_train(self, runner) -> None:
        runner.logger.info("trainable parameters:\n" + trainable_table(runner.model))
