"""Shared checks of batched builds (``mm_spectral.enable_batched_spectra``) against the
per-layer path: the same outputs and gradients, one build per same-shape group, fewer ops."""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import mm_spectral
from mm_spectral.adapters import batched_spectra

# The CPU always; the GPU where there is one (the lent GPU machine runs these files as is).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class DepthwiseStack(nn.Module):
    """Three same-shape depthwise 7x7 convs (one batch) and one 3x3 (built alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.ModuleList(nn.Conv2d(8, 8, 7, padding=3, groups=8) for _ in range(3))
        self.other = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)  # ungrouped: the factored path, not batched

    def forward(self, x):
        for conv in self.dw:
            x = torch.tanh(conv(x))
        return self.pw(self.other(x))


class SameShapeLinears(nn.Module):
    """``count`` same-shape linears (one batched group) and a head of another shape."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(16, 16) for _ in range(count))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for fc in self.fc:
            x = torch.tanh(fc(x))
        return self.head(x)


def assert_same_values_and_gradients(got, want, params) -> None:
    """``got`` equals ``want`` (a reference written independently), and so do their
    gradients to every tensor in ``params`` under one random probe (none all zero)."""
    torch.testing.assert_close(got, want)
    probe = torch.randn_like(want)
    grads = torch.autograd.grad((got * probe).sum(), params)
    refs = torch.autograd.grad((want * probe).sum(), params)
    for g, r in zip(grads, refs):
        assert r.abs().max() > 0
        torch.testing.assert_close(g, r)


def top_level_ops(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(
        1
        for e in prof.events()
        if e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )


def check_batched_against_per_layer(model, x, builder: str, monkeypatch, autocast: bool, tol):
    """One step per layer, then with ``enable_batched_spectra``: equal outputs and adapter
    gradients, one build of the 3 same-shape layers by ``builder``, no stash left over,
    fewer top-level ops."""
    params = [p for n, p in model.named_parameters() if ".adapter." in n]

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            y = model(x).float()
        return y, torch.autograd.grad(y.square().sum(), params)

    y_ref, ref = step()
    per_layer_ops = top_level_ops(step)
    assert batched_spectra.has_batched_spectra(model)
    built = []
    original = getattr(batched_spectra, builder)
    monkeypatch.setattr(
        batched_spectra, builder, lambda a, *rest: built.append(len(a)) or original(a, *rest)
    )
    handle = mm_spectral.enable_batched_spectra(model)
    try:
        y, got = step()
        assert built == [3]  # the three same-shape layers together; the others alone
        batched_ops = top_level_ops(step)
        left = [
            k for m in model.modules() for k in vars(m) if k.startswith(("_prebuilt", "_stash"))
        ]
        assert not left, "stash or builder left over"
    finally:
        handle.remove()
    torch.testing.assert_close(y, y_ref, **tol)
    for g, w in zip(got, ref):
        largest = w.abs().max().item()
        assert largest > 0
        # atol relative to the gradient's size: a batched product sums in another order
        torch.testing.assert_close(g, w, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, largest))
    assert batched_ops < per_layer_ops, (batched_ops, per_layer_ops)
