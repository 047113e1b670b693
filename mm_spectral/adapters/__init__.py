"""Adapter mathematics in plain PyTorch: one file per method, a shared contract in base.py."""

from .base import ADAPTABLE_TYPES, BaseAdapter, LayerSpec, LowRankAdapter, adapted_class, is_adapted
from .flora import FLoRA, tucker_product
from .fora import FoRA
from .fourierft import FourierFT
from .lora import LoRA

ADAPTERS: dict[str, type[BaseAdapter]] = {cls.method: cls for cls in (LoRA, FLoRA, FourierFT, FoRA)}

__all__ = [
    "ADAPTABLE_TYPES",
    "ADAPTERS",
    "BaseAdapter",
    "FLoRA",
    "FoRA",
    "FourierFT",
    "LayerSpec",
    "LoRA",
    "LowRankAdapter",
    "adapted_class",
    "is_adapted",
    "tucker_product",
]
