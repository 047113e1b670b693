"""mm_spectral: spectral and tensor adapters (FLoRA, FourierFT, FoRA, LoRA, DoRA, BitFit) for
vision backbones.

This package is the torch-only core: ``import mm_spectral`` needs PyTorch alone and works on
any ``nn.Module``. The OpenMMLab layer (registered backbones, ``AdaptedBackbone``, hooks,
checkpoint tools) is :mod:`mm_spectral.openmmlab`, the ``custom_imports`` target of configs.
"""

import sys

from .adapters import ADAPTERS, BitFit, DoRA, FLoRA, FoRA, FourierFT, LoRA, register_adapter
from .adapters.batched_spectra import enable_batched_spectra
from .delta_stats import delta_stats
from .flat_adamw import FlatAdamW
from .inject import cast_frozen, freeze, inject, merge, remove_adapters, reset_from_base, unmerge
from .report import parameter_counts, trainable_report
from .state import (
    adapted_layers,
    adapter_state_dict,
    atomic_save,
    is_adapter_key,
    load_adapter_state_dict,
    load_checkpoint_file,
    merged_state_dict,
)

__version__ = "0.1.0"

if "mmengine" in sys.modules:
    # Configs written before the split name 'mm_spectral' in custom_imports; MMEngine is
    # loaded by the time it imports them, so register the OpenMMLab layer for them too.
    from . import openmmlab  # noqa: F401

__all__ = [
    "ADAPTERS",
    "BitFit",
    "DoRA",
    "FLoRA",
    "FlatAdamW",
    "FoRA",
    "FourierFT",
    "LoRA",
    "adapted_layers",
    "adapter_state_dict",
    "atomic_save",
    "cast_frozen",
    "delta_stats",
    "enable_batched_spectra",
    "freeze",
    "inject",
    "is_adapter_key",
    "load_adapter_state_dict",
    "load_checkpoint_file",
    "merge",
    "merged_state_dict",
    "parameter_counts",
    "register_adapter",
    "remove_adapters",
    "reset_from_base",
    "trainable_report",
    "unmerge",
]
