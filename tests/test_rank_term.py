"""Where the plain-torch low-rank linear adds its rank-r term (``OPTIONS.rank_term``): into
the output (y = x Wᵀ + s·(x downᵀ) upᵀ) or into the weight (y = x (W + s·up·down)ᵀ). Both
forms give the same outputs and gradients, in float32 and under bf16 autocast, for every
method that runs through the low-rank linear; 'auto' picks by the layer's sizes."""

from __future__ import annotations

import pytest
import torch

from mm_spectral.kernels import OPTIONS
from mm_spectral.kernels.dispatch import rank_term_in_weight

from conftest import make_case

LINEAR_METHODS = ["LoRA", "FLoRA", "FoRA", "DoRA", "LoRA-rows", "DoRA-rows", "FoRA-rows"]


def outputs_and_grads(method, rank_term, monkeypatch, autocast=False, train_base=False):
    model, x = make_case(method, "linear")
    layer = model.layer
    layer.weight.requires_grad_(train_base)
    layer.bias.requires_grad_(train_base)
    x.requires_grad_(True)
    params = [x, *(p for p in model.parameters() if p.requires_grad)]
    monkeypatch.setattr(OPTIONS, "rank_term", rank_term)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    return out, torch.autograd.grad(out.float().square().sum(), params)


@pytest.mark.parametrize("method", LINEAR_METHODS)
@pytest.mark.parametrize("train_base", [False, True], ids=["frozen", "trainable-base"])
def test_rank_term_in_the_weight_equals_it_in_the_output(method, train_base, monkeypatch):
    got, got_grads = outputs_and_grads(method, "weight", monkeypatch, train_base=train_base)
    ref, ref_grads = outputs_and_grads(method, "output", monkeypatch, train_base=train_base)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert len(got_grads) == len(ref_grads) >= 3 + 2 * train_base  # x, factors (W0, b)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["LoRA", "FLoRA", "DoRA"])
def test_rank_term_in_the_weight_under_bf16_autocast(method, monkeypatch):
    """Half-precision output, float32 parameter gradients, within bf16 tolerance of the
    float32 step; the merged weight is summed in float32 (not autocast's bf16 addmm)."""
    out, grads = outputs_and_grads(method, "weight", monkeypatch, autocast=True)
    _, reference = outputs_and_grads(method, "output", monkeypatch)
    assert out.dtype == torch.bfloat16
    for g, r in zip(grads, reference):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=5e-2, atol=5e-2 * r.abs().max().item())


def test_rank_term_in_a_bf16_stored_weight_under_autocast(monkeypatch):
    """Frozen weights stored in bf16 (frozen_dtype) take the rank term in one bf16 GEMM
    epilogue: the same step as the output form within bf16 tolerance."""
    import mm_spectral

    results = {}
    for term in ("weight", "output"):
        model, x = make_case("LoRA", "linear")
        mm_spectral.cast_frozen(model, torch.bfloat16)
        assert model.layer.weight.dtype == torch.bfloat16
        x.requires_grad_(True)
        params = [x, *(p for p in model.parameters() if p.requires_grad)]
        monkeypatch.setattr(OPTIONS, "rank_term", term)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        results[term] = (out, torch.autograd.grad(out.float().square().sum(), params))
    (out, grads), (ref, ref_grads) = results["weight"], results["output"]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=5e-2, atol=5e-2 * r.abs().max().item())


def test_auto_rank_term_follows_tokens_against_weight_size(monkeypatch):
    monkeypatch.setattr(OPTIONS, "rank_term", "auto")
    # Measured faster in the output form: every ViT-L linear at 4 × 512² (4100 tokens).
    for out_features, in_features in ((4096, 1024), (1024, 4096), (3072, 1024), (1024, 1024)):
        assert not rank_term_in_weight(4100, out_features, in_features)
    # Measured faster in the weight form: ConvNeXt-V2-L at 2 × 1024² (stages 0–2).
    assert rank_term_in_weight(131072, 768, 192)  # stage 0 fc1
    assert rank_term_in_weight(8192, 3072, 768)  # stage 2 fc1
    assert rank_term_in_weight(8192, 768, 3072)  # stage 2 fc2
    assert not rank_term_in_weight(2048, 6144, 1536)  # stage 3: few tokens
    assert not rank_term_in_weight(64, 4096, 1024)  # a few tokens: the output form
    monkeypatch.setattr(OPTIONS, "rank_term", "output")
    assert not rank_term_in_weight(4100, 4096, 1024)
    monkeypatch.setattr(OPTIONS, "rank_term", "weight")
    assert rank_term_in_weight(1, 4096, 1024)
    monkeypatch.setattr(OPTIONS, "rank_term", "bogus")
    with pytest.raises(ValueError, match="rank_term must be one of"):
        rank_term_in_weight(1, 2, 3)
