"""Seeded spectral-entry sampling and the float32 inverse FFT of a sparse real spectrum.

Shared by FourierFT (ΔW itself is a sparse spectrum) and FoRA (each low-rank factor is).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.lru_cache(maxsize=64)
def _sample_entries_cached(
    rows: int, cols: int, n: int, seed: int, fc: float | None, bandwidth: float | None
) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    if fc is None:
        # The same draw as peft's FourierFT: a seeded permutation of the flat entries.
        flat = torch.randperm(rows * cols, generator=generator, device="cpu")[:n]
    else:
        candidates = band_entries(rows, cols, fc, bandwidth)
        if candidates.numel() < n:
            raise ValueError(
                f"the frequency band fc={fc}, bandwidth={bandwidth} of a {rows}x{cols} spectrum "
                f"holds {candidates.numel()} entries, fewer than n={n}"
            )
        flat = candidates[torch.randperm(candidates.numel(), generator=generator, device="cpu")[:n]]
    return torch.stack([flat // cols, flat % cols])


def sample_entries(
    rows: int,
    cols: int,
    n: int,
    seed: int,
    fc: float | None = None,
    bandwidth: float | None = None,
) -> Tensor:
    """Draw ``n`` distinct entries of a rows×cols spectrum as a LongTensor (2, n).

    The draw depends only on (shape, n, seed, band), so layers of one shape share entries
    and a seed reproduces them. With ``fc`` set, entries are drawn uniformly from the band
    ``|D(u, v) − fc| ≤ bandwidth / 2`` (FourierFT's frequency bias, paper Eq. 5), where
    D is the distance of the entry's signed frequency from the zero frequency.
    """
    if fc is not None and (bandwidth is None or bandwidth <= 0):
        raise ValueError(f"a frequency bias fc={fc} needs a bandwidth > 0, got {bandwidth!r}")
    return _sample_entries_cached(rows, cols, n, seed, fc, bandwidth).clone()


def band_entries(rows: int, cols: int, fc: float, bandwidth: float) -> Tensor:
    """Flat indices of the entries whose frequency radius lies within fc ± bandwidth/2."""
    u = torch.fft.fftfreq(rows, d=1.0 / rows, device="cpu").abs()  # signed frequency
    v = torch.fft.fftfreq(cols, d=1.0 / cols, device="cpu").abs()
    radius = torch.sqrt(u[:, None] ** 2 + v[None, :] ** 2)
    inside = (radius - fc).abs() <= bandwidth / 2
    return inside.flatten().nonzero().flatten()


class _SparseSpectrumToReal(torch.autograd.Function):
    """Forward: scatter into the Hermitian half spectrum and one inverse real FFT.

    Backward uses that Re(ifft2(F)) is linear in the coefficients with cosine basis
    functions: ∂/∂c_k = scale · Re(fft2(g))[u_k, v_k] / (rows · cols), read from one
    forward real FFT of the gradient, so autograd records one node, not ~10.
    """

    @staticmethod
    def forward(ctx, coefficients, positions, shape, scale):  # type: ignore[override]
        rows, cols = shape
        n = coefficients.numel()
        flat = torch.zeros(2 * (rows * (cols // 2 + 1) + 1), device=coefficients.device)
        values = coefficients.float()
        # Each entry gives half its coefficient to itself and half to its mirror, written
        # into real slots; slots outside the stored half land in the dropped extra one.
        flat.index_add_(0, positions[:n], values, alpha=0.5 * scale)
        flat.index_add_(0, positions[n : 2 * n], values, alpha=0.5 * scale)
        half = torch.view_as_complex(flat.view(-1, 2)[:-1]).view(rows, cols // 2 + 1)
        ctx.save_for_backward(positions[2 * n :])
        ctx.shape, ctx.scale, ctx.dtype = shape, scale, coefficients.dtype
        return torch.fft.irfft2(half, s=shape)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (gather,) = ctx.saved_tensors
        rows, cols = ctx.shape
        # take() reads in logical order whatever the strides (cuFFT may return a
        # non-contiguous spectrum), copying nothing.
        spectrum = torch.view_as_real(torch.fft.rfft2(grad_out.float()))
        grad = torch.take(spectrum, gather).mul_(ctx.scale / (rows * cols))
        return grad.to(ctx.dtype), None, None, None


def sparse_spectrum_to_real(
    coefficients: Tensor, positions: Tensor, shape: tuple[int, int], scale: float = 1.0
) -> Tensor:
    """scale · Re(ifft2(F)) in float32, F zero except at the entries behind ``positions``.

    ``positions`` comes from :func:`half_spectrum_positions` (computed once per adapter).
    For a real F, Re(ifft2(F)) = ifft2(H) with the Hermitian part H[k] = (F[k] + F[−k]) / 2,
    so the inverse *real* FFT of H's half spectrum gives it with half the work and no
    complex rows×cols result. Always float32 (the coefficients are float32 parameters, and
    FFTs are not among autocast's low-precision ops): cuFFT has no bf16 transform and fp16
    only for power-of-two sizes; the caller casts the result.
    """
    return _SparseSpectrumToReal.apply(coefficients, positions, tuple(shape), float(scale))


def half_spectrum_positions(indices: Tensor, shape: tuple[int, int]) -> Tensor:
    """Flat float slots in the (rows, cols//2+1) complex half spectrum, as one LongTensor (3n,).

    The first n are each entry's real slot, the next n its mirror's (slots outside the
    stored half map to the extra slot after it), the last n the slot where the entry's
    own or its mirror's frequency lies inside the half, read by the backward (a real
    signal's spectrum has equal real parts at k and −k).
    """
    rows, cols = shape
    half_cols = cols // 2 + 1
    extra = rows * half_cols
    u, v = indices[0], indices[1]
    mirror_u, mirror_v = (-u) % rows, (-v) % cols
    own = torch.where(v < half_cols, u * half_cols + v, extra)
    mirror = torch.where(mirror_v < half_cols, mirror_u * half_cols + mirror_v, extra)
    inside = torch.where(own < extra, own, mirror)
    return torch.cat([own, mirror, inside]) * 2


def hermitian_weights(indices: Tensor, shape: tuple[int, int]) -> Tensor:
    """Mean over positions of cos²(phase) per entry: 1 for self-conjugate entries, else ½.

    Used to set the variance of Re(ifft2(F)) exactly from the coefficients' variance.
    """
    rows, cols = shape
    u, v = indices[0], indices[1]
    self_conjugate = ((2 * u) % rows == 0) & ((2 * v) % cols == 0)
    return torch.where(self_conjugate, 1.0, 0.5)
