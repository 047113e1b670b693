"""timm Vision Transformers (and InternViT-300M through timm) as 4-scale OpenMMLab backbones.

The embedding and block parameters keep timm's names at the top level (``patch_embed.proj.weight``,
``pos_embed``, ``blocks.0.attn.qkv.weight``, ...), so timm checkpoints load directly; the head and
final norm are dropped and the multi-scale resamplers live under ``pyramid.*``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import timm
import torch
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from .pyramid import SimplePyramid, check_out_indices, run_blocks, tokens_to_map


@MODELS.register_module()
class TimmViT(BaseModule):
    """A timm ``VisionTransformer`` whose block outputs become a 4-level feature pyramid.

    Position embeddings are resampled to the input's token grid on every forward (timm's
    ``dynamic_img_size``), and a checkpoint whose grid differs from ``img_size``'s is resampled
    once at load time, both bicubically; ``pos_embed_antialias`` says whether with
    antialiasing (timm's own ViTs: yes, as timm does).

    Args:
        arch: a timm VisionTransformer name, e.g. ``vit_base_patch16_224``.
        img_size: nominal input size; sets the stored position-embedding grid.
        patch_size: overrides the arch's patch size when given.
        out_indices: the 4 blocks whose outputs feed the pyramid (x4, x2, x1, x0.5).
        drop_path_rate: stochastic depth rate (timm's linear rule).
        with_cp: activation checkpointing per block while training.
        init_cfg: MMEngine init config, e.g. ``dict(type='Pretrained', checkpoint=...)``.
        **timm_kwargs: more ``timm.create_model`` arguments (depth=, embed_dim=, num_heads=, ...).
    """

    pos_embed_antialias: bool = True

    def __init__(
        self,
        arch: str = "vit_base_patch16_224",
        img_size: int | tuple[int, int] = 512,
        patch_size: int | None = None,
        out_indices: Sequence[int] = (3, 5, 7, 11),
        drop_path_rate: float = 0.0,
        with_cp: bool = False,
        init_cfg: dict | list[dict] | None = None,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        kwargs: dict[str, Any] = dict(
            pretrained=False,
            num_classes=0,
            img_size=img_size,
            dynamic_img_size=True,
            drop_path_rate=drop_path_rate,
        )
        if patch_size is not None:
            kwargs["patch_size"] = patch_size
        kwargs.update(timm_kwargs)
        vit = timm.create_model(arch, **kwargs)
        if not isinstance(vit, VisionTransformer):
            raise TypeError(
                f"TimmViT: {arch!r} builds a {type(vit).__name__}, not a VisionTransformer"
            )
        self.arch = arch
        self.with_cp = with_cp
        self.out_indices = check_out_indices(out_indices, len(vit.blocks), type(self).__name__)
        self.embed_dim: int = vit.embed_dim
        self.num_prefix_tokens: int = vit.num_prefix_tokens
        self.no_embed_class: bool = vit.no_embed_class
        # timm's modules and parameters, under timm's names.
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.reg_token = vit.reg_token
        self.pos_embed = vit.pos_embed
        self.pos_drop = vit.pos_drop
        self.patch_drop = vit.patch_drop
        self.norm_pre = vit.norm_pre
        # Blocks after the last output would get no gradient (DDP complains): not kept.
        self.blocks = vit.blocks[: max(self.out_indices) + 1]
        self.pyramid = SimplePyramid(self.embed_dim)
        self.out_channels = [self.embed_dim] * 4

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.patch_size)

    def _resample_pos_embed(
        self, pos_embed: Tensor, new_size: tuple[int, int], old_size: tuple[int, int]
    ) -> Tensor:
        """Bicubic resampling of a (1, prefix + grid, C) embedding's patch grid."""
        return resample_abs_pos_embed(
            pos_embed,
            new_size=new_size,
            old_size=old_size,
            num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
            antialias=self.pos_embed_antialias,
        )

    def _pos_embed(self, x: Tensor) -> Tensor:
        """(B, H, W, C) patch tokens -> (B, prefix + H*W, C) with prefix and position embeddings."""
        batch, height, width, channels = x.shape
        x = x.reshape(batch, height * width, channels)
        prefix = [
            t.expand(batch, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None
        ]
        if self.pos_embed is None:
            return self.pos_drop(torch.cat(prefix + [x], dim=1))
        pos_embed = self._resample_pos_embed(
            self.pos_embed, (height, width), self.patch_embed.grid_size
        )
        if self.no_embed_class:  # position embedding covers the patches only
            x = torch.cat(prefix + [x + pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos_embed
        return self.pos_drop(x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = self.patch_embed(x)  # (B, H, W, C): dynamic_img_size makes timm emit NHWC
        grid = (x.shape[1], x.shape[2])
        x = self.norm_pre(self.patch_drop(self._pos_embed(x)))
        _, outs = run_blocks(self.blocks, x, self.out_indices, self.with_cp and self.training)
        maps = [tokens_to_map(outs[i], self.num_prefix_tokens, grid) for i in self.out_indices]
        return self.pyramid(maps)

    def _load_from_state_dict(
        self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        """Resample a checkpoint's position embedding (square grid) to this model's grid."""
        key = prefix + "pos_embed"
        if self.pos_embed is not None and key in state_dict:
            source = state_dict[key]
            if (
                source.shape != self.pos_embed.shape
                and source.shape[-1] == self.pos_embed.shape[-1]
            ):
                num_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
                side = math.isqrt(source.shape[1] - num_prefix)
                if side * side == source.shape[1] - num_prefix:
                    state_dict[key] = self._resample_pos_embed(
                        source, self.patch_embed.grid_size, (side, side)
                    )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@MODELS.register_module()
class InternViT300M(TimmViT):
    """InternViT-300M-448px (InternVL 2/2.5 vision tower) via timm's ``vit_intern300m_patch14_448``.

    Patch 14: the pyramid's strides are 3.5, 7, 14, 28 (see ``pyramid.py``).

    Position embeddings are resampled as InternVL's own ``InternVisionEmbeddings`` does:
    plain bicubic (``align_corners=False``) without antialiasing. timm's model antialiases,
    which changes the features by 2-7% at inputs other than 448 px. With the default
    ``img_size=448`` the stored grid is the release's, so only the forward resamples, once,
    exactly as InternVL.
    """

    pos_embed_antialias = False

    def __init__(
        self,
        img_size: int | tuple[int, int] = 448,
        out_indices: Sequence[int] = (5, 11, 17, 23),
        drop_path_rate: float = 0.0,
        with_cp: bool = False,
        init_cfg: dict | list[dict] | None = None,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__(
            arch="vit_intern300m_patch14_448",
            img_size=img_size,
            out_indices=out_indices,
            drop_path_rate=drop_path_rate,
            with_cp=with_cp,
            init_cfg=init_cfg,
            **timm_kwargs,
        )
