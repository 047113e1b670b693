"""Backward of a low-rank adapted linear with a Triton dx GEMM carrying the rank term.

With g = ∂L/∂y (M × N), h = x downᵀ (M × R) and s the scale, the gradients are
gh = g up, d_up = s gᵀ h, d_bias = Σ_rows g, dx = g W + s gh down, d_down = s ghᵀ x.
The plain path streams g three times (g up, gᵀ h, g W), dx twice (g W, then addmm_)
and x once more. Here:

1. one memory-bound pass over g makes gh, d_up and d_bias
   (:func:`~mm_spectral.kernels.low_rank_passes.grad_out_pass`);
2. ``_grad_input_kernel``, the dx GEMM, adds the rank-R term as one more reduction step
   on its output tile ([g | s gh] · [W ; down]), so dx is written once, and each program
   loads its x tile once more to write its share of d_down = s ghᵀ x — no separate pass
   over x.

Partial sums over token tiles go to float32 buffers, one slice per tile (deterministic,
no atomics, so no zero-filling), reduced by one small ``sum``; adapter gradients come
back in float32. (A one-kernel variant that also took gh, d_up and d_bias from the GEMM's
own g tiles was dropped: compiled for sm_90 its d_up came out wrong, in the interpreter
right, and it was no faster.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .low_rank_passes import down_grad, grad_out_pass
from .tiles import GEMM, dot_precision, rank_block


@triton.autotune(
    configs=GEMM.configs(),
    key=["M", "N", "K", "R", "NEED_DDOWN"],
    prune_configs_by=GEMM.prune_by("x_ptr"),
)
@triton.jit
def _grad_input_kernel(
    g_ptr, w_ptr, gh_ptr, down_ptr, x_ptr, dx_ptr, dd_ptr,
    M, N, K, R,
    stride_gm, stride_gn, stride_wn, stride_wk, stride_ghm, stride_dr, stride_dk,
    stride_xm, stride_xk, stride_dxm, stride_dxk, stride_dd_s, stride_dd_r,
    scale,
    NEED_DDOWN: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
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
    # Wrapped rows/columns (results never stored) spare the N loop row/column masks; the
    # d_down sum masks its x tile instead.
    safe_m = offs_m % M
    safe_k = offs_k % K
    offs_n = tl.arange(0, BLOCK_K)
    g_ptrs = g_ptr + safe_m[:, None] * stride_gm + offs_n[None, :] * stride_gn
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + safe_k[None, :] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n in range(0, tl.cdiv(N, BLOCK_K)):
        n_ok = offs_n < N - n * BLOCK_K
        g = tl.load(g_ptrs, mask=n_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
        acc = tl.dot(g, w, acc, input_precision=PRECISION)
        g_ptrs += BLOCK_K * stride_gn
        w_ptrs += BLOCK_K * stride_wn

    # gh in the compute dtype, as the plain path's g·up.
    gh_ptrs = gh_ptr + safe_m[:, None] * stride_ghm + offs_r[None, :]
    gh = tl.load(gh_ptrs, mask=rank_ok[None, :], other=0.0).to(dx_ptr.dtype.element_ty)
    d_ptrs = down_ptr + offs_r[:, None] * stride_dr + safe_k[None, :] * stride_dk
    d = tl.load(d_ptrs, mask=rank_ok[:, None], other=0.0)
    # acc + s·(gh down) accumulated in place (a second BLOCK_M × BLOCK_N accumulator would
    # spill registers): divide by s, add gh down as the plain path's addmm does, multiply back.
    if scale != 0.0:
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
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(dx, d_bias, d_down, d_up) of y = x Wᵀ + b + scale · (x downᵀ) upᵀ; None where unneeded.

    Args:
        grad_out: (M, N) ∂L/∂y, any strides, in the compute dtype.
        x: (M, K); weight: (N, K); down: (R, K); up: (N, R); hidden: (M, R) = x downᵀ.
        scale: the adapter's scale s.
        need_*: which gradients to compute (the weight's own gradient is not made here).

    dx is in the compute dtype; d_bias, d_down and d_up are float32.
    """
    m, n = grad_out.shape
    k = x.shape[1]
    r = up.shape[1]
    need_gh = need_x or need_down
    if not (need_gh or need_up or need_bias):
        return None, None, None, None
    gh, d_up, d_bias = grad_out_pass(grad_out, up, hidden, scale, need_gh, need_up, need_bias)
    if not need_x:
        return None, d_bias, (down_grad(gh, x, scale) if need_down else None), d_up
    tiles_m = triton.cdiv(m, GEMM.smallest_block_m(x.dtype))
    dx = torch.empty((m, k), device=x.device, dtype=x.dtype)
    shape = (tiles_m, r, k) if need_down else (1, 1, 1)
    dd_parts = torch.empty(shape, device=x.device, dtype=torch.float32)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_N"]),)

    _grad_input_kernel[grid](
        grad_out, weight, gh, down, x, dx, dd_parts,
        m, n, k, r,
        grad_out.stride(0), grad_out.stride(1), weight.stride(0), weight.stride(1),
        gh.stride(0), down.stride(0), down.stride(1),
        x.stride(0), x.stride(1), dx.stride(0), dx.stride(1),
        dd_parts.stride(0), dd_parts.stride(1),
        float(scale),
        NEED_DDOWN=need_down, BLOCK_R=rank_block(r), PRECISION=dot_precision(x.dtype),
    )  # fmt: skip
    d_down = None
    if need_down:
        used = triton.cdiv(m, _grad_input_kernel.best_config.kwargs["BLOCK_M"])
        d_down = dd_parts[:used].sum(0)
    return dx, d_bias, d_down, d_up
