"""An optimizer constructor for models that are mostly frozen.

MMEngine's default constructor hands frozen parameters to the optimizer (without
``paramwise_cfg``), or (with it) logs one warning per frozen parameter and one info line per
custom setting, and makes one parameter group per tensor: thousands of log lines for a 6B
backbone, and one optimizer launch per tensor at every step. This one keeps MMEngine's own
``__call__`` and ``add_params`` (norm/bias/custom-key rules, layer names), and changes three
things: frozen parameters are skipped silently, groups with identical settings are
merged, and one summary line is logged.
"""

from __future__ import annotations

import logging

from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapper
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS, OPTIMIZERS
from torch import nn

from ..flat_adamw import FlatAdamW
from .log_filters import filtered_log

# optimizer=dict(type='FlatAdamW', ...): AdamW's arithmetic, one launch per flat buffer.
OPTIMIZERS.register_module(module=FlatAdamW)

# Per-parameter messages of DefaultOptimWrapperConstructor.add_params.
_SKIPPED = "is skipped since its requires_grad=False"
_SETTING = "paramwise_options -- "


class _CountPerParamMessages(logging.Filter):
    """Swallows the per-parameter messages, counting the paramwise settings."""

    def __init__(self) -> None:
        super().__init__()
        self.settings = 0

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        self.settings += _SETTING in message
        return _SETTING not in message and _SKIPPED not in message


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class AdapterOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """DefaultOptimWrapperConstructor over trainable parameters only, with one log line.

    Use it as ``optim_wrapper=dict(constructor='AdapterOptimWrapperConstructor',
    optimizer=..., paramwise_cfg=...)``; ``paramwise_cfg`` means what it means to MMEngine.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: dict | None = None) -> None:
        super().__init__(optim_wrapper_cfg, paramwise_cfg)
        if not self.paramwise_cfg:
            # MMEngine skips frozen parameters only on its paramwise path (add_params);
            # this key, at its default value, routes every config there.
            self.paramwise_cfg = dict(bypass_duplicate=False)
        self._settings = 0

    def __call__(self, model: nn.Module) -> OptimWrapper:
        wrapper = super().__call__(model)
        module = model.module if hasattr(model, "module") else model
        print_log(summary(module, wrapper.optimizer, self._settings), logger="current")
        return wrapper

    def add_params(
        self, params: list[dict], module: nn.Module, prefix: str = "", is_dcn_module=None
    ) -> None:
        if prefix:  # MMEngine's recursion into children
            super().add_params(params, module, prefix, is_dcn_module)
            return
        groups: list[dict] = []
        with filtered_log(_CountPerParamMessages()) as quiet:
            super().add_params(groups, module, prefix, is_dcn_module)
        self._settings = quiet.settings
        params.extend(merge_param_groups(groups))


def merge_param_groups(groups: list[dict]) -> list[dict]:
    """One group per distinct setting (lr, weight decay, …), in first-seen order."""
    merged: dict[tuple, dict] = {}
    for group in groups:
        options = tuple(sorted((k, repr(v)) for k, v in group.items() if k != "params"))
        target = merged.setdefault(options, {**group, "params": []})
        target["params"].extend(group["params"])
    return list(merged.values())


def summary(module: nn.Module, optimizer, settings: int = 0) -> str:
    """'optimizer: N trainable tensors (M params) of T; K frozen skipped' (+ paramwise)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    total = sum(p.numel() for p in module.parameters())
    frozen = sum(1 for p in module.parameters() if not p.requires_grad)
    line = (
        f"optimizer: {len(params)} trainable tensors ({sum(p.numel() for p in params):,} "
        f"params) of {total:,} in {len(optimizer.param_groups)} groups; {frozen} frozen skipped"
    )
    if isinstance(optimizer, FlatAdamW):
        line += f"; FlatAdamW: {optimizer.layout()}"
    return line + (f"; paramwise_cfg: {settings} custom lr/decay settings" if settings else "")
