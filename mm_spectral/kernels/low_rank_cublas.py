"""A low-rank adapted linear on cuBLAS GEMMs, the rank-R term folded into their reduction.

y = x Wᵀ + b + s (x downᵀ) upᵀ is one GEMM over the concatenated inner dimension,
y = [x | h] · [W | s·up]ᵀ + b with h = x downᵀ, and likewise dx = [g | s·gh] · [W ; down]
with gh = g up. Building the concatenated operand costs a copy of x (or g); adding the
rank term afterwards (``addmm_``) costs a read and a write of y (or dx). Each GEMM takes
whichever is smaller, so the extra traffic is on the smaller of the two activations,
and the thin products ride along the passes that make it
(:mod:`~mm_spectral.kernels.low_rank_passes`):

- forward: in-features ≤ out-features (fc1, qkv): one pass over x writes [x | h], then
  one cuBLAS GEMM over K + R; otherwise one pass over x makes h, the cuBLAS GEMM writes y
  and ``addmm_`` adds s h upᵀ;
- backward: one pass over g makes gh, d_up, d_bias — and, when out-features ≤
  in-features (fc2), writes [g | s·gh] for one cuBLAS dx GEMM over N + R; otherwise dx =
  g W by cuBLAS then ``addmm_``; one pass over x makes d_down = s ghᵀ x.

The weight's cast to the compute dtype (done anyway under autocast) is written straight
into the concatenated weight. The big GEMMs are cuBLAS's, so this runs at their speed
plus one pass over the smaller activation per GEMM and one over x for d_down.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .low_rank_passes import down_grad, down_projection, grad_out_pass


def cublas_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, down: Tensor, up: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, x, w, h): y = x Wᵀ + b + scale · h upᵀ, and what :func:`cublas_backward` needs.

    Args:
        x: (M, K) in the compute dtype; weight: (N, K) any float dtype (cast here, into
            the concatenated operand); bias: (N,) compute dtype or None; down: (R, K),
            up: (N, R) in the compute dtype.

    Returns y (M, N), x (possibly a view into [x | h]), w — the weight in the compute
    dtype, either a view (N, K) or, when in-features > out-features, the stacked
    [W ; down] (N + R, K) that the backward's dx GEMM reads — and h = x downᵀ.
    """
    m, k = x.shape
    n, r = up.shape
    dtype = x.dtype
    if k <= n:  # [x | h] · [W | s·up]ᵀ: copy x (the smaller), no extra pass over y
        x_cat = torch.empty((m, k + r), device=x.device, dtype=dtype)
        h = down_projection(x, down, cat_out=x_cat)
        w_cat = torch.empty((n, k + r), device=x.device, dtype=dtype)
        w_cat[:, :k].copy_(weight)
        torch.mul(up, scale, out=w_cat[:, k:])
        y = torch.mm(x_cat, w_cat.t()) if bias is None else torch.addmm(bias, x_cat, w_cat.t())
        return y, x_cat[:, :k], w_cat[:, :k], h
    # y is the smaller: y = x Wᵀ + b, then one read and write of y for the rank term. The
    # weight's cast goes into [W ; down], the operand of the backward's dx GEMM.
    h = down_projection(x, down)
    w_stack = torch.empty((n + r, k), device=x.device, dtype=dtype)
    w_stack[:n].copy_(weight)
    w_stack[n:].copy_(down)
    w = w_stack[:n]
    y = torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())
    y.addmm_(h, up.t(), alpha=scale)
    return y, x, w_stack, h


def cublas_backward(
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
    """(dx, d_bias, d_down, d_up) of the forward above; None where unneeded.

    Args: as :func:`~mm_spectral.kernels.low_rank_backward.low_rank_backward`
    (``weight`` in the compute dtype). dx is in the compute dtype, the rest float32.
    """
    m, n = grad_out.shape
    k = x.shape[1]
    r = up.shape[1]
    stacked = weight.shape[0] == n + r  # [W ; down] from the forward
    need_gh = need_x or need_down
    dx = d_down = None
    if need_x and n <= k:  # [g | s·gh] · [W ; down]: copy g (the smaller)
        g_cat = torch.empty((m, n + r), device=x.device, dtype=x.dtype)
        gh, d_up, d_bias = grad_out_pass(
            grad_out, up, hidden, scale, True, need_up, need_bias, cat_out=g_cat
        )
        if stacked:
            w_stack = weight
        else:
            w_stack = torch.empty((n + r, k), device=x.device, dtype=x.dtype)
            w_stack[:n].copy_(weight)
            w_stack[n:].copy_(down)
        dx = torch.mm(g_cat, w_stack)
        if need_down:
            d_down = down_grad(gh, x, 1.0)  # gh is scale · g up already
        return dx, d_bias, d_down, d_up
    gh, d_up, d_bias = grad_out_pass(grad_out, up, hidden, scale, need_gh, need_up, need_bias)
    if need_x:
        dx = torch.mm(grad_out, weight[:n] if stacked else weight)
        dx.addmm_(gh.to(dx.dtype), down, alpha=scale)  # dx is the smaller
    if need_down:
        d_down = down_grad(gh, x, scale)
    return dx, d_bias, d_down, d_up
