"""Forward equals the base layer with the merged weight and bias of an independent
reference; merge/unmerge; gradients; autocast; state."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import mm_spectral

from adapter_references import reference_layer
from conftest import LAYERS, METHODS, ROW_METHODS, make_case, randomize_adapter


def functional_with(layer, x, weight, bias=None):
    """The plain op of a Linear/Conv2d with the given weight (and bias, default the
    layer's), written without the layer."""
    bias = layer.bias if bias is None else bias
    if isinstance(layer, torch.nn.Conv2d):
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight, bias)


def test_forward_equals_reference_merged_layer(case):
    """Forward = the layer's op with (W', b') from the papers' formulas, in float64."""
    _, _, model, x = case
    layer = model.layer
    weight, bias = reference_layer(layer)
    expected = functional_with(layer, x.double(), weight, bias).float()
    plain = functional_with(layer, x, layer.weight)
    assert (expected - plain).abs().max() > 1e-3, "the adapter changes nothing: proves nothing"
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def test_merge_unmerge_round_trip(case):
    _, _, model, x = case
    layer = model.layer
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    want_w, want_b = (t.detach().float() for t in reference_layer(layer))
    adapted = model(x)
    mm_spectral.merge(model)
    merged_w, merged_b = layer.weight.detach().clone(), layer.bias.detach().clone()
    mm_spectral.merge(model)  # idempotent
    assert layer.merged
    assert torch.equal(layer.weight, merged_w) and torch.equal(layer.bias, merged_b)
    torch.testing.assert_close(model(x), adapted, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged_w, want_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged_b, want_b, rtol=1e-5, atol=1e-6)
    mm_spectral.unmerge(model)
    mm_spectral.unmerge(model)
    assert not layer.merged
    torch.testing.assert_close(layer.weight.detach(), w0, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.bias.detach(), b0, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), adapted, rtol=1e-4, atol=1e-5)


def test_merged_state_dict_holds_the_reference_weights(case):
    _, _, model, _ = case
    want_w, want_b = (t.detach().float() for t in reference_layer(model.layer))
    state = mm_spectral.merged_state_dict(model)
    assert set(state) == {"layer.weight", "layer.bias"}
    torch.testing.assert_close(state["layer.weight"], want_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state["layer.bias"], want_b, rtol=1e-5, atol=1e-6)
    assert not model.layer.merged


def test_merged_layer_runs_like_the_plain_layer(case):
    _, _, model, x = case
    mm_spectral.merge(model)
    layer = model.layer
    torch.testing.assert_close(model(x), functional_with(layer, x, layer.weight))


def test_only_adapter_parameters_get_gradients(case):
    _, _, model, x = case
    model(x).square().mean().backward()
    for name, param in model.named_parameters():
        if ".adapter." in name:
            assert param.requires_grad and param.grad is not None, name
            assert param.grad.abs().sum() > 0, f"{name} got a zero gradient"
        else:
            assert not param.requires_grad and param.grad is None, name


def test_zero_initialised_adapters_start_as_identity():
    """Every method (FourierFT with init='zeros') leaves the layer's output unchanged."""
    torch.manual_seed(0)
    for method, cfg in METHODS.items():
        cfg = dict(cfg, init="zeros") if cfg["type"] == "FourierFT" else cfg
        factory, shape = LAYERS["linear" if method in ROW_METHODS else "conv3x3"]
        layer = torch.nn.Sequential(factory())
        x = torch.randn(shape)
        before = layer(x)
        mm_spectral.inject(layer, dict(cfg, targets=["0"]))
        torch.testing.assert_close(layer(x), before, msg=method)


def test_autocast_bf16_on_cpu(case):
    _, _, model, x = case
    reference = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    rel = (out.float() - reference).norm() / reference.norm()
    assert rel < 3e-2, f"bf16 output off by {rel:.3g}"
    grads = [p.grad for n, p in model.named_parameters() if ".adapter." in n]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_delta_weight_follows_the_weight_dtype(case):
    _, _, model, _ = case
    model.to(torch.float64)
    assert model.layer.delta_weight().dtype == torch.float64
    model.to(torch.bfloat16)
    assert model.layer.delta_weight().dtype == torch.bfloat16


def test_adapter_state_dict_round_trip(case):
    method, layer_name, model, x = case
    state = mm_spectral.adapter_state_dict(model)
    assert state and all(".adapter." in k for k in state)
    assert set(state) == {k for k in model.state_dict() if ".adapter." in k}
    if METHODS[method]["type"] in ("FourierFT", "FoRA"):
        assert any(k.endswith("indices") for k in state), "spectral entries must be saved"
    fresh, _ = make_case(method, layer_name, seed=123)
    fresh.layer.load_state_dict(model.layer.state_dict(), strict=False)  # same base weights
    randomize_adapter(fresh.layer.adapter)
    assert not torch.allclose(fresh(x), model(x))
    mm_spectral.load_adapter_state_dict(fresh, copy.deepcopy(state))
    torch.testing.assert_close(fresh(x), model(x))


def test_base_checkpoint_loads_before_and_after_injection():
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(8, 4))
    adapted = copy.deepcopy(plain)
    mm_spectral.inject(adapted, dict(type="FLoRA", targets=["0"], rank=2))
    missing, unexpected = adapted.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and all(".adapter." in k for k in missing)
    assert set(plain.state_dict()) <= set(adapted.state_dict())


def test_gradients_match_autograd_through_the_reference(case):
    """The fused/factored backward equals autograd through the float64 reference
    F(x, W', b') (DoRA: with its column norm detached, paper §4.3)."""
    _, _, model, x = case
    layer = model.layer
    layer.bias.requires_grad_(True)  # a `trainable` bias must get its gradient too
    x = x.clone().requires_grad_(True)
    params = [x, layer.bias, *layer.adapter.parameters()]
    probe = torch.randn_like(model(x))
    grads = torch.autograd.grad((model(x) * probe).sum(), params)
    weight, bias = reference_layer(layer, detach_norm=True)
    reference = functional_with(layer, x.double(), weight, bias)
    ref_grads = torch.autograd.grad((reference * probe.double()).sum(), params)
    for got, want in zip(grads, ref_grads):
        assert want.abs().max() > 0, "zero reference gradient: the test proves nothing"
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_trainable_base_weight_gets_its_gradient():
    """With the base weight trainable too (adapter + full FT), its gradient is exact."""
    torch.manual_seed(0)
    for method in METHODS:
        model, x = make_case(method, "linear")
        layer = model.layer
        layer.weight.requires_grad_(True)
        got = torch.autograd.grad(model(x).square().sum(), layer.weight)[0]
        weight, bias = reference_layer(layer, detach_norm=True)
        ref = functional_with(layer, x.double(), weight, bias)
        want = torch.autograd.grad(ref.square().sum(), layer.weight)[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=method)
