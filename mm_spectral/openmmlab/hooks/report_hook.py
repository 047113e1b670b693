"""Logs the trainable-parameter table once before training (any model, adapters or not)."""

from __future__ import annotations

from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ...report import trainable_report
from .base import unwrap


@HOOKS.register_module()
class TrainableReportHook(Hook):
    """Logs the trainable-parameter table once, before training (full fine-tuning too)."""

    priority = "NORMAL"

    def before_train(self, runner) -> None:
        runner.logger.info("trainable parameters:\n" + trainable_report(unwrap(runner.model)))
