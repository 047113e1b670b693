"""Batched linears whose build also makes each layer's weight in the compute dtype
(``mm_spectral/adapters/prebuilt_weights.py``): one W0 + ΔW sum (LoRA, FLoRA, FoRA) or one
cast of W' (DoRA) per chunk instead of per layer, with bit-for-bit the outputs and
gradients of the per-layer sums, and the per-layer path wherever a prebuilt weight does not
fit (trainable W0, another compute dtype)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import mm_spectral
from mm_spectral.adapters import batched_spectra, prebuilt_weights
from mm_spectral.adapters.prebuilt_weights import Prebuilt, prebuilt_or_own
from mm_spectral.kernels import set_native_mode

from batched_checks import SameShapeLinears
from conftest import randomize_adapter

METHODS = {
    "LoRA": dict(type="LoRA", rank=3, alpha=6),
    "FLoRA": dict(type="FLoRA", rank=4, scale=3.0),
    "FoRA": dict(type="FoRA", rank=4, n=20, scale=2.0, seed=1),
    "DoRA": dict(type="DoRA", rank=3, alpha=6),
}


class CountOps(TorchDispatchMode):
    """ATen calls by name, the C++ nodes' included."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def adapted(method: str) -> nn.Module:
    torch.manual_seed(0)
    model = SameShapeLinears(4)
    mm_spectral.inject(model, dict(METHODS[method], targets=[r"fc\.\d"]))
    for _, layer in mm_spectral.adapted_layers(model):
        randomize_adapter(layer.adapter)
    mm_spectral.enable_batched_spectra(model)
    return model


def step(model: nn.Module, x: torch.Tensor, autocast: bool):
    """Output and every gradient of one forward and backward; the ops it issued."""
    model.zero_grad(set_to_none=True)
    context = torch.autocast("cpu", torch.bfloat16) if autocast else contextlib.nullcontext()
    with CountOps() as ops:
        with context:
            out = model(x).float()
        out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, ops.calls


@pytest.mark.parametrize("native", ["auto", "off"])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("method", list(METHODS))
def test_prebuilt_weights_equal_the_layers_own_sums(method, autocast, native, whole_deltas, monkeypatch):  # fmt: skip
    previous = set_native_mode(native)
    try:
        x = torch.randn(2, 7, 16)
        prebuilt, own = adapted(method), adapted(method)
        step(prebuilt, x, autocast), step(own, x, autocast)  # the layers learn their tokens
        with monkeypatch.context() as patch:  # each layer sums (or casts) its own
            patch.setattr(batched_spectra, "prebuilt_sums", lambda bases, deltas: deltas)
            patch.setattr(batched_spectra, "prebuilt_casts", lambda weights: weights)
            want = step(own, x, autocast)
        got = step(prebuilt, x, autocast)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        assert got[1].keys() == want[1].keys() and len(got[1]) >= 8
        for name in want[1]:
            torch.testing.assert_close(got[1][name], want[1][name], rtol=0, atol=0)
        if method == "DoRA":  # one cast of the chunk's W' instead of one per layer
            if autocast:
                assert got[2]["_to_copy"] == want[2]["_to_copy"] - 3
        else:  # one W0 + ΔW over the chunk instead of one per layer
            assert got[2]["add"] == want[2]["add"] - 3
    finally:
        set_native_mode(previous)


def test_a_trainable_base_keeps_its_gradient(whole_deltas):
    """W0 that trains is not summed in the build (no gradient would reach it): the layers
    form W0 + ΔW themselves and W0 gets gᵀx."""
    model = adapted("LoRA")
    for fc in model.fc:
        fc.weight.requires_grad_(True)
    x = torch.randn(2, 7, 16)
    step(model, x, autocast=False)
    _, grads, _ = step(model, x, autocast=False)
    assert all(f"fc.{i}.weight" in grads for i in range(4))
    plain = SameShapeLinears(4)
    plain.load_state_dict(mm_spectral.merged_state_dict(model))
    plain(x).square().sum().backward()
    for i in range(4):
        torch.testing.assert_close(grads[f"fc.{i}.weight"], plain.fc[i].weight.grad)


def test_a_prebuilt_weight_of_another_dtype_falls_back_to_the_route():
    """A prebuilt weight only serves an x that computes in its dtype; else the layer's
    own step runs with the build's output."""
    layer = nn.Linear(3, 2)
    route = torch.randn(2, 3, dtype=torch.float64)
    planned = Prebuilt(route.to(torch.float32), route)
    seen = []
    x = torch.randn(4, 3, dtype=torch.float64)
    prebuilt_or_own(x, layer, planned, lambda x, layer, delta: seen.append(delta))
    assert len(seen) == 1 and seen[0] is route
    y = prebuilt_or_own(x.float(), layer, planned, lambda *args: pytest.fail("own step ran"))
    torch.testing.assert_close(y, x.float() @ planned.weight.t() + layer.bias)


def test_unpacked_bases_are_not_stacked_for_a_sum():
    """Bases that do not lie back to back would need a copy: the deltas stay as they are."""
    bases = [torch.randn(2, 3) for _ in range(3)]
    deltas = list(torch.randn(3, 2, 3).unbind(0))
    assert prebuilt_weights.prebuilt_sums(bases, deltas) is deltas
    packed = list(torch.stack(bases).unbind(0))
    sums = prebuilt_weights.prebuilt_sums(packed, deltas)
    for base, delta, planned in zip(bases, deltas, sums):
        assert planned.route is delta
        torch.testing.assert_close(planned.weight, base + delta, rtol=0, atol=0)
    # ΔW that are not one tensor's rows, in order, are not summed either
    for others in (deltas[::-1], [d.clone() for d in deltas], deltas[:2]):
        assert prebuilt_weights.prebuilt_sums(packed[: len(others)], others) is others
