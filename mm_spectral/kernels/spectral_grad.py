"""FourierFT's coefficient gradient without forming gᵀx, in plain torch (the reference route).

FourierFT's ΔW (o × i, in-features i) is a sum of n cosines,

    ΔW[p, q] = α / (o·i) · Σⱼ cⱼ cos 2π(kⱼ p / o + lⱼ q / i),

so with y = x (W + ΔW)ᵀ, g = ∂L/∂y (T × o) and x (T × i),

    ∂L/∂cⱼ = α / (o·i) · Σₜ Σ_{p,q} g[t,p] x[t,q] cos 2π(kⱼ p / o + lⱼ q / i)
           = α / (o·i) · Re Σₜ FG[t, kⱼ] · FX[t, lⱼ],

with FG = fft(g, dim=1), FX = fft(x, dim=1) in torch's sign convention (e^{-2πi…}).
Derivation of the sign: cos(θ + φ) = Re(e^{iθ} e^{iφ}), and Σ_p g[t,p] e^{+2πi kp/o} is
conj(FG[t,k]) for a real g; Re(conj(a)·conj(b)) = Re(a·b), so no conjugate appears.
(Re(FG · conj(FX)) would be the gradient of cos 2π(kp/o − lq/i), a different ΔW.)

The dense route (today's backward) forms D = gᵀx, a full o × i × T GEMM, and reads
Re(fft2(D)) at the n entries. This route needs only two row FFTs and an n × T sampled
product — but as written here it writes both spectra (complex64, T × o and T × i) to
memory and gathers n × T of their entries; see ``spectral_grad_kernel`` for the fused
kernel that never stores them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def spectrum_columns(v: Tensor, frequencies: Tensor) -> Tensor:
    """fft(v, dim=1)[:, frequencies] (complex64, T × n) from the half spectrum of real ``v``.

    A real row's spectrum is Hermitian, F[size − f] = conj(F[f]), so one ``rfft`` (float32:
    cuFFT has no bf16 transform) gives every column.
    """
    size = v.shape[1]
    half = torch.fft.rfft(v if v.dtype == torch.float64 else v.float(), dim=1)
    mirrored = frequencies > size // 2
    picked = half[:, torch.where(mirrored, size - frequencies, frequencies)]
    return torch.where(mirrored, picked.conj(), picked)


def sampled_spectrum_grad(grad_out: Tensor, x: Tensor, indices: Tensor, scale: float) -> Tensor:
    """∂L/∂c (float32, n) of ΔW = scale · Re(ifft2(F)), F[indices] = c, in y = x (W + ΔW)ᵀ.

    Args:
        grad_out: (T, o) ∂L/∂y; x: (T, i) the layer's input rows.
        indices: (2, n) the spectral entries (kⱼ, lⱼ) (FourierFT's ``indices`` buffer).
        scale: α.
    """
    fg = spectrum_columns(grad_out, indices[0])
    fx = spectrum_columns(x, indices[1])
    o, i = grad_out.shape[1], x.shape[1]
    return (fg * fx).real.sum(0).mul_(scale / (o * i))


def dense_spectrum_grad(grad_out: Tensor, x: Tensor, indices: Tensor, scale: float) -> Tensor:
    """The same gradient by the dense route: D = gᵀx, then Re(fft2(D)) at the entries."""
    dense = torch.mm(grad_out.t(), x)
    dense = dense if dense.dtype == torch.float64 else dense.float()
    o, i = dense.shape
    spectrum = torch.fft.fft2(dense)
    return spectrum[indices[0], indices[1]].real.mul_(scale / (o * i))
