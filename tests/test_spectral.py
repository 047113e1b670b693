"""Spectral helpers and the initial distributions of the spectral methods."""

from __future__ import annotations

import math

import pytest
import torch

import mm_spectral
from mm_spectral.adapters.base import LayerSpec
from mm_spectral.adapters.spectral import (
    frequency_bias,
    half_spectrum_positions,
    sample_entries,
    sparse_spectrum_to_real,
)


@pytest.mark.parametrize("shape", [(8, 8), (7, 12), (1, 9), (16, 5), (3, 1)])
def test_half_spectrum_irfft_equals_dense_ifft2(shape):
    rows, cols = shape
    torch.manual_seed(rows * 31 + cols)
    n = min(rows * cols, 6)
    indices = sample_entries(rows, cols, n, seed=rows + cols)
    coefficients = torch.randn(n, dtype=torch.float64).float()
    dense = torch.zeros(rows, cols)
    dense[indices[0], indices[1]] = coefficients
    expected = torch.fft.ifft2(dense).real
    torch.testing.assert_close(
        sparse_spectrum_to_real(coefficients, half_spectrum_positions(indices, shape), shape),
        expected,
        rtol=1e-5,
        atol=1e-6,
    )


def test_every_entry_including_mirrors_and_nyquist():
    rows, cols = 6, 8
    indices = sample_entries(rows, cols, rows * cols, seed=0)  # all entries, mirrors included
    coefficients = torch.randn(rows * cols)
    dense = torch.zeros(rows, cols)
    dense[indices[0], indices[1]] = coefficients
    torch.testing.assert_close(
        sparse_spectrum_to_real(
            coefficients, half_spectrum_positions(indices, (rows, cols)), (rows, cols)
        ),
        torch.fft.ifft2(dense).real,
        rtol=1e-5,
        atol=1e-6,
    )


def test_gradient_matches_dense_path():
    indices = sample_entries(10, 6, 12, seed=1)
    c1 = torch.randn(12, requires_grad=True)
    c2 = c1.detach().clone().requires_grad_(True)
    weight = torch.randn(10, 6)
    (
        sparse_spectrum_to_real(c1, half_spectrum_positions(indices, (10, 6)), (10, 6)) * weight
    ).sum().backward()
    dense = torch.zeros(10, 6).index_put((indices[0], indices[1]), c2)
    (torch.fft.ifft2(dense).real * weight).sum().backward()
    torch.testing.assert_close(c1.grad, c2.grad, rtol=1e-5, atol=1e-6)


def test_gradient_with_non_contiguous_upstream_gradient():
    shape = (10, 6)
    indices = sample_entries(*shape, 12, seed=1)
    c = torch.randn(12, requires_grad=True)
    out = sparse_spectrum_to_real(c, half_spectrum_positions(indices, shape), shape, scale=3.0)
    upstream = torch.randn(shape[1], shape[0]).t()  # a transposed, non-contiguous gradient
    assert not upstream.is_contiguous()
    (got,) = torch.autograd.grad(out, c, upstream)
    dense = torch.zeros(shape).index_put((indices[0], indices[1]), c)
    (want,) = torch.autograd.grad(3.0 * torch.fft.ifft2(dense).real, c, upstream.contiguous())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_entries_are_distinct_seeded_and_shared_by_shape():
    a = sample_entries(20, 30, 100, seed=4)
    assert a.dtype == torch.long and a.shape == (2, 100)
    flat = a[0] * 30 + a[1]
    assert flat.unique().numel() == 100
    assert torch.equal(a, sample_entries(20, 30, 100, seed=4))
    assert not torch.equal(a, sample_entries(20, 30, 100, seed=5))
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
    mm_spectral.inject(model, dict(type="FourierFT", targets=[r"\d"], n=10, seed=9))
    assert torch.equal(model[0].adapter.indices, model[1].adapter.indices)


@pytest.mark.parametrize("shape", [(32, 48), (31, 20)])
def test_frequency_bias_is_paper_eq5_on_the_shifted_spectrum(shape):
    """p = exp(−((D² − fc²)/(D·W))²) with D measured from the centre of the fftshift-ed
    spectrum (the official code's (d/2, d/2) grid, shifted back), written out entry by entry."""
    rows, cols = shape
    fc, width = 6.0, 3.0
    shifted = torch.zeros(rows, cols, dtype=torch.float64)
    for r in range(rows):
        for c in range(cols):
            d = math.hypot(r - rows // 2, c - cols // 2)
            shifted[r, c] = 0.0 if d == 0 else math.exp(-(((d**2 - fc**2) / (d * width)) ** 2))
    expected = torch.fft.ifftshift(shifted)
    torch.testing.assert_close(frequency_bias(rows, cols, fc, width).double(), expected)


def _radius(indices: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    u = torch.minimum(indices[0], rows - indices[0]).double()
    v = torch.minimum(indices[1], cols - indices[1]).double()
    return (u**2 + v**2).sqrt()


def test_biased_draws_follow_eq5():
    """Single draws over 3000 seeds: their frequency radii follow p ∝ Eq. 5 (chi-square
    over radius bins). A draw uniform over the ring |D − fc| ≤ W/2 fails it."""
    rows, cols, fc, width, draws = 48, 64, 10.0, 4.0, 3000
    p = frequency_bias(rows, cols, fc, width).double().flatten()
    all_radii = _radius(
        torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")).flatten(
            1
        ),
        rows,
        cols,
    )
    bins = all_radii.round().long()
    expected = torch.zeros(int(bins.max()) + 1, dtype=torch.float64)
    expected.index_add_(0, bins, p / p.sum() * draws)
    drawn = torch.cat([sample_entries(rows, cols, 1, seed, fc, width) for seed in range(draws)], 1)
    observed = torch.bincount(_radius(drawn, rows, cols).round().long(), minlength=len(expected))
    keep = expected >= 5  # pool the thin tails into one bin
    obs = torch.cat([observed[keep].double(), observed[~keep].sum().double().view(1)])
    exp = torch.cat([expected[keep], expected[~keep].sum().view(1)])
    chi2 = ((obs - exp) ** 2 / exp).sum().item()
    assert chi2 < 40, f"chi-square {chi2:.1f} over {len(exp) - 1} degrees of freedom"
    # Eq. 5 puts real mass outside the ring: about a fifth here, none for a ring draw.
    outside = (p * ((all_radii - fc).abs() > width / 2)).sum() / p.sum()
    measured = ((_radius(drawn, rows, cols) - fc).abs() > width / 2).double().mean()
    assert outside > 0.15 and abs(measured - outside) < 0.03, (measured, outside)


def test_biased_draw_is_seeded_distinct_and_checked():
    rows, cols, fc, width = 32, 48, 10.0, 4.0
    a = sample_entries(rows, cols, 200, seed=1, fc=fc, bandwidth=width)
    assert a.shape == (2, 200) and (a[0] * cols + a[1]).unique().numel() == 200
    assert torch.equal(a, sample_entries(rows, cols, 200, seed=1, fc=fc, bandwidth=width))
    assert not torch.equal(a, sample_entries(rows, cols, 200, seed=2, fc=fc, bandwidth=width))
    assert (frequency_bias(rows, cols, fc, width)[a[0], a[1]] > 0).all()
    with pytest.raises(ValueError, match="non-zero probability, fewer than n=1536"):
        sample_entries(rows, cols, rows * cols, seed=0, fc=fc, bandwidth=width)
    with pytest.raises(ValueError, match="bandwidth > 0"):
        sample_entries(rows, cols, 5, seed=0, fc=fc)
    with pytest.raises(ValueError, match="fc >= 0"):
        sample_entries(rows, cols, 5, seed=0, fc=-1.0, bandwidth=2.0)


def test_fourierft_frequency_bias_through_inject():
    model = torch.nn.Sequential(torch.nn.Linear(40, 30))
    mm_spectral.inject(model, dict(type="FourierFT", targets=["0"], n=20, fc=5.0, bandwidth=2.0))
    idx = model[0].adapter.indices
    assert torch.equal(idx, sample_entries(30, 40, 20, 777, fc=5.0, bandwidth=2.0))
    assert (frequency_bias(30, 40, 5.0, 2.0)[idx[0], idx[1]] > 0).all()


def test_fora_initial_factor_variance_matches_kaiming_uniform():
    """Var(A) averaged over A's entries ≈ 1/(3 fan_in), the variance of nn.Linear's init."""
    torch.manual_seed(0)
    spec = LayerSpec("probe", "linear", (32, 96))
    variances = []
    for _ in range(200):
        adapter = mm_spectral.FoRA(spec, rank=8, n=150)
        down, up, _ = adapter.low_rank_factors()
        variances.append(down.detach().pow(2).mean())
        assert up.abs().max() == 0  # B starts at zero, so ΔW does
    measured = torch.stack(variances).mean().item()
    target = 1.0 / (3 * 96)
    assert abs(measured / target - 1) < 0.05, (measured, target)


def test_fora_trainable_count_is_2n_at_any_rank():
    spec = LayerSpec("probe", "linear", (64, 64))
    for rank in (2, 8, 32, 64):
        adapter = mm_spectral.FoRA(spec, rank=rank, n=100)
        assert sum(p.numel() for p in adapter.parameters()) == 200
    assert sum(p.numel() for p in mm_spectral.FoRA(spec, rank=1, n=100).parameters()) == 128


def test_flora_initial_factor_scale():
    torch.manual_seed(0)
    spec = LayerSpec("probe", "linear", (2048, 1024))
    adapter = mm_spectral.FLoRA(spec, rank=16)
    assert adapter.core.abs().max() == 0
    for factor in adapter.factors:
        assert abs(factor.std().item() / (1 / (2 * 16)) ** 0.5 - 1) < 0.03


def test_fft_runs_in_float32_under_bf16_autocast():
    spec = LayerSpec("probe", "linear", (12, 20))
    adapter = mm_spectral.FourierFT(spec, n=30)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        delta = adapter.delta()
    assert delta.dtype == torch.float32
    adapter.to(torch.bfloat16)
    assert adapter.delta().dtype == torch.float32
