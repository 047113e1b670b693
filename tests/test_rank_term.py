"""How the plain-torch low-rank linear takes its rank-r term (``OPTIONS.rank_term``): into
the output (y = x Wᵀ + s·(x downᵀ) upᵀ), into the weight (y = x (W + s·up·down)ᵀ), or into
the weight with the factors' gradients from one dense dW ("dense"). All forms give the same
outputs and gradients, in float32 and under bf16 autocast, for every method that runs
through the low-rank linear; 'auto' picks by the layer's sizes."""

from __future__ import annotations

import pytest
import torch

from mm_spectral.kernels import OPTIONS
from mm_spectral.kernels.dispatch import rank_term_form

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
@pytest.mark.parametrize("form", ["weight", "dense"])
@pytest.mark.parametrize("train_base", [False, True], ids=["frozen", "trainable-base"])
def test_rank_term_in_the_weight_equals_it_in_the_output(method, form, train_base, monkeypatch):
    got, got_grads = outputs_and_grads(method, form, monkeypatch, train_base=train_base)
    ref, ref_grads = outputs_and_grads(method, "output", monkeypatch, train_base=train_base)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert len(got_grads) == len(ref_grads) >= 3 + 2 * train_base  # x, factors (W0, b)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["LoRA", "FLoRA", "DoRA"])
@pytest.mark.parametrize("form", ["weight", "dense"])
def test_rank_term_in_the_weight_under_bf16_autocast(method, form, monkeypatch):
    """Half-precision output, float32 parameter gradients, within bf16 tolerance of the
    float32 step; the merged weight is summed in float32 (not autocast's bf16 addmm)."""
    out, grads = outputs_and_grads(method, form, monkeypatch, autocast=True)
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
    for term in ("weight", "dense", "output"):
        model, x = make_case("LoRA", "linear")
        mm_spectral.cast_frozen(model, torch.bfloat16)
        assert model.layer.weight.dtype == torch.bfloat16
        x.requires_grad_(True)
        params = [x, *(p for p in model.parameters() if p.requires_grad)]
        monkeypatch.setattr(OPTIONS, "rank_term", term)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        results[term] = (out, torch.autograd.grad(out.float().square().sum(), params))
    ref, ref_grads = results["output"]
    for term in ("weight", "dense"):
        out, grads = results[term]
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=5e-2, atol=5e-2 * r.abs().max().item())


def test_auto_rank_term_follows_rank_and_tokens_against_weight_size(monkeypatch):
    monkeypatch.setattr(OPTIONS, "rank_term", "auto")
    # Measured faster dense at rank 16: every ViT-L linear at 4 × 512² (4100 tokens) and
    # ConvNeXt-V2-L's at 2 × 1024²; a few tokens too (few ops matter most there).
    for tokens, out_features, in_features in (
        (4100, 4096, 1024), (4100, 1024, 4096), (4100, 3072, 1024), (4100, 1024, 1024),
        (131072, 768, 192), (8192, 3072, 768), (2048, 6144, 1536), (64, 4096, 1024),
    ):  # fmt: skip
        assert rank_term_form(tokens, out_features, in_features, 16) == "dense"
    # Rank 64 (FoRA): the output form on ViT-L's linears, dense on ConvNeXt's many tokens.
    for out_features, in_features in ((4096, 1024), (1024, 4096), (3072, 1024), (1024, 1024)):
        assert rank_term_form(4100, out_features, in_features, 64) == "output"
    assert rank_term_form(131072, 768, 192, 64) == "dense"  # stage 0 fc1
    assert rank_term_form(8192, 768, 3072, 64) == "dense"  # stage 2 fc2
    assert rank_term_form(2048, 6144, 1536, 64) == "output"  # stage 3: few tokens
    for term in ("output", "weight", "dense"):  # a set form holds for every size and rank
        monkeypatch.setattr(OPTIONS, "rank_term", term)
        assert rank_term_form(4100, 4096, 1024, 64) == rank_term_form(1, 8, 8, 2) == term
    monkeypatch.setattr(OPTIONS, "rank_term", "bogus")
    with pytest.raises(ValueError, match="rank_term must be one of"):
        rank_term_form(1, 2, 3, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sum_and_product_cast_on_store_equal_the_op_then_the_cast(dtype):
    """add_as / mul_as (the weight sums of every form but the output one) round once, as
    the float32 op followed by a cast does, and keep the first operand's memory format."""
    from mm_spectral.adapters.functional import add_as, mul_as

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 5, 3, 3, generator=gen).to(memory_format=torch.channels_last)
    b = torch.randn(6, 5, 3, 3, generator=gen)
    rows = torch.rand(6, 1, 1, 1, generator=gen) + 0.5
    summed = add_as(a, b, 0.375, dtype)
    assert summed.dtype == dtype and summed.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(summed, torch.add(a, b, alpha=0.375).to(dtype))
    assert torch.equal(add_as(a, b.double(), 1.0, dtype), (a.double() + b.double()).to(dtype))
    scaled = mul_as(a, rows, dtype)
    assert scaled.dtype == dtype and scaled.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(scaled, (a * rows).to(dtype))


def test_sum_cast_on_store_stays_differentiable_where_autograd_records_it():
    """With grad on and an operand that needs it (a backward run with create_graph), the
    sum is recorded as an op and a cast, not written into an out= tensor."""
    from mm_spectral.adapters.functional import add_as, mul_as

    a = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(4, 3)
    summed = add_as(a, b, 2.0, torch.bfloat16)
    scaled = mul_as(a, b, torch.bfloat16)
    (summed.float().sum() + scaled.float().sum()).backward()
    torch.testing.assert_close(a.grad, (1.0 + b).to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)
