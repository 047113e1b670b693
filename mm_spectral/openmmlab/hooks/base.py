"""What the hooks share: the model inside a wrapper."""

from __future__ import annotations

from mmengine.model import is_model_wrapper
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP / MMDistributedDataParallel / FSDP wrapper."""
    return model.module if is_model_wrapper(model) else model
