"""InternViT-6B (Chen et al., InternVL, CVPR 2024) as a 4-scale OpenMMLab backbone.

Written here with the parameter names of the released ``InternVisionModel`` checkpoints
(``embeddings.*``, ``encoder.layers.{i}.*``), so a release loads after only stripping prefixes
(``tools/convert/internvit6b_to_mm.py``). Architecture: 14x14 patch conv with bias, class token,
learned position embedding resampled (bicubic) to the input grid, pre-norm blocks with RMSNorm
(eps 1e-6), bias-free ``qkv``, QK-RMSNorm over the full width, layer scale, GELU MLP.
Multi-scale outputs come from ``pyramid.SimplePyramid`` (strides 3.5, 7, 14, 28 for patch 14).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from timm.layers import DropPath, Mlp, resample_abs_pos_embed
from torch import Tensor, nn

from ...state import is_adapter_key
from .pyramid import SimplePyramid, check_out_indices, run_blocks, tokens_to_map


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (as the release does) and cast back."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def resample_position_embedding(pos: Tensor, grid: int, size: tuple[int, int]) -> Tensor:
    """(1, 1 + grid², C) -> (1, 1 + h*w, C): class entry kept, patch grid resampled as
    InternVL does (bicubic, align_corners=False, no antialiasing, in float32)."""
    return resample_abs_pos_embed(
        pos, new_size=size, old_size=(grid, grid), num_prefix_tokens=1, antialias=False
    )


class InternEmbeddings(nn.Module):
    """Patch conv + class token + learned position embedding on a stored square grid."""

    def __init__(self, embed_dim: int, patch_size: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_embedding = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size, bias=True)
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))
        batch, _, height, width = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(batch, -1, -1).to(x.dtype), x], dim=1)
        pos = resample_position_embedding(self.position_embedding, self.grid, (height, width))
        return x + pos.to(x.dtype), (height, width)

    def _load_from_state_dict(
        self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        """Resample a checkpoint's position embedding stored on another square grid."""
        key = prefix + "position_embedding"
        source = state_dict.get(key)
        if source is not None and source.shape != self.position_embedding.shape:
            side = math.isqrt(source.shape[1] - 1)
            if side * side == source.shape[1] - 1 and source.shape[-1] == self.embed_dim:
                if side > self.grid:  # downsampling would throw the release's grid away
                    patch = self.patch_embedding.kernel_size[0]
                    raise ValueError(
                        f"InternViT6B: the checkpoint's position embedding is a {side}x{side} "
                        f"grid ({side * patch} px pretraining) but this model stores "
                        f"{self.grid}x{self.grid}: set pretrain_size={side * patch} (inputs "
                        "of any size are resampled from it at forward time)"
                    )
                state_dict[key] = resample_position_embedding(source, side, (self.grid, self.grid))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def embed_dim(self) -> int:
        return self.position_embedding.shape[-1]


class InternAttention(nn.Module):
    """Multi-head self-attention: bias-free qkv, optional RMSNorm of q and k over all heads."""

    def __init__(self, dim: int, num_heads: int, qk_normalization: bool) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(
                f"InternViT6B: embed_dim {dim} is not divisible by num_heads {num_heads}"
            )
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RMSNorm(dim) if qk_normalization else nn.Identity()
        self.k_norm = RMSNorm(dim) if qk_normalization else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, dim).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(batch, tokens, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5, as the release
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class InternBlock(nn.Module):
    """Pre-norm block: x + ls1 * attn(norm1 x), then x + ls2 * mlp(norm2 x), with drop path."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        hidden: int,
        qk_normalization: bool,
        ls_init: float,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = InternAttention(dim, num_heads, qk_normalization)
        self.ls1 = nn.Parameter(torch.full((dim,), float(ls_init)))
        self.norm2 = RMSNorm(dim)
        self.mlp = Mlp(dim, hidden, act_layer=nn.GELU)  # fc1 -> exact GELU -> fc2
        self.ls2 = nn.Parameter(torch.full((dim,), float(ls_init)))
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)) * self.ls1)
        return x + self.drop_path2(self.mlp(self.norm2(x)) * self.ls2)


class InternEncoder(nn.Module):
    """Holds ``layers`` so parameter names read ``encoder.layers.{i}.*`` as in the release."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


@MODELS.register_module()
class InternViT6B(BaseModule):
    """InternViT-6B with a simple feature pyramid (4 maps of ``embed_dim`` channels).

    Args:
        embed_dim, depth, num_heads, mlp_ratio, patch_size: architecture (defaults: the 5.9B
            release: 3200 wide, 48 blocks, 25 heads, MLP 12800, patch 14).
        img_size: nominal input size; sets the position-embedding grid if ``pretrain_size`` is None.
        out_indices: the 4 blocks whose outputs feed the pyramid (x4, x2, x1, x0.5). Blocks after
            the last one are not built (they would get no gradient).
        qk_normalization: RMSNorm on q and k over the full width.
        layerscale_init: initial layer-scale value (the release's ``initializer_factor``).
        drop_path_rate: stochastic depth, linear over the ``depth`` blocks.
        with_cp: activation checkpointing per block while training (needed to fit 6B).
        pretrain_size: image size of the checkpoint's position-embedding grid (224 or 448 for the
            releases). Keeping it equal avoids resampling at load time; inputs of any size are
            handled at forward time by bicubic resampling. A checkpoint on a finer grid than
            this, or with fewer encoder layers than are built, is refused when loading (the
            448 px releases need ``pretrain_size=448`` and, V1-2 on, ``depth=45``).
        init_cfg: e.g. ``dict(type='Pretrained', checkpoint=<converted .pth>)``.
    """

    def __init__(
        self,
        embed_dim: int = 3200,
        depth: int = 48,
        num_heads: int = 25,
        mlp_ratio: float = 4.0,
        patch_size: int = 14,
        img_size: int = 224,
        out_indices: Sequence[int] = (11, 23, 35, 47),
        qk_normalization: bool = True,
        layerscale_init: float = 0.1,
        drop_path_rate: float = 0.0,
        with_cp: bool = False,
        pretrain_size: int | None = None,
        init_cfg: dict | list[dict] | None = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        self.out_indices = check_out_indices(out_indices, depth, "InternViT6B")
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.with_cp = with_cp
        grid = (pretrain_size or img_size) // patch_size
        self.embeddings = InternEmbeddings(embed_dim, patch_size, grid)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear rule
        hidden = int(embed_dim * mlp_ratio)
        self.encoder = InternEncoder(
            [
                InternBlock(
                    embed_dim, num_heads, hidden, qk_normalization, layerscale_init, rates[i]
                )
                for i in range(max(self.out_indices) + 1)
            ]
        )
        self.pyramid = SimplePyramid(embed_dim)
        self.out_channels = [embed_dim] * 4
        self._init_transformer()

    def _init_transformer(self) -> None:
        """Random init for training from scratch: trunc-normal(0.02) linears and embeddings."""
        for module in self.encoder.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.embeddings.class_embedding, std=0.02)
        nn.init.trunc_normal_(self.embeddings.position_embedding, std=0.02)

    def _load_from_state_dict(
        self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        """Refuse a checkpoint that lacks some of the encoder layers this model builds."""
        check_layers_present(state_dict, prefix, len(self.encoder.layers), self.out_indices)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x, grid = self.embeddings(x)
        layers = self.encoder.layers
        _, outs = run_blocks(layers, x, self.out_indices, self.with_cp and self.training)
        return self.pyramid([tokens_to_map(outs[i], 1, grid) for i in self.out_indices])


def check_layers_present(
    state_dict: dict, prefix: str, built: int, out_indices: Sequence[int]
) -> None:
    """Raise when ``state_dict`` holds encoder layers but not all ``built`` of them.

    A partial load would leave those layers at their random init, silently (MMEngine's
    ``Pretrained`` init loads with ``strict=False``): e.g. a 45-layer 448 px release in the
    48-layer default. Adapter-only state dicts (no base layer keys) pass.
    """
    head = prefix + "encoder.layers."
    present = {
        int(key[len(head) :].split(".", 1)[0])
        for key in state_dict
        if key.startswith(head) and not is_adapter_key(key)
    }
    missing = [i for i in range(built) if i not in present]
    if present and missing:
        raise ValueError(
            f"InternViT6B: the checkpoint has {len(present)} encoder layers (up to "
            f"{max(present)}) but this model builds {built} (out_indices {tuple(out_indices)}): "
            f"layers {missing} would keep their random init. The 448 px releases (V1-2, V1-5, "
            "V2-5) have 45 layers: depth=45, out_indices=(11, 22, 33, 44), pretrain_size=448 "
            "(`internvit_6b_448px` in configs/_base_/models/upernet_internvit-6b.py)"
        )
