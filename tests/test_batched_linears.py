"""Low-rank linears that take their whole ΔW from a batched build and step as W0 + ΔW
(``OPTIONS.batched_linears``, :func:`mm_spectral.kernels.dispatch.batched_delta_linear`):
the same outputs and gradients as each layer's own path, one build per same-shape chunk,
fewer ops; the Tucker product against an einsum reference; ΔW's gradient in float32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mm_spectral
from mm_spectral.adapters import batched_spectra
from mm_spectral.adapters.batched_dora import batched_rescaled_weights
from mm_spectral.adapters.batched_tucker import _BatchedTuckerLinear, batched_tucker_linear_deltas
from mm_spectral.adapters.functional import (
    DeltaLinear,
    WeightLinear,
    delta_linear,
    planned_delta_linear,
    planned_weight_linear,
)
from mm_spectral.kernels import OPTIONS
from mm_spectral.kernels.dispatch import DENSE_MAX_RANK, WEIGHT_FORM_RATIO, batched_delta_linear

from batched_checks import (
    DEVICES,
    assert_same_values_and_gradients,
    check_batched_against_per_layer,
)
from conftest import randomize_adapter

METHODS = {  # config, the batched builder its linears go through
    "LoRA": (dict(type="LoRA", rank=3, alpha=6), "batched_low_rank_deltas"),
    "FoRA": (dict(type="FoRA", rank=4, n=20, scale=2.0, seed=1), "batched_fora_deltas"),
    "FLoRA": (dict(type="FLoRA", rank=4, scale=3.0), "batched_flora_linear_deltas"),
    "DoRA": (dict(type="DoRA", rank=3, alpha=6), "batched_dora_weights"),
}


class LinearStack(nn.Module):
    """Three same-shape linears (one batch) and one of another shape (built alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(12, 16) if i == 0 else nn.Linear(16, 16)
                                for i in range(4))  # fmt: skip
        self.head = nn.Linear(16, 6)

    def forward(self, x):
        for fc in self.fc:
            x = torch.tanh(fc(x))
        return self.head(x)


def adapted_linears(method: str) -> nn.Module:
    torch.manual_seed(0)
    model = LinearStack()
    mm_spectral.inject(model, dict(METHODS[method][0], targets=[r"fc\.\d", "head"]))
    for _, layer in mm_spectral.adapted_layers(model):
        randomize_adapter(layer.adapter)
    return model


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("method", list(METHODS))
def test_linears_step_with_their_batched_delta(method, autocast, device, whole_deltas, monkeypatch):
    """fc.1–3 build one ΔW batch; fc.0 and the head alone (each its own factored path)."""
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    check_batched_against_per_layer(
        adapted_linears(method).to(device), torch.randn(2, 5, 12, device=device),
        METHODS[method][1], monkeypatch, autocast, tol,
    )  # fmt: skip


def test_which_linears_take_a_batched_delta(monkeypatch):
    """Linears in the dense form with few tokens for their size (tokens · (in + out) ≤
    WEIGHT_FORM_RATIO · in · out): every rank with the dense form forced, up to
    DENSE_MAX_RANK with 'auto'; none with 'output' or 'weight', with the option off, with
    many tokens, or before a layer's first forward (tokens unknown)."""
    out_features, in_features = 96, 32
    few = WEIGHT_FORM_RATIO * in_features * out_features // (in_features + out_features)
    cases = {("on", "auto"): (True, False), ("on", "dense"): (True, True),
             ("on", "output"): (False, False), ("on", "weight"): (False, False),
             ("off", "dense"): (False, False), ("off", "auto"): (False, False)}  # fmt: skip
    for (whole, term), want in cases.items():
        monkeypatch.setattr(OPTIONS, "batched_linears", whole)
        monkeypatch.setattr(OPTIONS, "rank_term", term)
        got = tuple(batched_delta_linear(few, out_features, in_features, rank)
                    for rank in (DENSE_MAX_RANK, DENSE_MAX_RANK + 1))  # fmt: skip
        assert got == want, (whole, term)
        for rank in (DENSE_MAX_RANK, DENSE_MAX_RANK + 1):
            assert not batched_delta_linear(few + 1, out_features, in_features, rank)
            assert not batched_delta_linear(None, out_features, in_features, rank)


def test_by_default_low_rank_linears_batch_their_delta(monkeypatch):
    """With the default options every low-rank method's linears take their whole weight
    change from the batched build (FoRA's rank above DENSE_MAX_RANK: its factors)."""
    monkeypatch.setattr(OPTIONS, "batched_linears", "on")
    monkeypatch.setattr(OPTIONS, "rank_term", "auto")
    kinds = {}
    for method in METHODS:
        model = adapted_linears(method)
        model(torch.randn(2, 5, 12))
        kinds[method] = [kind for kind, _ in batched_spectra._groups(model)]
    assert kinds == {"LoRA": ["low-rank"], "FoRA": ["FoRA-delta"],
                     "FLoRA": ["FLoRA-linear-delta"], "DoRA": ["DoRA-linear"]}  # fmt: skip


def test_a_linear_batches_its_delta_once_its_tokens_are_known(whole_deltas):
    """The plan decides by the tokens of a layer's last forward: none before the first,
    and a layer whose tokens grew past the ratio goes back to its own path. The model
    counts as one to plan for from the start (AdaptedBackbone asks before any forward)."""
    model = adapted_linears("LoRA")
    assert batched_spectra._groups(model) == []  # no forward yet
    assert batched_spectra.has_batched_spectra(model)
    model(torch.randn(2, 5, 12))
    assert [(k, len(m)) for k, m in batched_spectra._groups(model)] == [("low-rank", 3)]
    model(torch.randn(400, 12))  # 400 · 32 > 10 · 16 · 16 tokens for the 16x16 layers
    assert batched_spectra._groups(model) == []
    OPTIONS.batched_linears = "off"  # (restored by the fixture's monkeypatch)
    assert not batched_spectra.has_batched_spectra(adapted_linears("LoRA"))


def test_high_rank_fora_keeps_its_batched_factors(whole_deltas):
    """Above DENSE_MAX_RANK ('auto'), FoRA's linears batch their factors, not ΔW."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 48), nn.Linear(48, 48))
    rank = DENSE_MAX_RANK + 1
    mm_spectral.inject(model, dict(type="FoRA", rank=rank, n=40, targets=[r"\d"]))
    assert [kind for kind, _ in batched_spectra._groups(model)] == ["FoRA"]


def einsum_delta(core, u_out, u_in, scale):
    return scale * torch.einsum("ab,oa,ib->oi", core, u_out, u_in)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_tucker_linear_deltas_equal_an_einsum_product(device):
    torch.manual_seed(1)
    cores = [torch.randn(3, 4, device=device, requires_grad=True) for _ in range(3)]
    u_out = [torch.randn(10, 3, device=device, requires_grad=True) for _ in range(3)]
    u_in = [torch.randn(7, 4, device=device, requires_grad=True) for _ in range(3)]
    got = batched_tucker_linear_deltas(cores, u_out, u_in, -1.5)
    want = torch.stack([einsum_delta(*t, -1.5) for t in zip(cores, u_out, u_in)])
    assert_same_values_and_gradients(got, want, [*cores, *u_out, *u_in])
    with torch.autocast(device, dtype=torch.bfloat16):
        assert batched_tucker_linear_deltas(cores, u_out, u_in, 2.0).dtype == torch.float32


def test_batched_tucker_linear_passes_gradcheck():
    torch.manual_seed(2)
    shapes = ((3, 2), (6, 3), (5, 2))
    tensors = [torch.randn(s, dtype=torch.float64, requires_grad=True)
               for _ in range(2) for s in shapes]  # fmt: skip
    assert torch.autograd.gradcheck(lambda *t: _BatchedTuckerLinear.apply(0.5, *t), tensors)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("native", [True, False])
def test_delta_gradient_keeps_the_delta_dtype(native, device):
    """Under bf16 autocast a float32 ΔW gets a float32 gradient, gᵀx of the bf16
    operands (on CUDA written in float32 by cuBLAS: closer to the exact product than one
    rounded to bf16)."""
    torch.manual_seed(3)
    x = torch.randn(64, 96, device=device)
    weight = torch.randn(80, 96, device=device)
    delta = (0.1 * torch.randn(80, 96, device=device)).requires_grad_()
    probe = torch.randn(64, 80, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = (
            delta_linear(x, weight, None, delta)
            if native
            else DeltaLinear.apply(x, weight, None, delta)
        )
    (grad,) = torch.autograd.grad((y.float() * probe).sum(), delta)
    assert grad.dtype == torch.float32
    exact = probe.bfloat16().float().t() @ x.bfloat16().float()
    error = (grad - exact).abs().max().item()
    rounded = (exact.bfloat16().float() - exact).abs().max().item()
    if device == "cuda":
        assert error < rounded / 4, (error, rounded)
    else:  # the CPU's GEMM rounds to bf16 (no float32-out variant there)
        assert error <= rounded * 1.01 + 1e-6, (error, rounded)


@pytest.mark.parametrize("layout", ["parameters", "no bias", "plain attributes"])
def test_planned_delta_linear_reads_the_layers_weight_and_bias(layout):
    """W and b from ``_parameters`` where they are registered, else the attributes (a
    parametrized or FSDP-managed layer): the same output and gradients as delta_linear."""
    torch.manual_seed(4)
    layer = nn.Linear(6, 5, bias=layout != "no bias")
    weight, bias = layer.weight.detach().clone(), layer.bias
    bias = None if bias is None else bias.detach().clone()
    if layout == "plain attributes":
        del layer.weight, layer.bias
        layer.weight, layer.bias = weight, bias
    x = torch.randn(3, 4, 6, requires_grad=True)
    delta = (0.1 * torch.randn(5, 6)).requires_grad_()
    got = planned_delta_linear(x, layer, delta)
    want = delta_linear(x, weight, bias, delta)
    probe = torch.randn_like(want)
    grads = torch.autograd.grad((got * probe).sum(), (x, delta))
    wants = torch.autograd.grad((want * probe).sum(), (x, delta))
    torch.testing.assert_close(got, want)
    for grad, expected in zip(grads, wants):
        torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("native", [True, False])
def test_weight_linear_equals_a_linear_of_the_built_weight(native, autocast, device, request):
    """DoRA's layers step with the whole W' a batched build made: x W'ᵀ + b as F.linear of
    the weight cast to the compute dtype, every gradient as autograd's, W's in its own
    (float32) dtype under autocast too."""
    torch.manual_seed(5)
    layer = nn.Linear(10, 7).to(device).requires_grad_(False)
    layer.bias.requires_grad_(True)
    x = torch.randn(2, 3, 10, device=device, requires_grad=True)
    weight = torch.randn(7, 10, device=device, requires_grad=True)
    dtype = torch.bfloat16 if autocast else torch.float32
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        if native:  # the C++ node (native mode 'on': a failed build raises)
            request.getfixturevalue("native_module")
            got = planned_weight_linear(x, layer, weight)
            assert "WeightLinear" in got.grad_fn.name()
        else:
            got = WeightLinear.apply(x, weight, layer.bias)
    want = torch.nn.functional.linear(x.to(dtype), weight.to(dtype), layer.bias.to(dtype))
    probe = torch.randn_like(want, dtype=torch.float32)
    inputs = (x, weight, layer.bias)
    grads = torch.autograd.grad((got.float() * probe).sum(), inputs)
    wants = torch.autograd.grad((want.float() * probe).sum(), inputs)
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else {}
    torch.testing.assert_close(got, want, **tol)
    assert grads[1].dtype == torch.float32
    for grad, expected in zip(grads, wants):
        torch.testing.assert_close(grad.float(), expected.float(), **tol)


def dora_reference(weight, up, down, magnitude, scale):
    """W' written out: m ⊙ S / ‖S‖ per row, S = W0 + s·B A, the norm detached."""
    summed = weight + scale * up @ down
    norm = torch.linalg.vector_norm(summed, dim=1, keepdim=True).detach()
    return magnitude.unsqueeze(1) * summed / norm


@pytest.mark.parametrize("device", DEVICES)
def test_batched_rescaled_weights_equal_the_written_out_dora_weight(device):
    torch.manual_seed(4)
    layers = [(torch.randn(9, 7, device=device), torch.randn(9, 3, device=device),
               torch.randn(3, 7, device=device), torch.rand(9, device=device) + 0.5)
              for _ in range(3)]  # fmt: skip
    params = [t.requires_grad_() for _, *rest in layers for t in rest]
    got = batched_rescaled_weights(*map(list, zip(*layers)), 0.7)
    want = torch.stack([dora_reference(*layer, 0.7) for layer in layers])
    assert_same_values_and_gradients(got, want, params)
    with pytest.raises(ValueError, match="frozen"):
        batched_rescaled_weights([torch.randn(9, 7, requires_grad=True)], [layers[0][1]],
                                [layers[0][2]], [layers[0][3]], 1.0)  # fmt: skip


def test_a_trainable_base_keeps_dora_linears_per_layer(whole_deltas):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    mm_spectral.inject(model, dict(type="DoRA", rank=2, targets=[r"\d"]))
    model(torch.randn(3, 6))
    assert [k for k, _ in batched_spectra._groups(model)] == ["DoRA-linear"]
    model[1].weight.requires_grad_(True)
    assert batched_spectra._groups(model) == []


def test_dora_weights_need_the_plan_to_hand_over_the_base_weights():
    adapters = [layer.adapter for layer in adapted_linears("DoRA").fc[1:]]
    with pytest.raises(ValueError, match="base weight"):
        batched_spectra.batched_dora_weights(adapters)
