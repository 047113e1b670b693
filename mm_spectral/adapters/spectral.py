"""Seeded spectral-entry sampling and the float32 inverse FFT of a sparse real spectrum.

Shared by FourierFT (ΔW itself is a sparse spectrum) and FoRA (each low-rank factor is).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..kernels.native import native_ops


@functools.lru_cache(maxsize=64)
def _sample_entries_cached(
    rows: int, cols: int, n: int, seed: int, fc: float | None, bandwidth: float | None
) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    if fc is None:
        # The same draw as peft's FourierFT: a seeded permutation of the flat entries.
        flat = torch.randperm(rows * cols, generator=generator, device="cpu")[:n]
    else:
        weights = _frequency_bias_cached(rows, cols, fc, bandwidth).flatten()
        possible = int((weights > 0).sum())
        if possible < n:
            raise ValueError(
                f"the frequency bias fc={fc}, bandwidth={bandwidth} of a {rows}x{cols} spectrum "
                f"gives {possible} entries a non-zero probability, fewer than n={n}"
            )
        # n draws without replacement, each with probability ∝ p among those left: the
        # n smallest E_k / p_k for E_k ~ Exp(1) (an exponential race; same law as
        # torch.multinomial(p, n), which refuses more than 2^24 entries, e.g. 3200x12800).
        race = torch.empty(weights.shape).exponential_(generator=generator)
        flat = torch.topk(race / weights, n, largest=False, sorted=True).indices
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

    The draw depends only on (shape, n, seed, bias), so layers of one shape share entries
    and a seed reproduces them. Without ``fc`` it is uniform (peft's draw); with ``fc`` and
    ``bandwidth`` each entry is drawn with probability ∝ :func:`frequency_bias` (FourierFT's
    frequency bias, paper Eq. 5), without replacement.
    """
    if fc is not None and (bandwidth is None or not bandwidth > 0 or not fc >= 0):
        raise ValueError(
            f"a frequency bias needs fc >= 0 and bandwidth > 0, got fc={fc!r}, "
            f"bandwidth={bandwidth!r}"
        )
    return _sample_entries_cached(rows, cols, n, seed, fc, bandwidth).clone()


def frequency_distance(rows: int, cols: int) -> Tensor:
    """D(u, v) of every entry (float32, rows×cols): its distance from the centre of the
    fftshift-ed spectrum, i.e. the length of its signed frequency (fftfreq · size)."""
    u = torch.fft.fftfreq(rows, d=1.0 / rows)
    v = torch.fft.fftfreq(cols, d=1.0 / cols)
    return torch.sqrt(u[:, None] ** 2 + v[None, :] ** 2)


def frequency_bias(rows: int, cols: int, fc: float, bandwidth: float) -> Tensor:
    """FourierFT's Eq. 5, p(u, v) = exp(−((D² − fc²) / (D · W))²), for every entry (float32).

    Gaussian band-pass weights peaking at 1 on the circle D = fc, of width ~W. The official
    code builds D on the shifted spectrum around (d/2, d/2) and shifts back, which is
    :func:`frequency_distance` (the same for even sizes, the natural centre for odd ones).
    At D = 0 (the constant term) the limit is taken: 0 for fc > 0, 1 for fc = 0.
    """
    return _frequency_bias_cached(rows, cols, fc, bandwidth).clone()


@functools.lru_cache(maxsize=8)
def _frequency_bias_cached(rows: int, cols: int, fc: float, bandwidth: float) -> Tensor:
    distance = frequency_distance(rows, cols)
    p = torch.exp(-(((distance**2 - fc**2) / (distance * bandwidth)) ** 2))
    p[distance == 0] = 1.0 if fc == 0 else 0.0
    return p


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
        values = coefficients if coefficients.dtype == torch.float32 else coefficients.float()
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
        grad_out = grad_out if grad_out.dtype == torch.float32 else grad_out.float()
        spectrum = torch.view_as_real(torch.fft.rfft2(grad_out))
        grad = torch.take(spectrum, gather).mul_(ctx.scale / (rows * cols))
        return (grad if grad.dtype == ctx.dtype else grad.to(ctx.dtype)), None, None, None


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
    if not torch.compiler.is_compiling():  # eagerly, the C++ node where it built
        native = native_ops()
        if native is not None:
            return native.sparse_spectrum_to_real(
                coefficients, positions, int(shape[0]), int(shape[1]), float(scale)
            )
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
