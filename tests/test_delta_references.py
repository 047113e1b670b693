"""ΔW of every method against references written independently of the implementation."""

from __future__ import annotations

import pytest
import torch

from adapter_references import reference_layer
from conftest import CASES, make_case


@pytest.mark.parametrize("method,layer_name", CASES)
def test_delta_weight_matches_reference(method, layer_name):
    """ΔW = W' − W0 (and Δb) of the layer against the float64 reference."""
    model, _ = make_case(method, layer_name)
    layer = model.layer
    delta = layer.delta_weight()
    want_w, want_b = reference_layer(layer)
    ref = (want_w - layer.weight.double()).detach().float()
    ref_bias = (want_b - layer.bias.double()).detach().float()
    assert delta.shape == layer.weight.shape
    assert delta.dtype == layer.weight.dtype
    assert max(ref.abs().max(), ref_bias.abs().max()) > 0, "reference is zero: proves nothing"
    torch.testing.assert_close(delta.detach(), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    delta_bias = layer.adapter.delta_bias()
    got_bias = torch.zeros_like(layer.bias) if delta_bias is None else delta_bias.detach()
    torch.testing.assert_close(got_bias, ref_bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,layer_name", CASES)
def test_merged_weight_gradients_match_reference(method, layer_name):
    """The hand-written backward of the adapted weight's construction (W' = W0 + ΔW, DoRA's
    rescaling with its norm's gradient, b + Δb) equals autograd through the reference."""
    model, _ = make_case(method, layer_name)
    layer, adapter = model.layer, model.layer.adapter
    params = list(adapter.parameters())
    probe_w = torch.randn(adapter.spec.weight_shape, dtype=torch.float64)
    probe_b = torch.randn(adapter.spec.weight_shape[0], dtype=torch.float64)
    weight, _ = adapter.merged_weight(layer.weight)
    delta_bias = adapter.delta_bias()
    loss = (weight.double() * probe_w).sum()
    if delta_bias is not None:
        loss = loss + (delta_bias.double() * probe_b).sum()
    got = torch.autograd.grad(loss, params)
    want_w, want_b = reference_layer(layer)
    want = torch.autograd.grad((want_w * probe_w).sum() + (want_b * probe_b).sum(), params)
    for name, g, w in zip([n for n, _ in adapter.named_parameters()], got, want):
        assert w.abs().max() > 0, f"reference gradient of {name} is zero: the test proves nothing"
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * w.abs().max().item())


def test_flora_core_shapes_follow_the_modes():
    model, _ = make_case("FLoRA", "depthwise7x7")
    adapter = model.layer.adapter
    # (out, in/groups = 1, kh, kw) with rank 4, kernel_rank 2: the in-mode clips to 1.
    assert tuple(adapter.core.shape) == (4, 1, 2, 2)
    assert [tuple(f.shape) for f in adapter.factors] == [(8, 4), (1, 1), (7, 2), (7, 2)]
    model, _ = make_case("FLoRA", "linear")
    assert tuple(model.layer.adapter.core.shape) == (4, 4)
    assert [tuple(f.shape) for f in model.layer.adapter.factors] == [(18, 4), (24, 4)]


def test_fourierft_equals_peft_on_linear():
    peft_layer = pytest.importorskip("peft.tuners.fourierft.layer")
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 18)
    ours = torch.nn.Sequential()
    ours.add_module("layer", torch.nn.Linear(24, 18))
    ours.layer.load_state_dict(base.state_dict())
    import mm_spectral

    mm_spectral.inject(ours, dict(type="FourierFT", targets=["layer"], n=40, alpha=150.0, seed=777))
    from peft import FourierFTConfig

    config = FourierFTConfig(n_frequency=40, scaling=150.0, random_loc_seed=777)
    theirs = peft_layer.FourierFTLinear(base, "default", config, n_frequency=40)
    adapter = ours.layer.adapter
    # Same draw as peft (seeded randperm over the flat entries) …
    assert torch.equal(adapter.indices, theirs.indices["default"].cpu())
    # … and with the same coefficients the same ΔW.
    with torch.no_grad():
        adapter.coefficients.normal_()
        theirs.fourierft_spectrum["default"].copy_(adapter.coefficients)
    torch.testing.assert_close(
        adapter.delta_weight().detach(),
        theirs.get_delta_weight("default").detach(),
        rtol=1e-4,
        atol=1e-6,
    )
