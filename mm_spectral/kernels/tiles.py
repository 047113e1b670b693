"""Tile configurations shared by the low-rank kernels.

On a GPU, ``triton.autotune`` picks among a few Hopper-friendly tiles per shape (cached
per process; the first call of a new shape benchmarks, so warm up before capturing a
CUDA graph). Under ``TRITON_INTERPRET=1`` one tiny tile is used, so that the CPU tests
cover several tiles per dimension plus ragged edges at small sizes and run quickly.
"""

from __future__ import annotations

import os

import torch
import triton

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# MM_SPECTRAL_TUNE=0: no autotuning, the first tile of each list (tests on a GPU compile
# each kernel variant once instead of once per tile).
TUNE: bool = os.environ.get("MM_SPECTRAL_TUNE", "1") != "0"


def _pick(configs: list[triton.Config]) -> list[triton.Config]:
    return configs if TUNE else configs[:1]


def dot_precision(dtype: torch.dtype) -> str:
    """Dot precision: IEEE for float32 operands (the checks against torch), else irrelevant."""
    return "ieee" if dtype == torch.float32 else "tf32"


def gemm_configs() -> list[triton.Config]:
    """Tiles (BLOCK_M, BLOCK_N, BLOCK_K) for a GEMM whose output is BLOCK_M × BLOCK_N."""
    if INTERPRET:
        return [triton.Config(dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2))]
    tiles = [
        # (BM, BN, BK, warps, stages)
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
    ]
    return _pick(
        [
            triton.Config(
                dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8), num_warps=w, num_stages=s
            )
            for m, n, k, w, s in tiles
        ]
    )


def pass_configs() -> list[triton.Config]:
    """Tiles (BLOCK_M, BLOCK_N) for a memory-bound pass over a tokens × features matrix."""
    if INTERPRET:
        return [triton.Config(dict(BLOCK_M=16, BLOCK_N=16))]
    tiles = [(128, 64, 4, 3), (128, 128, 8, 3), (256, 64, 8, 3), (64, 128, 4, 3)]
    return _pick(
        [
            triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s)
            for m, n, w, s in tiles
        ]
    )


def rank_block(rank: int) -> int:
    """The rank tile: a power of two ≥ 16 (the smallest tensor-core dot side)."""
    return max(16, triton.next_power_of_2(rank))
