"""Forward of a low-rank adapted linear as one GEMM: y = x Wᵀ + b + s · h upᵀ, h = x downᵀ.

Why: the plain path writes y = x Wᵀ + b, then reads and rewrites all of y to add the
rank-r term (``addmm_``), two extra passes over a tokens × out-features tensor. Here the
rank-r term is one more step of the GEMM's reduction (the product over the concatenated
inner dimension [x | h] · [W | s·up]ᵀ), done on the output tile in registers, so y is
written once. h (tokens × r, tiny) comes from one thin cuBLAS GEMM, or — with
``fuse_down`` — is accumulated inside the same K loop from the x tiles already loaded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .tiles import GEMM, dot_precision, rank_block


@triton.autotune(
    configs=GEMM.configs(),
    key=["M", "N", "K", "FUSE_DOWN"],
    prune_configs_by=GEMM.prune_by("x_ptr"),
)
@triton.jit
def _low_rank_forward_kernel(
    x_ptr, w_ptr, bias_ptr, down_ptr, up_ptr, h_ptr, y_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_dr, stride_dk,
    stride_un, stride_ur, stride_hm, stride_hr, stride_ym, stride_yn,
    scale,
    HAS_BIAS: tl.constexpr, FUSE_DOWN: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # Grouped tile order: GROUP_M row-tiles share the W tiles they read while in L2.
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * tiles_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    # Rows/columns past the edge wrap around (their results are never stored), so the
    # K loop needs no row or column masks.
    safe_m = offs_m % M
    safe_n = offs_n % N
    x_ptrs = x_ptr + safe_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + safe_n[None, :] * stride_wn
    d_ptrs = down_ptr + offs_k[:, None] * stride_dk + offs_r[None, :] * stride_dr

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    hidden = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if FUSE_DOWN:
            d = tl.load(d_ptrs, mask=(offs_k[:, None] < k_left) & (offs_r[None, :] < R), other=0.0)
            hidden = tl.dot(x, d, hidden, input_precision=PRECISION)
            d_ptrs += BLOCK_K * stride_dk
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    row_ok = offs_m < M
    if FUSE_DOWN:
        # Rounded to the compute dtype, as the plain path's F.linear(x, down) is.
        h = hidden.to(y_ptr.dtype.element_ty)
        if pid_n == 0:  # one tile column writes h for the backward
            h_out = h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr
            tl.store(h_out, h, mask=row_ok[:, None] & (offs_r[None, :] < R))
    else:
        h_in = h_ptr + safe_m[:, None] * stride_hm + offs_r[None, :] * stride_hr
        h = tl.load(h_in, mask=offs_r[None, :] < R, other=0.0)
    u_ptrs = up_ptr + offs_r[:, None] * stride_ur + safe_n[None, :] * stride_un
    u = tl.load(u_ptrs, mask=offs_r[:, None] < R, other=0.0)
    # acc + s·(h u) accumulated in place (a second BLOCK_M × BLOCK_N accumulator would
    # spill): divide by s, add h u exactly as the torch path's addmm does, multiply back.
    if scale != 0.0:
        acc = tl.dot(h, u, acc * (1.0 / scale), input_precision=PRECISION) * scale
    if HAS_BIAS:
        acc += tl.load(bias_ptr + safe_n).to(tl.float32)[None, :]

    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < N))


def low_rank_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    down: Tensor,
    up: Tensor,
    scale: float,
    fuse_down: bool = False,
) -> tuple[Tensor, Tensor]:
    """(y, h) with y = x Wᵀ + b + scale · h upᵀ and h = x downᵀ, all in x's dtype.

    Args:
        x: (M, K) tokens × in-features (any strides).
        weight: (N, K); bias: (N,) or None; down: (R, K); up: (N, R) — x's dtype.
        scale: the adapter's scale s.
        fuse_down: compute h inside the GEMM's K loop instead of a separate thin GEMM.
    """
    m, k = x.shape
    n, r = up.shape
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if fuse_down:
        h = torch.empty((m, r), device=x.device, dtype=x.dtype)
    else:
        h = torch.mm(x, down.t())

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _low_rank_forward_kernel[grid](
        x, weight, bias if bias is not None else y, down, up, h, y,
        m, n, k, r,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        down.stride(0), down.stride(1), up.stride(0), up.stride(1),
        h.stride(0), h.stride(1), y.stride(0), y.stride(1),
        float(scale),
        HAS_BIAS=bias is not None, FUSE_DOWN=fuse_down, BLOCK_R=rank_block(r),
        PRECISION=dot_precision(x.dtype),
    )  # fmt: skip
    return y, h
