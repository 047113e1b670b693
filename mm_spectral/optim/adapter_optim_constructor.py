"""An optimizer constructor for models that are mostly frozen.

MMEngine's default constructor hands frozen parameters to the optimizer (without
paramwise_cfg) or logs one warning per frozen parameter, plus one info line per custom
setting (with it): thousands of lines for a 6B backbone. This one gives the optimizer
only parameters that require grad, keeps paramwise_cfg (norm/bias decay, custom_keys, …
through MMEngine's own ``add_params``), and logs one summary line.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator

from mmengine.logging import MMLogger, print_log
from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapper
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS, OPTIMIZERS
from torch import nn

# Per-parameter messages of DefaultOptimWrapperConstructor.add_params.
_PER_PARAM_MESSAGES = ("is skipped since its requires_grad=False", "paramwise_options -- ")


class _CountPerParamMessages(logging.Filter):
    """Swallows the per-parameter messages, counting the paramwise settings."""

    def __init__(self) -> None:
        super().__init__()
        self.settings = 0

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _PER_PARAM_MESSAGES[1] in message:
            self.settings += 1
        return not any(m in message for m in _PER_PARAM_MESSAGES)


@contextlib.contextmanager
def _quiet_add_params() -> Iterator[_CountPerParamMessages]:
    logger = MMLogger.get_current_instance()
    quiet = _CountPerParamMessages()
    logger.addFilter(quiet)
    try:
        yield quiet
    finally:
        logger.removeFilter(quiet)


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class AdapterOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """DefaultOptimWrapperConstructor over trainable parameters only, with one log line.

    Use it as ``optim_wrapper=dict(constructor='AdapterOptimWrapperConstructor',
    optimizer=..., paramwise_cfg=...)``.
    """

    def __call__(self, model: nn.Module) -> OptimWrapper:
        module = model.module if hasattr(model, "module") else model
        optimizer_cfg = self.optimizer_cfg.copy()
        optimizer_cls = optimizer_cfg["type"]
        if isinstance(optimizer_cls, str):
            with OPTIMIZERS.switch_scope_and_registry(None) as registry:
                optimizer_cls = registry.get(optimizer_cls)
        # Some optimizers name their first argument `model_params` rather than `params`.
        first_arg = next(iter(inspect.signature(optimizer_cls).parameters))
        settings = 0
        if self.paramwise_cfg:
            groups: list[dict] = []
            with _quiet_add_params() as quiet:
                self.add_params(groups, module)  # skips frozen parameters itself
            settings = quiet.settings
            optimizer_cfg[first_arg] = groups
        else:
            optimizer_cfg[first_arg] = [p for p in module.parameters() if p.requires_grad]
        optimizer = OPTIMIZERS.build(optimizer_cfg)
        wrapper_cfg = self.optim_wrapper_cfg.copy()
        wrapper_cfg.setdefault("type", "OptimWrapper")
        wrapper = OPTIM_WRAPPERS.build(wrapper_cfg, default_args=dict(optimizer=optimizer))
        print_log(summary(module, optimizer, settings), logger="current")
        return wrapper


def summary(module: nn.Module, optimizer, settings: int = 0) -> str:
    """'optimizer: N trainable tensors (M params) of T; K frozen skipped' (+ paramwise)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    total = sum(p.numel() for p in module.parameters())
    frozen = sum(1 for p in module.parameters() if not p.requires_grad)
    line = (
        f"optimizer: {len(params)} trainable tensors ({sum(p.numel() for p in params):,} "
        f"params) of {total:,}; {frozen} frozen skipped"
    )
    return line + (f"; paramwise_cfg: {settings} custom lr/decay settings" if settings else "")
