"""Spectral helpers and the initial distributions of the spectral methods."""

from __future__ import annotations

import pytest
import torch

import mm_spectral
from mm_spectral.adapters.base import LayerSpec
from mm_spectral.adapters.spectral import (
    band_entries,
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


def test_frequency_bias_draws_inside_the_band():
    rows, cols, fc, bandwidth = 32, 48, 10.0, 4.0
    indices = sample_entries(rows, cols, 50, seed=0, fc=fc, bandwidth=bandwidth)
    u = torch.minimum(indices[0], rows - indices[0]).double()
    v = torch.minimum(indices[1], cols - indices[1]).double()
    radius = (u**2 + v**2).sqrt()
    assert ((radius - fc).abs() <= bandwidth / 2).all()
    assert band_entries(rows, cols, fc, bandwidth).numel() > 50
    with pytest.raises(ValueError, match="fewer than n"):
        sample_entries(rows, cols, 10_000, seed=0, fc=fc, bandwidth=bandwidth)
    with pytest.raises(ValueError, match="bandwidth"):
        sample_entries(rows, cols, 5, seed=0, fc=fc)


def test_fourierft_frequency_bias_through_inject():
    model = torch.nn.Sequential(torch.nn.Linear(40, 30))
    mm_spectral.inject(model, dict(type="FourierFT", targets=["0"], n=20, fc=5.0, bandwidth=2.0))
    idx = model[0].adapter.indices
    u = torch.minimum(idx[0], 30 - idx[0]).double()
    v = torch.minimum(idx[1], 40 - idx[1]).double()
    assert (((u**2 + v**2).sqrt() - 5.0).abs() <= 1.0).all()


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
