"""Shared test fixtures: the layer × method matrix every adapter property is tested over."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

# tools/ (generated data, converters, benchmark helpers) is imported as a package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _skip_config_yapf() -> None:
    """In-process Runners print and dump their config through yapf, 1.4 s a config here
    (15 s of an mmrotate train-resume-test test). Tests keep the text unformatted, which is
    still the same Python; subprocess runs (tools/*.py) format as users see it."""
    try:
        from mmengine.config import config
    except ImportError:  # the torch-only core's tests run without OpenMMLab
        return
    config.FormatCode = lambda text, **_: (text, False)


_skip_config_yapf()


@pytest.fixture
def whole_deltas(monkeypatch):
    """Low-rank linears take their whole ΔW from batched builds (as on ViT-L by default)."""
    from mm_spectral.kernels import OPTIONS

    monkeypatch.setattr(OPTIONS, "batched_linears", "on")
    monkeypatch.setattr(OPTIONS, "rank_term", "auto")


# (case id, layer factory, input shape). Tiny sizes, odd and even, so FFT symmetry and
# clipping edge cases are exercised.
LAYERS = {
    "linear": (lambda: nn.Linear(24, 18), (3, 5, 24)),
    "conv3x3": (lambda: nn.Conv2d(6, 10, 3, padding=1), (2, 6, 9, 9)),
    "conv_strided": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2), (2, 6, 11, 11)),
    "depthwise7x7": (lambda: nn.Conv2d(8, 8, 7, padding=3, groups=8), (2, 8, 10, 10)),
    "stem4x4": (lambda: nn.Conv2d(3, 12, 4, stride=4), (2, 3, 16, 16)),
}

METHODS = {
    "LoRA": dict(type="LoRA", rank=4, alpha=8),
    "FLoRA": dict(type="FLoRA", rank=4, kernel_rank=2, scale=2.0),
    "FourierFT": dict(type="FourierFT", n=40, alpha=30.0, seed=3),
    "FoRA": dict(type="FoRA", rank=6, n=30, scale=2.0, seed=5),
    "DoRA": dict(type="DoRA", rank=3, alpha=6),
    "BitFit": dict(type="BitFit"),
    "LoRA-loralib": dict(type="LoRA", rank=2, alpha=3, conv_factors="loralib"),
    "DoRA-loralib": dict(type="DoRA", rank=2, alpha=3, conv_factors="loralib"),
}

# Row blocks of one Linear (q and v of a fused qkv): 18 rows as 3 blocks of 6, 0 and 2 used.
ROWS = dict(split=3, use=(0, 2))
ROW_METHODS = {
    f"{name}-rows": dict(cfg, row_blocks=ROWS)
    for name, cfg in [
        ("LoRA", dict(type="LoRA", rank=2, alpha=4)),
        ("FLoRA", dict(type="FLoRA", rank=3, scale=2.0)),
        ("FourierFT", dict(type="FourierFT", n=20, alpha=30.0, seed=3)),
        ("FoRA", dict(type="FoRA", rank=3, n=12, scale=2.0, seed=5)),
        ("DoRA", dict(type="DoRA", rank=2, alpha=4)),
        ("BitFit", dict(type="BitFit")),
    ]
}
METHODS.update(ROW_METHODS)

CASES = [
    (m, layer) for m in METHODS for layer in LAYERS if m not in ROW_METHODS or layer == "linear"
]


def make_case(method: str, layer_name: str, seed: int = 0):
    """A one-layer model with the method injected and all adapter values made non-zero."""
    torch.manual_seed(seed)
    factory, input_shape = LAYERS[layer_name]
    model = nn.Sequential()
    model.add_module("layer", factory())
    import mm_spectral

    mm_spectral.inject(model, dict(METHODS[method], targets=["layer"]))
    randomize_adapter(model.layer.adapter)
    return model, torch.randn(input_shape)


def randomize_adapter(adapter: nn.Module, std: float = 0.3) -> None:
    """Non-zero adapter parameters: a zero adapter proves nothing about merging."""
    with torch.no_grad():
        for param in adapter.parameters():
            param.normal_(0.0, std)


@pytest.fixture(params=CASES, ids=[f"{m}-{layer}" for m, layer in CASES])
def case(request):
    method, layer_name = request.param
    model, x = make_case(method, layer_name)
    return method, layer_name, model, x


@pytest.fixture
def native_module():
    """The C++ nodes' module, with the native mode 'on' (a failed build raises) inside."""
    from mm_spectral.kernels import native, set_native_mode

    previous = set_native_mode("on")
    try:
        yield native.native_ops()
    finally:
        set_native_mode(previous)
