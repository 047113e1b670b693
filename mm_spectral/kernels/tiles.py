"""Tile configurations of the low-rank kernels.

On a GPU, ``triton.autotune`` picks among a few Hopper-friendly tiles per shape and dtype
(cached per process; the first call of a new shape benchmarks, so warm up before
capturing a CUDA graph). Float32 operands (only the checks against torch use them) get
one small tile: IEEE float32 dots run on the CUDA cores, and big tiles there take long
to compile. Under ``TRITON_INTERPRET=1`` one tiny tile is used, so that the CPU tests
cover several tiles per dimension plus ragged edges at small sizes and run quickly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import triton

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# MM_SPECTRAL_TUNE=0: no autotuning, the first tile of each list (tests on a GPU compile
# each kernel variant once instead of once per tile).
TUNE: bool = os.environ.get("MM_SPECTRAL_TUNE", "1") != "0"


class Tiles:
    """The configs of one kernel: GPU tiles, a float32 tile, an interpreter tile.

    Args:
        names: the block-size meta-parameters, e.g. ("BLOCK_M", "BLOCK_N", "BLOCK_K").
        gpu: (block sizes..., warps, stages) per GPU tile, best guesses first.
        fp32: block sizes of the float32 tile; interpret: of the interpreter tile.
        extra: fixed meta-parameters added to every config (e.g. GROUP_M).
        small_m: for ``prune(..., SMALL_M=True)`` launches keep tiles with BLOCK_M ≤ this.
    """

    def __init__(
        self,
        names: Sequence[str],
        gpu: Sequence[tuple[int, ...]],
        fp32: Sequence[int],
        interpret: Sequence[int],
        extra: dict | None = None,
        small_m: int = 64,
    ) -> None:
        extra = extra or {}
        self.small_m = small_m
        self.gpu = [
            triton.Config({**dict(zip(names, t[:-2])), **extra}, num_warps=t[-2], num_stages=t[-1])
            for t in gpu
        ]
        self.fp32 = triton.Config({**dict(zip(names, fp32)), **extra}, num_warps=4, num_stages=2)
        self.interp = triton.Config({**dict(zip(names, interpret)), **extra})

    def configs(self) -> list[triton.Config]:
        return [self.interp] if INTERPRET else [*self.gpu]

    def prune_by(self, tensor_arg: str) -> dict[str, Callable[..., list[triton.Config]]]:
        """``prune_configs_by`` for triton.autotune: the float32 tile for float32 operands
        (``tensor_arg`` names the kernel argument to look at), the first tile when tuning
        is off, small-BLOCK_M tiles when the launch passes SMALL_M=True."""

        def prune(configs: list, named_args: dict, **kwargs) -> list[triton.Config]:
            if named_args[tensor_arg].dtype == torch.float32:
                return [self.fp32]
            if kwargs.get("SMALL_M"):
                configs = [c for c in configs if c.kwargs["BLOCK_M"] <= self.small_m]
            return configs if TUNE else configs[:1]

        return {"early_config_prune": prune}

    def usable(self, dtype: torch.dtype) -> list[triton.Config]:
        """The configs a launch with ``dtype`` operands may use."""
        if INTERPRET:
            return [self.interp]
        return [self.fp32] if dtype == torch.float32 else self.gpu

    def smallest_block_m(self, dtype: torch.dtype) -> int:
        """The smallest BLOCK_M a launch may use (partial-sum buffers are sized for it)."""
        return min(c.kwargs["BLOCK_M"] for c in self.usable(dtype))

    def largest(self, name: str, dtype: torch.dtype) -> int:
        """The largest block size ``name`` a launch may use (all are powers of two, so
        chunks that are multiples of it suit every tile)."""
        return max(c.kwargs[name] for c in self.usable(dtype))


# GEMMs whose output tile is BLOCK_M × BLOCK_N (reduction steps of BLOCK_K). ptxas -v
# for sm_90: no register spills, except ~150 bytes in the backward's 256 × 128 tile.
GEMM = Tiles(
    ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
    [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4)],
    fp32=(32, 32, 32),
    interpret=(16, 16, 16),
    extra=dict(GROUP_M=8),
)
# Memory-bound passes over a tokens × features matrix, BLOCK_M tokens per program.
PASS = Tiles(
    ("BLOCK_M", "BLOCK_N"),
    [(128, 64, 4, 3), (64, 128, 4, 3), (32, 128, 4, 3)],
    fp32=(32, 32),
    interpret=(16, 16),
)


def dot_precision(dtype: torch.dtype) -> str:
    """Dot precision: IEEE for float32 operands (the checks against torch), else irrelevant."""
    return "ieee" if dtype == torch.float32 else "tf32"


def rank_block(rank: int) -> int:
    """The rank tile: a power of two ≥ 16 (the smallest tensor-core dot side)."""
    return max(16, triton.next_power_of_2(rank))
