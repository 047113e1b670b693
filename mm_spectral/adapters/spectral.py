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


def sparse_spectrum_to_real(
    coefficients: Tensor, positions: Tensor, shape: tuple[int, int], scale: float = 1.0
) -> Tensor:
    """scale · Re(ifft2(F)) in float32, F zero except at the entries behind ``positions``.

    ``positions`` comes from :func:`half_spectrum_positions` (computed once per adapter).
    For a real F, Re(ifft2(F)) = ifft2(H) with the Hermitian part H[k] = (F[k] + F[−k]) / 2,
    so the inverse *real* FFT of H's half spectrum gives it with half the work and no
    complex rows×cols result. Always float32: cuFFT has no bf16 transform and fp16 only for
    power-of-two sizes, so autocast is switched off here and the caller casts back.
    """
    rows, cols = shape
    half_cols = cols // 2 + 1
    device = coefficients.device
    with torch.autocast(device_type=device.type, enabled=False):
        # Each entry gives half its coefficient to itself and half to its mirror, written
        # straight into the real parts of a complex buffer (positions are doubled: real
        # slots); those outside the stored half land in one extra slot that is dropped.
        values = coefficients.float().repeat(2) * (0.5 * scale)
        buffer = torch.zeros(rows * half_cols + 1, 2, dtype=torch.float32, device=device)
        buffer = buffer.view(-1).index_add(0, positions * 2, values).view(-1, 2)
        half = torch.view_as_complex(buffer)[:-1].view(rows, half_cols)
        return torch.fft.irfft2(half, s=(rows, cols))


def half_spectrum_positions(indices: Tensor, shape: tuple[int, int]) -> Tensor:
    """Flat positions in the (rows, cols//2+1) half spectrum of each entry and its mirror.

    Returns 2n positions (entries, then mirrors); those outside the half map to the
    extra slot ``rows * (cols//2 + 1)``.
    """
    rows, cols = shape
    half_cols = cols // 2 + 1
    u = torch.cat([indices[0], (-indices[0]) % rows])
    v = torch.cat([indices[1], (-indices[1]) % cols])
    return torch.where(v < half_cols, u * half_cols + v, rows * half_cols)


def hermitian_weights(indices: Tensor, shape: tuple[int, int]) -> Tensor:
    """Mean over positions of cos²(phase) per entry: 1 for self-conjugate entries, else ½.

    Used to set the variance of Re(ifft2(F)) exactly from the coefficients' variance.
    """
    rows, cols = shape
    u, v = indices[0], indices[1]
    self_conjugate = ((2 * u) % rows == 0) & ((2 * v) % cols == 0)
    return torch.where(self_conjugate, 1.0, 0.5)
