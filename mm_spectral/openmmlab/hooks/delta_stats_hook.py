"""Logs ‖ΔW‖_F and the feature amplification factor of the adapters during training."""

from __future__ import annotations

from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ...delta_stats import DEFAULT_RANK, delta_stats
from ...distributed import full_parameters
from .base import unwrap


@HOOKS.register_module()
class DeltaStatsHook(Hook):
    """Every ``interval`` training iterations, logs the mean ‖ΔW‖_F and the mean feature
    amplification factor over adapted layers as scalars ``train/delta_norm`` and
    ``train/delta_amplification`` (log lines, vis_data/scalars.json, TensorBoard…);
    ``tools/analysis/plot_delta_stats.py`` draws them.

    Args:
        interval: iterations between two measurements.
        default_rank: r for adapters without a rank (FourierFT).

    Under FSDP every measurement gathers the whole model into rank 0's CPU memory.
    """

    priority = "NORMAL"  # before LoggerHook (BELOW_NORMAL): logged in the same iteration
    needs_adapters = True

    def __init__(self, interval: int = 50, default_rank: int = DEFAULT_RANK) -> None:
        self.interval = interval
        self.default_rank = default_rank

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if not self.every_n_train_iters(runner, self.interval):
            return
        with full_parameters(runner.model):  # FSDP: whole tensors on rank 0; else nothing
            if not is_main_process():
                return  # only rank 0 logs
            for key, value in delta_stats(unwrap(runner.model), self.default_rank).items():
                runner.message_hub.update_scalar(f"train/{key}", value)
