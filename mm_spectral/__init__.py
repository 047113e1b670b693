"""mm_spectral: spectral and tensor adapters (FLoRA, FourierFT, FoRA, LoRA) for vision
backbones, with OpenMMLab integration in ``mm_spectral.models`` and ``mm_spectral.hooks``.
"""

import importlib.util

from .adapters import ADAPTERS, FLoRA, FoRA, FourierFT, LoRA
from .inject import (
    adapted_layers,
    adapter_state_dict,
    freeze,
    inject,
    load_adapter_state_dict,
    merge,
    remove_adapters,
    trainable_report,
    unmerge,
)

__version__ = "0.1.0"

if importlib.util.find_spec("mmengine") is not None:
    # OpenMMLab layer: registers backbones, AdaptedBackbone, hooks, optimizer constructor.
    from . import registration  # noqa: F401

__all__ = [
    "ADAPTERS",
    "FLoRA",
    "FoRA",
    "FourierFT",
    "LoRA",
    "adapter_state_dict",
    "adapted_layers",
    "freeze",
    "inject",
    "load_adapter_state_dict",
    "merge",
    "remove_adapters",
    "trainable_report",
    "unmerge",
]
