"""The frozen bias's autocast cast is kept between steps (mm_spectral.adapters.bias_cast),
and never outlives a change of the bias: in place, by loading, or by a new parameter."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import mm_spectral
from mm_spectral.adapters import bias_cast
from mm_spectral.adapters.bias_cast import compute_bias

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def test_a_frozen_bias_is_cast_once_and_kept_while_unchanged():
    bias, x = torch.randn(6), torch.randn(2, 4)
    with torch.autocast(**BF16):
        first = compute_bias(bias, x)
        assert first.dtype == torch.bfloat16 and torch.equal(first, bias.to(torch.bfloat16))
        assert compute_bias(bias, x) is first
        with torch.no_grad():
            bias.add_(1.0)  # in place: the version counter moves
        again = compute_bias(bias, x)
    assert again is not first and torch.equal(again, bias.to(torch.bfloat16))


def test_what_is_not_kept():
    x = torch.randn(2, 4)
    trainable = torch.randn(6, requires_grad=True)
    view = torch.randn(12)[:6]  # not its own storage (as FSDP's flat-parameter views)
    frozen = torch.randn(6)
    assert compute_bias(frozen, x) is frozen  # no autocast: the op's own dtype
    with torch.autocast(**BF16):
        assert compute_bias(None, x) is None
        assert compute_bias(trainable, x) is trainable
        assert compute_bias(view, x) is view
        with torch.inference_mode():
            assert compute_bias(frozen, x) is frozen
    assert id(frozen) not in bias_cast._CASTS


def test_the_kept_copy_goes_with_its_bias():
    x = torch.randn(2, 4)
    bias = torch.randn(6)
    with torch.autocast(**BF16):
        kept = weakref.ref(compute_bias(bias, x))
    ident = id(bias)
    assert ident in bias_cast._CASTS and kept() is not None
    del bias
    gc.collect()
    assert kept() is None and ident not in bias_cast._CASTS


LAYERS = {  # (layer, input): a linear, and an ungrouped conv (LoRA-family: two thin convs)
    "linear": (lambda: nn.Linear(16, 8), (5, 16)),
    "conv": (lambda: nn.Conv2d(4, 8, 3, stride=2, padding=1), (2, 4, 7, 7)),
}


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("method", ["LoRA", "DoRA", "FLoRA", "FourierFT"])
def test_adapted_layers_see_every_new_bias(method, layer):
    """Through the real forward (C++ node, Python function or factored conv): a loaded
    bias, an in-place change and a new parameter object each reach the output at once."""
    cfg = dict(type=method, targets=[r"fc"])
    cfg.update(dict(n=20) if method == "FourierFT" else dict(rank=4))
    make_layer, shape = LAYERS[layer]
    model = nn.Sequential()
    model.add_module("fc", make_layer())
    mm_spectral.inject(model, cfg)
    with torch.no_grad():  # a non-zero ΔW, so the adapted path is the one that runs
        for name, p in model.named_parameters():
            if ".adapter." in name:
                p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(shape)

    def run() -> torch.Tensor:
        with torch.autocast(**BF16):
            return model(x).float()

    def expected(bias: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            weight = mm_spectral.merged_state_dict(model)["fc.weight"]
        with torch.autocast(**BF16):
            if layer == "linear":
                return nn.functional.linear(x, weight, bias).float()
            return model.fc._conv_forward(x, weight, bias).float()

    run()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["fc.bias"] = torch.randn(8) * 10
    model.load_state_dict(state)
    torch.testing.assert_close(run(), expected(state["fc.bias"]), rtol=2e-2, atol=5e-2)
    with torch.no_grad():
        model.fc.bias.mul_(-1.0)
    torch.testing.assert_close(run(), expected(model.fc.bias), rtol=2e-2, atol=5e-2)
    model.fc.bias = nn.Parameter(torch.randn(8) * 10, requires_grad=False)
    torch.testing.assert_close(run(), expected(model.fc.bias), rtol=2e-2, atol=5e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_cuda_graph_capture_casts_the_live_bias():
    bias = torch.randn(6, device="cuda")
    x = torch.randn(2, 4, device="cuda")
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.autocast("cuda", dtype=torch.bfloat16):
        kept = compute_bias(bias, x)
        assert kept is not bias
        with torch.cuda.graph(graph, stream=stream):
            inside = compute_bias(bias, x)
    assert inside is bias
