"""FourierFT on a linear layer with the coefficient gradient taken from sampled spectra.

The dense route (``DeltaLinear`` + ``sparse_spectrum_to_real``) backpropagates through ΔW:
it forms gᵀx, a full out × in × tokens GEMM (as costly as full fine-tuning's weight
gradient), then reads n entries of its 2-D FFT. Here the backward computes
∂L/∂cⱼ = α/(o·i) · Re Σₜ FG[t,kⱼ] FX[t,lⱼ] directly (``spectral_grad``), with the fused
Triton kernel on a GPU where the widths allow and the torch route otherwise. Opt-in
(``OPTIONS.fourier_grad = "sampled"``): whether it is faster depends on the GPU — see
tools/benchmark_kernels.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.dispatch import compute_dtype, triton_available
from ..kernels.spectral_grad import sampled_spectrum_grad
from .bias_cast import compute_bias
from .functional import _as, _rows, add_as
from .spectral import sparse_spectrum_to_real


def coefficient_grad(grad_out: Tensor, x: Tensor, indices: Tensor, scale: float) -> Tensor:
    """∂L/∂c (float32) by the fused kernel when it can run, else by the torch route."""
    if grad_out.is_cuda and triton_available():
        from ..kernels.spectral_grad_kernel import fused_spectrum_grad, fused_supported

        if fused_supported(grad_out.shape[1], x.shape[1]):
            return fused_spectrum_grad(grad_out, x, indices, scale)
    return sampled_spectrum_grad(grad_out, x, indices, scale)


class SpectralDeltaLinear(torch.autograd.Function):
    """y = x (W + ΔW)ᵀ + b, ΔW = scale · Re(ifft2(F)), F[indices] = coefficients."""

    @staticmethod
    def forward(ctx, x, weight, bias, coefs, positions, indices, scale):  # type: ignore[override]
        dtype = compute_dtype(x)
        x2 = _as(_rows(x), dtype)
        delta = sparse_spectrum_to_real(coefs, positions, tuple(weight.shape), scale)
        w = add_as(weight, delta, 1.0, dtype)  # W + ΔW in the wider precision, cast on store
        y = F.linear(x2, w, None if bias is None else _as(bias, dtype))
        ctx.save_for_backward(x2, w, indices)
        ctx.scale, ctx.x_shape, ctx.coef_dtype = scale, x.shape, coefs.dtype
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x2, w, indices = ctx.saved_tensors
        need_x, need_w, need_b, need_c = ctx.needs_input_grad[:4]
        g = _as(_rows(grad_out), w.dtype)
        grad_x = grad_w = grad_b = grad_c = None
        if need_x:
            grad_x = torch.mm(g, w)
            grad_x = grad_x if len(ctx.x_shape) == 2 else grad_x.view(ctx.x_shape)
        if need_w:
            grad_w = torch.mm(g.t(), x2)
        if need_b:
            grad_b = g.sum(0)
        if need_c:
            grad_c = coefficient_grad(g, x2, indices, ctx.scale).to(ctx.coef_dtype)
        return grad_x, grad_w, grad_b, grad_c, None, None, None


def spectral_delta_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    coefficients: Tensor,
    positions: Tensor,
    indices: Tensor,
    scale: float,
) -> Tensor:
    """FourierFT's linear forward; the backward never forms gᵀx (see the module docstring)."""
    bias = compute_bias(bias, x)
    return SpectralDeltaLinear.apply(x, weight, bias, coefficients, positions, indices, scale)
