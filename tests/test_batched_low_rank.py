"""The ΔW = s·B A that LoRA, DoRA and FoRA build on layers they cannot run factored
(grouped convs), made for all same-shape layers with one ``bmm``: the same values and
gradients as each adapter's own ``delta()``, and through ``enable_batched_spectra`` the
same model outputs and gradients with fewer ops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mm_spectral
from mm_spectral.adapters import batched_spectra
from mm_spectral.adapters.batched_spectra import batched_fora_deltas, batched_low_rank_deltas
from mm_spectral.kernels import OPTIONS

from batched_checks import DEVICES, DepthwiseStack, check_batched_against_per_layer
from conftest import randomize_adapter

METHODS = {  # config, the batched builder its grouped convs go through
    "LoRA": (dict(type="LoRA", rank=3, alpha=6), "batched_low_rank_deltas"),
    "DoRA": (dict(type="DoRA", rank=3, alpha=6), "batched_low_rank_deltas"),
    "FoRA": (dict(type="FoRA", rank=4, n=20, scale=2.0, seed=1), "batched_fora_deltas"),
    "LoRA-loralib": (
        dict(type="LoRA", rank=2, alpha=3, conv_factors="loralib"),
        "batched_low_rank_deltas",
    ),
}


def adapted_stack(method: str) -> nn.Module:
    torch.manual_seed(0)
    model = DepthwiseStack()
    cfg, _ = METHODS[method]
    mm_spectral.inject(model, dict(cfg, targets=[r"dw\.\d", "other", "pw"]))
    for _, layer in mm_spectral.adapted_layers(model):
        randomize_adapter(layer.adapter)
    return model


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("method", ["LoRA", "FoRA"])
def test_batched_deltas_equal_each_adapters_delta(method, autocast):
    model = adapted_stack(method)
    adapters = [layer.adapter for layer in model.dw]
    build = batched_fora_deltas if method == "FoRA" else batched_low_rank_deltas
    params = [p for a in adapters for p in a.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = build(adapters)
        want = [a.delta() for a in adapters]
    probes = [torch.randn_like(w, dtype=torch.float32) for w in want]
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32  # weight-space products stay float32
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)  # the same product, batched
    grads = torch.autograd.grad(sum((g.float() * p).sum() for g, p in zip(got, probes)), params)
    refs = torch.autograd.grad(sum((w.float() * p).sum() for w, p in zip(want, probes)), params)
    for g, r in zip(grads, refs):
        assert r.abs().max() > 0
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("method", list(METHODS))
def test_enable_batched_spectra_batches_grouped_conv_deltas(method, autocast, device, monkeypatch):
    """The three 7x7 depthwise layers build together; the 3x3 builds alone; the 1x1 runs
    factored (loralib's: its unfactored ΔW, alone)."""
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    check_batched_against_per_layer(
        adapted_stack(method).to(device), torch.randn(2, 8, 9, 9, device=device),
        METHODS[method][1], monkeypatch, autocast, tol,
    )  # fmt: skip


def test_low_rank_groups_keep_shapes_scales_and_factored_layers_apart():
    """Grouped only where unfactored, with equal factor shapes and scale; LoRA and DoRA
    build their ΔW alike and may share a group."""
    model = DepthwiseStack()
    mm_spectral.inject(model, dict(type="LoRA", rank=2, alpha=4, targets=[r"dw\.0", "pw"]))
    mm_spectral.inject(model, dict(type="DoRA", rank=2, alpha=4, targets=[r"dw\.1"]))
    mm_spectral.inject(model, dict(type="LoRA", rank=2, alpha=3, targets=[r"dw\.2"]))
    mm_spectral.inject(model, dict(type="LoRA", rank=2, alpha=4, targets=["other"]))
    groups = batched_spectra._groups(model)
    assert [(kind, len(members)) for kind, members in groups] == [("low-rank", 2)]
    assert [type(a).__name__ for a in groups[0][1]] == ["LoRA", "DoRA"]


@pytest.mark.parametrize("whole", ["on", "off"])
def test_low_rank_linears_batch_their_delta_only_where_asked(whole, monkeypatch):
    """LoRA and DoRA linears build their weight change in one batch with
    ``OPTIONS.batched_linears`` on (DoRA's its own kind: W' − W0), and run factored (no
    batch) with it off."""
    monkeypatch.setattr(OPTIONS, "batched_linears", whole)
    for method, kind in (("LoRA", "low-rank"), ("DoRA", "DoRA-linear")):
        groups = batched_spectra._groups(_linears(method))
        want = [(kind, 2)] if whole == "on" else []
        assert [(kind, len(members)) for kind, members in groups] == want


@pytest.mark.parametrize("whole", ["on", "off"])
def test_fora_groups_split_factored_from_unfactored_layers(whole, monkeypatch):
    """A FoRA linear and a depthwise conv of the same factor shapes take different
    results (factors, ΔW) and never share a build, unless the linear takes its whole ΔW
    too (``OPTIONS.batched_linears``): then all four share one, with the per-layer values."""
    monkeypatch.setattr(OPTIONS, "batched_linears", whole)
    torch.manual_seed(0)
    model = nn.ModuleDict(
        dict(convs=nn.Sequential(nn.Conv2d(8, 8, 7, groups=8), nn.Conv2d(8, 8, 7, groups=8)),
             fc=nn.Linear(49, 8), extra=nn.Linear(49, 8))
    )  # fmt: skip
    mm_spectral.inject(
        model, dict(type="FoRA", rank=4, n=20, scale=2.0, targets=[r"convs\.\d", "fc", "extra"])
    )
    for _, layer in mm_spectral.adapted_layers(model):
        randomize_adapter(layer.adapter)
    image, rows = torch.randn(2, 8, 13, 13), torch.randn(3, 49)

    def outputs():
        return model["convs"](image), model["fc"](rows), model["extra"](rows)

    want = outputs()  # the linears' tokens, which the plan decides by
    kinds = sorted((kind, len(members)) for kind, members in batched_spectra._groups(model))
    assert kinds == ([("FoRA-delta", 4)] if whole == "on" else [("FoRA", 2), ("FoRA-delta", 2)])
    # The plan a model's pre-hook makes, then each layer runs on its own.
    assert batched_spectra.plan_batched_spectra(model) == 4
    got = outputs()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert not any("_prebuilt_stash" in vars(m) or "_stash_builder" in vars(m)
                   for m in model.modules())  # fmt: skip


def _linears(method: str) -> nn.Module:
    """Two same-shape adapted linears after one forward (the plan decides by its tokens)."""
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    mm_spectral.inject(model, dict(type=method, rank=2, targets=[r"\d"]))
    model(torch.randn(3, 6))
    return model
