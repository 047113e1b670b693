"""Everything OpenMMLab configs reach through ``custom_imports=dict(imports=['mm_spectral'])``.

Classes go into MMEngine's root registries, which mmdet's, mmseg's and mmrotate's
registries fall back to, so one import serves all three toolboxes. Importing this module
also applies the torch.load fix of :mod:`mm_spectral.compat` before anything is loaded.
"""

from __future__ import annotations

import importlib

from .compat import patch_mmengine_torch_load

patch_mmengine_torch_load()

from . import hooks, models, optim  # noqa: E402,F401

TOOLBOXES = ("mmdet", "mmseg", "mmrotate", "mmpretrain")


def init_toolbox(scope: str | None) -> None:
    """Register every module of the toolbox a config's ``default_scope`` names (if any).

    MMEngine registries also import lazily from their ``locations``; registering up front
    makes builds outside a Runner (tools, tests) behave the same.
    """
    if scope in TOOLBOXES:
        importlib.import_module(f"{scope}.utils").register_all_modules(init_default_scope=False)
