"""Adapter mathematics in plain PyTorch: one file per method, the contract in base.py.

Importing this package registers every method in :data:`ADAPTERS` (by config ``type``).
"""

from .base import (
    ADAPTABLE_TYPES,
    ADAPTERS,
    BaseAdapter,
    LayerSpec,
    LowRankAdapter,
    adapted_class,
    is_adapted,
    register_adapter,
)
from .bitfit import BitFit
from .dora import DoRA
from .flora import FLoRA
from .fora import FoRA
from .fourierft import FourierFT
from .lora import LoRA
from .row_blocks import RowBlocks

__all__ = [
    "ADAPTABLE_TYPES",
    "ADAPTERS",
    "BaseAdapter",
    "BitFit",
    "DoRA",
    "FLoRA",
    "FoRA",
    "FourierFT",
    "LayerSpec",
    "LoRA",
    "LowRankAdapter",
    "RowBlocks",
    "adapted_class",
    "is_adapted",
    "register_adapter",
]
