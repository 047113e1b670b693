"""OpenMMLab-registered backbones and the AdaptedBackbone builder."""

from . import backbones  # noqa: F401  (registers ConvNeXtV2, TimmViT, InternViT…)
from .adapted_backbone import (
    ADAPTER_CFG_ATTR,
    AdaptedBackbone,
    AdapterKeySummary,
    adapted_backbones,
    cast_frozen,
    summarised_adapter_keys,
)

__all__ = [
    "ADAPTER_CFG_ATTR",
    "AdaptedBackbone",
    "AdapterKeySummary",
    "adapted_backbones",
    "cast_frozen",
    "summarised_adapter_keys",
]
