"""OpenMMLab-registered backbones: ConvNeXt-V2 and ViTs from timm, InternViT-6B written here.

Importing this package registers ``ConvNeXtV2``, ``TimmViT``, ``InternViT300M`` and
``InternViT6B`` in MMEngine's root ``MODELS`` registry (mmdet/mmseg/mmrotate fall back to it).
"""

from .convnextv2 import CONVNEXTV2_ARCHS, ConvNeXtV2
from .internvit6b import InternViT6B
from .pyramid import SimplePyramid
from .vit import InternViT300M, TimmViT

__all__ = [
    "CONVNEXTV2_ARCHS",
    "ConvNeXtV2",
    "InternViT300M",
    "InternViT6B",
    "SimplePyramid",
    "TimmViT",
]
