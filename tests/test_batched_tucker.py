"""FLoRA's grouped-conv ΔW built for many layers at once (adapters.batched_tucker): the same
values and gradients as an einsum Tucker product and as the per-layer build, and through
``enable_batched_spectra`` the same model outputs and gradients with fewer ops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mm_spectral
from mm_spectral.adapters import batched_spectra
from mm_spectral.adapters.batched_tucker import (
    _BatchedConvTucker,
    _BatchedProduct,
    batched_conv_tucker_deltas,
    batched_core_products,
)
from mm_spectral.adapters.flora import conv_tucker_down
from mm_spectral.kernels import OPTIONS

from batched_checks import DEVICES, DepthwiseStack, check_batched_against_per_layer
from conftest import randomize_adapter

SHAPES = {  # weight (out, in/groups, kh, kw), core: a depthwise 7x7 and a grouped 3x3
    "depthwise": ((12, 1, 7, 7), (4, 1, 2, 2)),
    "grouped": ((8, 2, 3, 3), (3, 2, 2, 3)),
}


def layer_tensors(weight_shape, core_shape, layers: int, dtype=torch.float32, device="cpu"):
    """Per layer: a core and its four factors, random and requiring gradients."""
    out = []
    for _ in range(layers):
        core = torch.randn(core_shape, dtype=dtype, device=device, requires_grad=True)
        factors = [
            torch.randn(size, j, dtype=dtype, device=device, requires_grad=True)
            for size, j in zip(weight_shape, core_shape)
        ]
        out.append((core, factors))
    return out


def einsum_delta(core, factors, scale):
    """s · core ×₁ U₁ ×₂ U₂ ×₃ U₃ ×₄ U₄ written as one einsum (independent reference)."""
    u1, u2, u3, u4 = factors
    return scale * torch.einsum("abcd,oa,ib,hc,wd->oihw", core, u1, u2, u3, u4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_batched_build_equals_einsum_and_per_layer_build(shape, device):
    torch.manual_seed(0)
    weight_shape, core_shape = SHAPES[shape]
    layers = layer_tensors(weight_shape, core_shape, 3, device=device)
    scale = 2.5
    batched = batched_conv_tucker_deltas([c for c, _ in layers], [f for _, f in layers], scale)
    assert batched.shape == (3, weight_shape[0], weight_shape[1] * 9 if shape == "grouped" else 49)
    einsum = torch.stack([einsum_delta(c, f, scale).flatten(1) for c, f in layers])
    single = torch.stack([conv_tucker_down(c, f, scale, with_up=True) for c, f in layers])
    torch.testing.assert_close(batched, einsum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    params = [t for c, f in layers for t in (c, *f)]
    probe = torch.randn_like(batched)
    got = torch.autograd.grad((batched * probe).sum(), params)
    want = torch.autograd.grad((einsum * probe).sum(), params)
    for g, w in zip(got, want):
        assert w.abs().max() > 0
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scale", [1.0, -0.7])
def test_batched_build_passes_gradcheck(scale):
    torch.manual_seed(1)
    weight_shape, core_shape = (4, 2, 3, 2), (2, 2, 2, 1)
    tensors = [t for c, f in layer_tensors(weight_shape, core_shape, 2, torch.float64)
               for t in (c, *f)]  # fmt: skip
    assert torch.autograd.gradcheck(lambda *t: _BatchedConvTucker.apply(scale, *t), tensors)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_build_is_float32_under_autocast(device):
    torch.manual_seed(0)
    layers = layer_tensors(*SHAPES["depthwise"], 2, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        batched = batched_conv_tucker_deltas([c for c, _ in layers], [f for _, f in layers], 4.0)
    assert batched.dtype == torch.float32
    want = torch.stack([einsum_delta(c, f, 4.0).flatten(1) for c, f in layers])
    torch.testing.assert_close(batched, want, rtol=1e-5, atol=1e-5)


def flora_stack() -> nn.Module:
    torch.manual_seed(0)
    model = DepthwiseStack()
    cfg = dict(type="FLoRA", rank=4, kernel_rank=2, scale=2.0, targets=[r"dw\.\d", "other", "pw"])
    mm_spectral.inject(model, cfg)
    for _, layer in mm_spectral.adapted_layers(model):
        randomize_adapter(layer.adapter)
    return model


@pytest.mark.parametrize("device", DEVICES)
def test_enable_batched_spectra_batches_flora_depthwise_convs(device, monkeypatch):
    """The three 7x7 layers batch; the 3x3 and the (factored) 1x1 build alone."""
    check_batched_against_per_layer(
        flora_stack().to(device), torch.randn(2, 8, 9, 9, device=device),
        "batched_flora_deltas", monkeypatch,
        autocast=True, tol=dict(rtol=1e-5, atol=1e-5),
    )  # fmt: skip


def test_flora_groups_keep_scales_and_core_shapes_apart():
    """Layers batch together only with the same weight shape, core shape and scale."""
    model = DepthwiseStack()
    mm_spectral.inject(model, dict(type="FLoRA", rank=4, scale=2.0, targets=[r"dw\.[01]"]))
    mm_spectral.inject(model, dict(type="FLoRA", rank=4, scale=3.0, targets=[r"dw\.2"]))
    groups = batched_spectra._groups(model)
    assert [(kind, len(members)) for kind, members in groups] == [("FLoRA", 2)]


def test_batched_core_products_equal_per_layer_products():
    torch.manual_seed(2)
    cores = [torch.randn(5, 4, requires_grad=True) for _ in range(3)]
    u_in = [torch.randn(11, 4, requires_grad=True) for _ in range(3)]
    batched = batched_core_products(cores, u_in, -1.5)
    want = torch.stack([-1.5 * torch.einsum("ab,ib->ai", c, u) for c, u in zip(cores, u_in)])
    torch.testing.assert_close(batched, want)
    probe = torch.randn_like(want)
    params = [*cores, *u_in]
    got = torch.autograd.grad((batched * probe).sum(), params)
    ref = torch.autograd.grad((want * probe).sum(), params)
    for g, w in zip(got, ref):
        torch.testing.assert_close(g, w)
    tensors = [t.detach().double().requires_grad_() for pair in zip(cores, u_in) for t in pair]
    assert torch.autograd.gradcheck(lambda *t: _BatchedProduct.apply(0.5, True, *t), tensors)
    # the untransposed form (LoRA's s·B A): Y_ℓ (J_in, in) instead of (in, J_in)
    tensors = [t.detach().double().requires_grad_() for pair in zip(cores, u_in) for t in
               (pair[0], pair[1].t().contiguous())]  # fmt: skip
    assert torch.autograd.gradcheck(lambda *t: _BatchedProduct.apply(-0.5, False, *t), tensors)


class LinearStack(nn.Module):
    """Three same-shape linears (one batch) and one of another shape (built alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(12, 12) for _ in range(3))
        self.head = nn.Linear(12, 6)

    def forward(self, x):
        for fc in self.fc:
            x = torch.tanh(fc(x))
        return self.head(x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("whole", ["on", "off"])
def test_enable_batched_spectra_batches_flora_linears(whole, autocast, device, monkeypatch):
    """The three 12x12 linears batch their whole ΔW (``OPTIONS.batched_linears`` on) or
    their down factors (off); the head builds alone."""
    monkeypatch.setattr(OPTIONS, "batched_linears", whole)
    torch.manual_seed(0)
    model = LinearStack()
    mm_spectral.inject(model, dict(type="FLoRA", rank=4, scale=3.0, targets=[r"fc\.\d", "head"]))
    for _, layer in mm_spectral.adapted_layers(model):
        randomize_adapter(layer.adapter)
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    check_batched_against_per_layer(
        model.to(device),
        torch.randn(2, 5, 12, device=device),
        "batched_flora_linear_deltas" if whole == "on" else "batched_flora_downs",
        monkeypatch,
        autocast,
        tol,
    )
