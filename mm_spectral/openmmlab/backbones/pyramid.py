"""Single-scale ViT tokens -> four feature maps at 4x, 2x, 1x and 1/2x the token grid.

The simple feature pyramid of ViTDet (Li et al. 2022) / ViT-Adapter's "with_fpn" branch: plain
ViTs have one stride (the patch size), while FPN/UperNet heads want four. For patch 16 the outputs
have strides 4, 8, 16, 32. For patch 14 the same ops give strides 3.5, 7, 14, 28: UperNet and FPN
resize by feature-map shape, so this works as long as heads do not assume exact strides (detectors
with anchor strides should use a patch-16 model or pad inputs accordingly).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import LayerNorm2d
from timm.models import checkpoint_seq
from torch import Tensor, nn


def tokens_to_map(tokens: Tensor, num_prefix_tokens: int, grid: tuple[int, int]) -> Tensor:
    """(B, prefix + H*W, C) tokens -> (B, C, H, W) map, dropping class/register tokens."""
    height, width = grid
    patches = tokens[:, num_prefix_tokens:, :]
    batch, _, channels = patches.shape
    return patches.transpose(1, 2).reshape(batch, channels, height, width).contiguous()


class SimplePyramid(nn.Module):
    """Four resamplers for four same-stride maps: x4 up, x2 up, identity, x2 max-pool down.

    x4 is ConvTranspose(2, s2) -> LayerNorm2d -> GELU -> ConvTranspose(2, s2), x2 one
    ConvTranspose(2, s2). These are new, trainable, neck-like parameters (named ``pyramid.*``
    in the backbones), never part of a pretrained checkpoint.
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2),
            LayerNorm2d(embed_dim, eps=1e-6),
            nn.GELU(),
            nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2)
        self.keep = nn.Identity()
        self.down2 = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, feats: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if len(feats) != 4:
            raise ValueError(f"SimplePyramid needs 4 feature maps, got {len(feats)}")
        return (self.up4(feats[0]), self.up2(feats[1]), self.keep(feats[2]), self.down2(feats[3]))


def check_out_indices(out_indices: Sequence[int], depth: int, name: str) -> tuple[int, ...]:
    """Validate the four block indices whose outputs feed the pyramid (negatives count from the end)."""
    indices = tuple(int(i) + depth if int(i) < 0 else int(i) for i in out_indices)
    if len(indices) != 4 or any(not 0 <= i < depth for i in indices):
        raise ValueError(
            f"{name}: out_indices must be 4 block indices in [0, {depth}), got {tuple(out_indices)}"
        )
    return indices


def run_blocks(
    blocks: Sequence[nn.Module], x: Tensor, out_indices: Sequence[int], with_cp: bool
) -> tuple[Tensor, dict[int, Tensor]]:
    """Run ``blocks`` in order; return the last output and {index: output} at
    ``out_indices``. With ``with_cp`` (while training with grad) each block is
    activation-checkpointed (timm's ``checkpoint_seq``): same result, less memory."""
    use_cp = with_cp and torch.is_grad_enabled()
    outputs: dict[int, Tensor] = {}
    start = 0
    for end in sorted(set(out_indices)):
        segment = list(blocks[start : end + 1])
        if use_cp:
            x = checkpoint_seq(segment, x, use_reentrant=False)
        else:
            for block in segment:
                x = block(x)
        outputs[end] = x
        start = end + 1
    return x, outputs
