"""ΔW of every method against references written independently of the implementation."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import CASES, make_case


def explicit_real_idft2(coefficients: torch.Tensor, indices: torch.Tensor, shape) -> torch.Tensor:
    """Re(IDFT2) of a sparse real spectrum as the explicit sum of cosines, float64."""
    rows, cols = shape
    x = torch.arange(rows, dtype=torch.float64)[:, None, None]
    y = torch.arange(cols, dtype=torch.float64)[None, :, None]
    u, v = indices[0].double(), indices[1].double()
    phase = 2 * math.pi * (u * x / rows + v * y / cols)
    return (coefficients.double() * torch.cos(phase)).sum(-1) / (rows * cols)


def reference_delta(adapter) -> torch.Tensor:
    """ΔW from the adapter's parameters, by the papers' formulas, in float64."""
    shape = adapter.spec.weight_shape
    rows = shape[0]
    cols = math.prod(shape[1:])
    method = adapter.method
    if method == "LoRA":
        delta = adapter.scale * adapter.lora_B.double() @ adapter.lora_A.double()
    elif method == "FLoRA":
        f = [p.double() for p in adapter.factors]
        core = adapter.core.double()
        if len(shape) == 2:
            delta = torch.einsum("ab,ia,jb->ij", core, f[0], f[1])
        else:
            delta = torch.einsum("abcd,ia,jb,kc,ld->ijkl", core, *f)
        delta = adapter.scale * delta
    elif method == "FourierFT":
        delta = adapter.alpha * explicit_real_idft2(
            adapter.coefficients, adapter.indices, (rows, cols)
        )
    elif method == "FoRA":
        a = explicit_real_idft2(adapter.a_coefficients, adapter.a_indices, adapter.a_shape)
        b = explicit_real_idft2(adapter.b_coefficients, adapter.b_indices, adapter.b_shape)
        delta = adapter.scale * b @ a
    else:  # pragma: no cover - the matrix names every method
        raise AssertionError(method)
    return delta.reshape(shape)


@pytest.mark.parametrize("method,layer_name", CASES)
def test_delta_weight_matches_reference(method, layer_name):
    model, _ = make_case(method, layer_name)
    adapter = model.layer.adapter
    delta = adapter.delta_weight()
    ref = reference_delta(adapter).detach().float()
    assert delta.shape == model.layer.weight.shape
    assert delta.dtype == model.layer.weight.dtype
    assert ref.abs().max() > 0, "reference ΔW is zero: the test would prove nothing"
    torch.testing.assert_close(delta.detach(), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("method,layer_name", CASES)
def test_delta_gradients_match_reference(method, layer_name):
    """The hand-written backward of ΔW's construction equals autograd through the reference."""
    model, _ = make_case(method, layer_name)
    adapter = model.layer.adapter
    params = list(adapter.parameters())
    probe = torch.randn(adapter.spec.weight_shape, dtype=torch.float64)
    got = torch.autograd.grad((adapter.delta_weight().double() * probe).sum(), params)
    want = torch.autograd.grad((reference_delta(adapter) * probe).sum(), params)
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
