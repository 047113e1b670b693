"""Backward of a low-rank adapted linear in one or two kernels instead of six passes.

With g = ∂L/∂y (M × N), h = x downᵀ (M × R) and s the scale, the gradients are
gh = g up, d_up = s gᵀ h, d_bias = Σ_rows g, dx = g W + s gh down, d_down = s ghᵀ x.
The plain path streams g three times (g up, gᵀ h, g W), dx twice (g W, then addmm_)
and x once more. Here the dx GEMM (``_grad_input_kernel``) carries everything:

- the rank-R term is one more reduction step on its output tile ([g | s gh] · [W ; down]),
  so dx is written once;
- each program loads its x tile once more and writes its share of d_down = s ghᵀ x;
- gh, d_up and d_bias come either from a separate memory-bound pass over g
  (:func:`~mm_spectral.kernels.low_rank_passes.grad_out_pass`) or, with
  ``fuse_gh``, from the GEMM's own g tiles: gh accumulated in the N loop (R/BLOCK_N more
  tensor-core work, no extra read of g), d_up and d_bias from each g tile by exactly one
  of the programs that load it.

Partial sums over token tiles go to float32 buffers, one slice per tile (deterministic,
no atomics, so no zero-filling), reduced by one small ``sum``; adapter gradients come
back in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .low_rank_passes import grad_out_pass
from .tiles import GEMM, dot_precision, rank_block


@triton.autotune(
    configs=GEMM.configs(),
    key=["M", "N", "K", "R", "NEED_DX", "NEED_DDOWN", "FUSE_GH", "NEED_DUP", "NEED_DB"],
    prune_configs_by=GEMM.prune_by("x_ptr"),
)
@triton.jit
def _grad_input_kernel(
    g_ptr, w_ptr, up_ptr, h_ptr, gh_ptr, down_ptr, x_ptr, dx_ptr, dd_ptr, dup_ptr, db_ptr,
    M, N, K, R,
    stride_gm, stride_gn, stride_wn, stride_wk, stride_un, stride_ur, stride_hm, stride_hr,
    stride_ghm, stride_dr, stride_dk, stride_xm, stride_xk, stride_dxm, stride_dxk,
    stride_dd_s, stride_dd_r, stride_dup_s, stride_dup_n, stride_db_s,
    scale,
    NEED_DX: tl.constexpr, NEED_DDOWN: tl.constexpr, FUSE_GH: tl.constexpr,
    NEED_DUP: tl.constexpr, NEED_DB: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """dx tile (BLOCK_M tokens × BLOCK_N in-features), reducing over out-features by BLOCK_K."""
    pid = tl.program_id(0)
    tiles_m, tiles_k = tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_N)
    group_size = GROUP_M * tiles_k
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_k = (pid % group_size) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = offs_m < M
    col_ok = offs_k < K
    rank_ok = offs_r < R
    # Wrapped rows/columns (results never stored) spare the N loop row/column masks; where
    # a wrapped row could reach a stored sum (d_up, d_bias, d_down) its factor is masked.
    safe_m = offs_m % M
    safe_k = offs_k % K
    gh_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FUSE_GH and NEED_DUP:
        h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr
        h = tl.load(h_ptrs, mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
    if NEED_DX or FUSE_GH:
        offs_n = tl.arange(0, BLOCK_K)
        g_ptrs = g_ptr + safe_m[:, None] * stride_gm + offs_n[None, :] * stride_gn
        w_ptrs = w_ptr + offs_n[:, None] * stride_wn + safe_k[None, :] * stride_wk
        u_ptrs = up_ptr + offs_n[:, None] * stride_un + offs_r[None, :] * stride_ur
        for n in range(0, tl.cdiv(N, BLOCK_K)):
            n_ok = offs_n < N - n * BLOCK_K
            g = tl.load(g_ptrs, mask=n_ok[None, :], other=0.0)
            if NEED_DX:
                w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
                acc = tl.dot(g, w, acc, input_precision=PRECISION)
            if FUSE_GH:
                u = tl.load(u_ptrs, mask=n_ok[:, None] & rank_ok[None, :], other=0.0)
                gh_acc = tl.dot(g, u, gh_acc, input_precision=PRECISION)
                if NEED_DUP or NEED_DB:
                    if n % tiles_k == pid_k:  # one program per (token tile, N step)
                        cols = n * BLOCK_K + offs_n
                        if NEED_DUP:
                            part = tl.dot(tl.trans(g), h, input_precision=PRECISION) * scale
                            dup_ptrs = (
                                dup_ptr
                                + pid_m * stride_dup_s
                                + cols[:, None] * stride_dup_n
                                + offs_r[None, :]
                            )
                            tl.store(dup_ptrs, part, mask=n_ok[:, None] & rank_ok[None, :])
                        if NEED_DB:
                            g_rows = tl.where(row_ok[:, None], g.to(tl.float32), 0.0)
                            db_ptrs = db_ptr + pid_m * stride_db_s + cols
                            tl.store(db_ptrs, tl.sum(g_rows, 0), mask=n_ok)
            g_ptrs += BLOCK_K * stride_gn
            w_ptrs += BLOCK_K * stride_wn
            u_ptrs += BLOCK_K * stride_un

    if FUSE_GH:
        gh = gh_acc.to(dx_ptr.dtype.element_ty)  # the compute dtype, as the plain path's g·up
    else:
        gh_ptrs = gh_ptr + safe_m[:, None] * stride_ghm + offs_r[None, :]
        gh = tl.load(gh_ptrs, mask=rank_ok[None, :], other=0.0).to(dx_ptr.dtype.element_ty)
    if NEED_DX:
        d_ptrs = down_ptr + offs_r[:, None] * stride_dr + safe_k[None, :] * stride_dk
        d = tl.load(d_ptrs, mask=rank_ok[:, None], other=0.0)
        if scale != 0.0:  # in place, as in the forward kernel
            acc = tl.dot(gh, d, acc * (1.0 / scale), input_precision=PRECISION) * scale
        dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    if NEED_DDOWN:
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        x = tl.load(x_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        # (BLOCK_R, BLOCK_N)
        part = tl.dot(tl.trans(gh), x, input_precision=PRECISION) * scale
        dd_ptrs = dd_ptr + pid_m * stride_dd_s + offs_r[:, None] * stride_dd_r + offs_k[None, :]
        tl.store(dd_ptrs, part, mask=rank_ok[:, None] & col_ok[None, :])


def low_rank_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    down: Tensor,
    up: Tensor,
    hidden: Tensor,
    scale: float,
    need_x: bool,
    need_bias: bool,
    need_down: bool,
    need_up: bool,
    fuse_gh: bool = False,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(dx, d_bias, d_down, d_up) of y = x Wᵀ + b + scale · (x downᵀ) upᵀ; None where unneeded.

    Args:
        grad_out: (M, N) ∂L/∂y, any strides, in the compute dtype.
        x: (M, K); weight: (N, K); down: (R, K); up: (N, R); hidden: (M, R) = x downᵀ.
        scale: the adapter's scale s.
        need_*: which gradients to compute (the weight's own gradient is not made here).
        fuse_gh: one kernel (gh, d_up, d_bias from the dx GEMM's g tiles) instead of two.

    dx is in the compute dtype; d_bias, d_down and d_up are float32.
    """
    m, n = grad_out.shape
    k = x.shape[1]
    r = up.shape[1]
    block_r = rank_block(r)
    precision = dot_precision(x.dtype)
    need_gh = need_x or need_down
    f32 = dict(device=x.device, dtype=torch.float32)
    gemm_tiles_m = triton.cdiv(m, GEMM.smallest_block_m(x.dtype))
    run_gemm = need_gh or (fuse_gh and (need_up or need_bias))
    gh = dup_parts = db_parts = None
    d_bias = d_down = d_up = None
    if not fuse_gh and (need_gh or need_up or need_bias):
        gh, d_up, d_bias = grad_out_pass(grad_out, up, hidden, scale, need_gh, need_up, need_bias)

    if run_gemm:
        fused_up, fused_bias = fuse_gh and need_up, fuse_gh and need_bias
        dx = torch.empty((m, k), device=x.device, dtype=x.dtype) if need_x else x
        dd_parts = torch.empty((gemm_tiles_m, r, k) if need_down else (1, 1, 1), **f32)
        dup_parts = torch.empty((gemm_tiles_m, n, r) if fused_up else (1, 1, 1), **f32)
        db_parts = torch.empty((gemm_tiles_m, n) if fused_bias else (1, 1), **f32)
        gh_in = gh if gh is not None else dd_parts  # unread when fuse_gh

        def gemm_grid(meta: dict) -> tuple[int]:
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_N"]),)

        _grad_input_kernel[gemm_grid](
            grad_out, weight, up, hidden, gh_in, down, x, dx, dd_parts, dup_parts, db_parts,
            m, n, k, r,
            grad_out.stride(0), grad_out.stride(1), weight.stride(0), weight.stride(1),
            up.stride(0), up.stride(1), hidden.stride(0), hidden.stride(1),
            gh_in.stride(0), down.stride(0), down.stride(1),
            x.stride(0), x.stride(1), dx.stride(0), dx.stride(1),
            dd_parts.stride(0), dd_parts.stride(1), dup_parts.stride(0), dup_parts.stride(1),
            db_parts.stride(0),
            float(scale),
            NEED_DX=need_x, NEED_DDOWN=need_down, FUSE_GH=fuse_gh,
            NEED_DUP=fused_up, NEED_DB=fused_bias, BLOCK_R=block_r, PRECISION=precision,
        )  # fmt: skip
        used = triton.cdiv(m, _grad_input_kernel.best_config.kwargs["BLOCK_M"])
        if need_down:
            d_down = dd_parts[:used].sum(0)
        if fused_up:
            d_up = dup_parts[:used].sum(0)
        if fused_bias:
            d_bias = db_parts[:used].sum(0)
        return (dx if need_x else None), d_bias, d_down, d_up
    return None, d_bias, d_down, d_up
