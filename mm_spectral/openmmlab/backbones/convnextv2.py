"""ConvNeXt-V2 (Woo et al. 2023) as an OpenMMLab backbone, built from timm with timm's names.

The parameters keep timm's names at the top level (``stem.0.weight``,
``stages.2.blocks.5.conv_dw.weight``, ...), so a timm checkpoint loads directly and an official
one after ``tools/convert/convnextv2_official_to_timm.py``. The classifier (``head.*``) is dropped;
per-output LayerNorms (``out_norms.{i}``) are added, as in the detection/segmentation ConvNeXts.
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from timm.layers import LayerNorm2d
from timm.models import checkpoint_seq
from torch import Tensor, nn

CONVNEXTV2_ARCHS = ("atto", "femto", "pico", "nano", "tiny", "small", "base", "large", "huge")


@MODELS.register_module()
class ConvNeXtV2(BaseModule):
    """ConvNeXt-V2 feature extractor: maps at strides 4, 8, 16, 32 for ``out_indices``.

    Args:
        arch: timm size name, ``convnextv2_{arch}`` (atto ... huge).
        out_indices: stages (0-3) whose outputs are returned, each through its own LayerNorm.
        drop_path_rate: stochastic depth rate, linearly increasing over blocks (timm's rule).
        with_cp: activation checkpointing per block while training (saves memory, same result).
        init_cfg: e.g. ``dict(type='Pretrained', checkpoint='convnextv2_large.pth')`` with a
            timm-layout state dict (``prefix='backbone.'`` for a detector checkpoint).
    """

    def __init__(
        self,
        arch: str = "large",
        out_indices: Sequence[int] = (0, 1, 2, 3),
        drop_path_rate: float = 0.0,
        with_cp: bool = False,
        init_cfg: dict | list[dict] | None = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        if arch not in CONVNEXTV2_ARCHS:
            raise ValueError(f"ConvNeXtV2: unknown arch {arch!r}; choose from {CONVNEXTV2_ARCHS}")
        self.out_indices = tuple(sorted({int(i) for i in out_indices}))
        if not self.out_indices or any(not 0 <= i < 4 for i in self.out_indices):
            raise ValueError(f"ConvNeXtV2: out_indices must lie in [0, 4), got {out_indices}")
        self.arch = arch
        self.with_cp = with_cp
        net = timm.create_model(
            f"convnextv2_{arch}", pretrained=False, drop_path_rate=drop_path_rate
        )
        dims = [info["num_chs"] for info in net.feature_info]
        # Stages after the last requested one would hold parameters without gradients (DDP
        # complains), so they are not kept; their checkpoint keys are then simply unused.
        self.stem = net.stem
        self.stages = net.stages[: max(self.out_indices) + 1]
        self.out_norms = nn.ModuleDict(
            {str(i): LayerNorm2d(dims[i], eps=1e-6) for i in self.out_indices}
        )
        self.out_channels = [dims[i] for i in self.out_indices]

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        use_cp = self.with_cp and self.training and torch.is_grad_enabled()
        x = self.stem(x)
        outs = []
        for index, stage in enumerate(self.stages):
            x = stage.downsample(x)
            x = checkpoint_seq(stage.blocks, x, use_reentrant=False) if use_cp else stage.blocks(x)
            if index in self.out_indices:
                outs.append(self.out_norms[str(index)](x))
        return tuple(outs)
