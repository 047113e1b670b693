"""Memory-bound passes of a low-rank adapted linear: each reads one activation-sized
matrix once and does every thin product that needs it.

With x (M × K), g = ∂L/∂y (M × N), h = x downᵀ (M × R), gh = g up and scale s:

- :func:`down_projection` — h = x downᵀ, optionally also copying x into [x | h] (the
  input of a GEMM whose reduction runs over K + R, so the rank-R term costs no pass over y);
- :func:`grad_out_pass` — gh, d_up = s gᵀh and d_bias = Σ_rows g from one read of g,
  optionally also writing [g | s·gh] (the input of the dx GEMM over N + R);
- :func:`down_grad` — d_down = s ghᵀ x from one read of x.

The thin products run as tensor-core dots on tiles already loaded, so each pass costs
about one read (and where asked one write) of its big matrix. Partial sums over token
tiles go to float32 buffers, one slice per tile (deterministic, no atomics), reduced by
one small ``sum``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .tiles import PASS, dot_precision, rank_block

# Target number of programs of a pass (it must fill the GPU to stream at full bandwidth).
PASS_PROGRAMS = 528


@triton.autotune(
    configs=PASS.configs(),
    key=["M", "K", "R", "WRITE_CAT"],
    prune_configs_by=PASS.prune_by("x_ptr"),
)
@triton.jit
def _down_kernel(
    x_ptr, down_ptr, h_ptr, cat_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_dr, stride_dk, stride_hm, stride_hr, stride_cm, stride_ck,
    WRITE_CAT: tl.constexpr, SMALL_M: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """h rows of one token tile (BLOCK_M rows, K in steps of BLOCK_N); x copied if WRITE_CAT."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = offs_m < M
    rank_ok = offs_r < R
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_N):
        cols = k0 + offs_k
        k_ok = cols < K
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + cols[None, :] * stride_xk
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        d_ptrs = down_ptr + offs_r[None, :] * stride_dr + cols[:, None] * stride_dk
        d = tl.load(d_ptrs, mask=k_ok[:, None] & rank_ok[None, :], other=0.0)
        h = tl.dot(x, d, h, input_precision=PRECISION)
        if WRITE_CAT:
            c_ptrs = cat_ptr + offs_m[:, None] * stride_cm + cols[None, :] * stride_ck
            tl.store(c_ptrs, x, mask=row_ok[:, None] & k_ok[None, :])
    h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & rank_ok[None, :])


def down_projection(x: Tensor, down: Tensor, cat_out: Tensor | None = None) -> Tensor:
    """h = x downᵀ (M × R) in x's dtype, rounded once from a float32 accumulation.

    With ``cat_out`` (M × (K + R)), x is also copied into ``cat_out[:, :K]`` and h is
    written to (and returned as) the view ``cat_out[:, K:]``.
    """
    m, k = x.shape
    r = down.shape[0]
    if cat_out is None:
        h = torch.empty((m, r), device=x.device, dtype=x.dtype)
        cat = h
    else:
        h, cat = cat_out[:, k:], cat_out

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]),)

    _down_kernel[grid](
        x, down, h, cat, m, k, r,
        x.stride(0), x.stride(1), down.stride(0), down.stride(1),
        h.stride(0), h.stride(1), cat.stride(0), cat.stride(1),
        WRITE_CAT=cat_out is not None, SMALL_M=True, BLOCK_R=rank_block(r),
        PRECISION=dot_precision(x.dtype),
    )  # fmt: skip
    return h


@triton.autotune(
    configs=PASS.configs(),
    key=["M", "N", "R", "NEED_GH", "NEED_DUP", "NEED_DB", "WRITE_CAT"],
    prune_configs_by=PASS.prune_by("g_ptr"),
)
@triton.jit
def _grad_out_pass_kernel(
    g_ptr, up_ptr, h_ptr, gh_ptr, dup_ptr, db_ptr, cat_ptr,
    M, N, R, chunk,
    stride_gm, stride_gn, stride_un, stride_ur, stride_hm, stride_hr,
    stride_gh_s, stride_gh_m, stride_dup_s, stride_dup_n, stride_db_s, stride_cm, stride_cn,
    scale,
    NEED_GH: tl.constexpr, NEED_DUP: tl.constexpr, NEED_DB: tl.constexpr,
    WRITE_CAT: tl.constexpr, SMALL_M: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Program (pid_m, pid_s): gh, d_up, d_bias of token tile pid_m over out-feature chunk pid_s."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = offs_m < M
    rank_ok = offs_r < R
    if NEED_DUP:
        h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr
        h = tl.load(h_ptrs, mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
    gh = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    start = pid_s * chunk
    for n0 in range(start, tl.minimum(start + chunk, N), BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        g_ptrs = g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn
        g = tl.load(g_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if WRITE_CAT:
            c_ptrs = cat_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
            tl.store(c_ptrs, g, mask=row_ok[:, None] & col_ok[None, :])
        if NEED_GH:
            u_ptrs = up_ptr + offs_n[:, None] * stride_un + offs_r[None, :] * stride_ur
            u = tl.load(u_ptrs, mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
            gh = tl.dot(g, u, gh, input_precision=PRECISION)
        if NEED_DUP:
            # (BLOCK_N, BLOCK_R)
            part = tl.dot(tl.trans(g), h, input_precision=PRECISION) * scale
            dup_ptrs = (
                dup_ptr + pid_m * stride_dup_s + offs_n[:, None] * stride_dup_n + offs_r[None, :]
            )
            tl.store(dup_ptrs, part, mask=col_ok[:, None] & rank_ok[None, :])
        if NEED_DB:
            col_sums = tl.sum(g.to(tl.float32), 0)
            tl.store(db_ptr + pid_m * stride_db_s + offs_n, col_sums, mask=col_ok)
    if WRITE_CAT:  # s·gh after g's columns, in g's dtype
        c_ptrs = cat_ptr + offs_m[:, None] * stride_cm + (N + offs_r[None, :]) * stride_cn
        gh_out = (gh * scale).to(cat_ptr.dtype.element_ty)
        tl.store(c_ptrs, gh_out, mask=row_ok[:, None] & rank_ok[None, :])
    elif NEED_GH:
        gh_ptrs = gh_ptr + pid_s * stride_gh_s + offs_m[:, None] * stride_gh_m + offs_r[None, :]
        tl.store(gh_ptrs, gh, mask=row_ok[:, None] & rank_ok[None, :])


def grad_out_pass(
    g: Tensor,
    up: Tensor,
    hidden: Tensor,
    scale: float,
    need_gh: bool,
    need_up: bool,
    need_bias: bool,
    cat_out: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(gh, d_up, d_bias) from one read of g (M × N); None where unneeded.

    gh = g up is float32 (M × R); d_up = scale · gᵀ hidden and d_bias are float32. With
    ``cat_out`` (M × (N + R), g's dtype), g is also copied into ``cat_out[:, :N]`` and
    scale · gh written to ``cat_out[:, N:]``, which is returned as gh instead.
    """
    m, n = g.shape
    r = up.shape[1]
    f32 = dict(device=g.device, dtype=torch.float32)
    write_cat = cat_out is not None
    tiles_m = triton.cdiv(m, PASS.smallest_block_m(g.dtype))
    if write_cat:  # gh must be complete in one program: no split of N, small token tiles
        splits, chunk = 1, n
    else:
        max_bn = PASS.largest("BLOCK_N", g.dtype)
        splits = max(1, min(triton.cdiv(n, max_bn), triton.cdiv(PASS_PROGRAMS, tiles_m)))
        chunk = triton.cdiv(triton.cdiv(n, splits), max_bn) * max_bn
        splits = triton.cdiv(n, chunk)
    gh_parts = torch.empty((splits, m, r) if need_gh and not write_cat else (1, 1, 1), **f32)
    dup_parts = torch.empty((tiles_m, n, r) if need_up else (1, 1, 1), **f32)
    db_parts = torch.empty((tiles_m, n) if need_bias else (1, 1), **f32)
    cat = cat_out if write_cat else g

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(m, meta["BLOCK_M"]), splits)

    _grad_out_pass_kernel[grid](
        g, up, hidden, gh_parts, dup_parts, db_parts, cat,
        m, n, r, chunk,
        g.stride(0), g.stride(1), up.stride(0), up.stride(1), hidden.stride(0), hidden.stride(1),
        gh_parts.stride(0), gh_parts.stride(1), dup_parts.stride(0), dup_parts.stride(1),
        db_parts.stride(0), cat.stride(0), cat.stride(1),
        float(scale),
        NEED_GH=need_gh, NEED_DUP=need_up, NEED_DB=need_bias, WRITE_CAT=write_cat,
        SMALL_M=write_cat, BLOCK_R=rank_block(r), PRECISION=dot_precision(g.dtype),
    )  # fmt: skip
    used = triton.cdiv(m, _grad_out_pass_kernel.best_config.kwargs["BLOCK_M"])
    gh = None
    if need_gh:
        gh = cat_out[:, n:] if write_cat else (gh_parts[0] if splits == 1 else gh_parts.sum(0))
    d_up = dup_parts[:used].sum(0) if need_up else None
    d_bias = db_parts[:used].sum(0) if need_bias else None
    return gh, d_up, d_bias


@triton.autotune(
    configs=PASS.configs(), key=["M", "K", "R"], prune_configs_by=PASS.prune_by("x_ptr")
)
@triton.jit
def _down_grad_kernel(
    gh_ptr, x_ptr, out_ptr,
    M, K, R, rows,
    stride_ghm, stride_ghr, stride_xm, stride_xk, stride_os, stride_or,
    SMALL_M: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Program (pid_k, pid_s): ghᵀ x for in-features tile pid_k over token chunk pid_s."""
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    k_ok = offs_k < K
    rank_ok = offs_r < R
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    start = pid_s * rows
    for m0 in range(start, tl.minimum(start + rows, M), BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < M
        gh_ptrs = gh_ptr + offs_m[:, None] * stride_ghm + offs_r[None, :] * stride_ghr
        gh = tl.load(gh_ptrs, mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(gh.to(x.dtype)), x, acc, input_precision=PRECISION)
    out_ptrs = out_ptr + pid_s * stride_os + offs_r[:, None] * stride_or + offs_k[None, :]
    tl.store(out_ptrs, acc, mask=rank_ok[:, None] & k_ok[None, :])


def down_grad(gh: Tensor, x: Tensor, scale: float) -> Tensor:
    """scale · ghᵀ x (float32, R × K) from one read of x; gh (M × R) any float dtype.

    gh is rounded to x's dtype for the tensor-core dot, as the plain path's bf16 g·up is.
    """
    m, k = x.shape
    r = gh.shape[1]
    max_bn = PASS.largest("BLOCK_N", x.dtype)
    max_bm = PASS.largest("BLOCK_M", x.dtype)
    splits = max(1, min(triton.cdiv(m, max_bm), triton.cdiv(PASS_PROGRAMS, triton.cdiv(k, max_bn))))
    rows = triton.cdiv(triton.cdiv(m, splits), max_bm) * max_bm  # a multiple of every BLOCK_M
    splits = triton.cdiv(m, rows)
    parts = torch.empty((splits, r, k), device=x.device, dtype=torch.float32)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(k, meta["BLOCK_N"]), splits)

    _down_grad_kernel[grid](
        gh, x, parts, m, k, r, rows,
        gh.stride(0), gh.stride(1), x.stride(0), x.stride(1), parts.stride(0), parts.stride(1),
        SMALL_M=False, BLOCK_R=rank_block(r), PRECISION=dot_precision(x.dtype),
    )  # fmt: skip
    out = parts[0] if splits == 1 else parts.sum(0)
    return out if scale == 1.0 else out.mul_(scale)
