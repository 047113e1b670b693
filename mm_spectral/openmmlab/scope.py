"""Building models outside a Runner through the registry of a config's ``default_scope``."""

from __future__ import annotations

import copy
import importlib
from typing import Any

from mmengine.registry import DefaultScope
from torch import nn

TOOLBOXES = ("mmdet", "mmseg", "mmrotate", "mmpretrain")


def init_toolbox(scope: str | None) -> None:
    """Register every module of the toolbox a config's ``default_scope`` names (if any).

    MMEngine registries also import lazily from their ``locations``; registering up front
    makes builds outside a Runner (tools, tests) behave the same.
    """
    if scope in TOOLBOXES:
        importlib.import_module(f"{scope}.utils").register_all_modules(init_default_scope=False)


def build_model(cfg: Any) -> nn.Module:
    """Build ``cfg.model`` on the current device through the config's toolbox registry."""
    scope = cfg.get("default_scope")
    init_toolbox(scope)
    registry = importlib.import_module(f"{scope or 'mmengine'}.registry").MODELS
    with DefaultScope.overwrite_default_scope(scope):
        return registry.build(copy.deepcopy(cfg.model))
