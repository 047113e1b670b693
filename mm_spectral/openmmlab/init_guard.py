"""Pretrained-weight initialisation that leaves injected adapters and frozen flags alone."""

from __future__ import annotations

import torch
from torch import nn

from ..inject import reset_from_base
from ..state import adapter_state_dict, base_dependent_keys
from .log_filters import summarised_adapter_keys


class GuardedInitWeights:
    """Stands in for the backbone's ``init_weights``: runs the class's own, then restores
    the requires_grad flags and adapter tensors, with adapter keys summed up in the log.
    Adapter tensors derived from the base weights (DoRA's magnitude ‖W0‖_c) are not
    restored but derived again from the weights ``init_weights`` loaded or drew.

    An object holding its module (not a closure): deepcopy (EMA) and pickle rebind it to
    the copied module.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self) -> None:
        module = self.module
        flags = {name: p.requires_grad for name, p in module.named_parameters()}
        derived = base_dependent_keys(module)
        adapters = {
            k: v.detach().clone() for k, v in adapter_state_dict(module).items() if k not in derived
        }
        with summarised_adapter_keys():
            type(module).init_weights(module)
        with torch.no_grad():
            for name, param in module.named_parameters():
                param.requires_grad_(flags[name])
            current = module.state_dict(keep_vars=True)
            for key, value in adapters.items():
                current[key].copy_(value)
        reset_from_base(module)
