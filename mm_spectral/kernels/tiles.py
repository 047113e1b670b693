"""Tile configurations shared by the low-rank kernels.

On a GPU, ``triton.autotune`` picks among a few Hopper-friendly tiles per shape and dtype
(cached per process; the first call of a new shape benchmarks, so warm up before
capturing a CUDA graph). Float32 operands (only the checks against torch use them) get
one small tile: IEEE float32 dots run on the CUDA cores, and big tiles there take long
to compile. Under ``TRITON_INTERPRET=1`` one tiny tile is used, so that the CPU tests
cover several tiles per dimension plus ragged edges at small sizes and run quickly.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# MM_SPECTRAL_TUNE=0: no autotuning, the first tile of each list (tests on a GPU compile
# each kernel variant once instead of once per tile).
TUNE: bool = os.environ.get("MM_SPECTRAL_TUNE", "1") != "0"

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); none spills registers on sm_90.
_GEMM_TILES = [
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
]
_PASS_TILES = [(128, 64, 4, 3), (128, 128, 8, 3), (256, 64, 8, 3), (64, 128, 4, 3)]
_GEMM_FP32 = triton.Config(dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4), num_warps=4)
_PASS_FP32 = triton.Config(dict(BLOCK_M=32, BLOCK_N=32), num_warps=4)


def dot_precision(dtype: torch.dtype) -> str:
    """Dot precision: IEEE for float32 operands (the checks against torch), else irrelevant."""
    return "ieee" if dtype == torch.float32 else "tf32"


def gemm_configs() -> list[triton.Config]:
    """Tiles (BLOCK_M, BLOCK_N, BLOCK_K) for a GEMM whose output is BLOCK_M × BLOCK_N."""
    if INTERPRET:
        return [triton.Config(dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2))]
    return [
        triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8), num_warps=w, num_stages=s)
        for m, n, k, w, s in _GEMM_TILES
    ]


def pass_configs() -> list[triton.Config]:
    """Tiles (BLOCK_M, BLOCK_N) for a memory-bound pass over a tokens × features matrix."""
    if INTERPRET:
        return [triton.Config(dict(BLOCK_M=16, BLOCK_N=16))]
    return [
        triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s)
        for m, n, w, s in _PASS_TILES
    ]


def prune_for(tensor_arg: str, fp32_config: triton.Config) -> Callable[..., list[triton.Config]]:
    """An ``early_config_prune``: the float32 tile for float32 operands, the first tile
    when tuning is off, else all (``tensor_arg`` names the kernel argument to look at)."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        if named_args[tensor_arg].dtype == torch.float32:
            return [fp32_config]
        return configs if TUNE else configs[:1]

    return prune


GEMM_PRUNE_FP32 = _GEMM_FP32
PASS_PRUNE_FP32 = _PASS_FP32


def smallest_block_m(configs: list[triton.Config], dtype: torch.dtype) -> int:
    """The smallest BLOCK_M a launch with ``dtype`` operands may use (partial-sum buffers
    are sized for it)."""
    if dtype == torch.float32 and not INTERPRET:
        configs = [_GEMM_FP32, _PASS_FP32]
    return min(c.kwargs["BLOCK_M"] for c in configs)


def rank_block(rank: int) -> int:
    """The rank tile: a power of two ≥ 16 (the smallest tensor-core dot side)."""
    return max(16, triton.next_power_of_2(rank))
