"""The OpenMMLab layer: what configs reach with
``custom_imports=dict(imports=['mm_spectral.openmmlab'], allow_failed_imports=False)``.

Importing it applies the torch ≥ 2.6 checkpoint-loading fix for mmengine
(:func:`.compat.patch_mmengine_torch_load`), makes its checkpoint saving atomic
(:func:`.compat.patch_mmengine_save`), lets its checkpoint loader take adapter-only files
(:func:`.compat.patch_mmengine_adapter_loading`) and registers, in MMEngine's root registries
(which mmdet's, mmseg's and mmrotate's fall back to, so one import serves all three):
the backbones, ``AdaptedBackbone``, the hooks, ``AdapterOptimWrapperConstructor`` and the
FSDP auto-wrap policy ``frozen_apart_wrap_policy``.
"""

from __future__ import annotations

from .compat import patch_mmengine_adapter_loading, patch_mmengine_save, patch_mmengine_torch_load

patch_mmengine_torch_load()
patch_mmengine_save()
patch_mmengine_adapter_loading()

from . import backbones, distributed, hooks, optim  # noqa: E402,F401  (registration)
from .adapted_backbone import AdaptedBackbone, adapted_backbones  # noqa: E402
from .checkpoint import merge_checkpoint, plain_config  # noqa: E402
from .scope import build_model, init_toolbox  # noqa: E402

__all__ = [
    "AdaptedBackbone",
    "adapted_backbones",
    "build_model",
    "init_toolbox",
    "merge_checkpoint",
    "plain_config",
]
