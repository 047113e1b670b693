"""compile_modules: which modules it compiles, its errors, and unchanged outputs and names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mm_spectral
from mm_spectral.compile import compile_modules


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    blocks = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(3)])
    model = nn.Sequential()
    model.add_module("blocks", blocks)
    model.add_module("head", nn.Linear(8, 2))
    mm_spectral.inject(model, dict(type="FLoRA", targets=[r"blocks\.\d+\.0"], rank=2))
    for adapter in (m for n, m in model.named_modules() if n.endswith("adapter")):
        nn.init.normal_(adapter.core)
    return model


def test_compiles_matching_blocks_once_and_skips_nested():
    model = tiny_model()
    names = compile_modules(model, [r"blocks\.\d+", r"blocks\.\d+\.0"], backend="eager")
    assert names == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(model.blocks[i]._compiled_call_impl is not None for i in range(3))
    assert model.blocks[0][0]._compiled_call_impl is None  # inside a compiled block
    assert model.head._compiled_call_impl is None


def test_outputs_gradients_and_state_dict_keys_are_unchanged():
    eager, compiled = tiny_model(), tiny_model()
    keys = list(compiled.state_dict())
    compile_modules(compiled, [r"blocks\.\d+"], backend="eager")
    assert list(compiled.state_dict()) == keys
    x = torch.randn(4, 8)
    torch.testing.assert_close(compiled(x), eager(x))
    eager(x).sum().backward()
    compiled(x).sum().backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b.grad, a.grad, msg=name)


def test_unmatched_pattern_is_named_and_nothing_is_compiled():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"neck"):
        compile_modules(model, [r"blocks\.\d+", r"neck"], backend="eager")
    assert all(m._compiled_call_impl is None for m in model.modules())


def test_without_targets_the_whole_model_is_compiled():
    model = tiny_model()
    assert compile_modules(model, backend="eager") == [""]
    assert model._compiled_call_impl is not None


# ------------------------------------------------------- every adapter under torch.compile
METHODS = {
    "LoRA": dict(type="LoRA", rank=3, alpha=6),
    "DoRA": dict(type="DoRA", rank=3),
    "FLoRA": dict(type="FLoRA", rank=3, kernel_rank=2),
    "FourierFT": dict(type="FourierFT", n=20, alpha=2.0),
    "FoRA": dict(type="FoRA", rank=3, n=20),
    "BitFit": dict(type="BitFit"),
}


def conv_and_linear_model(adapters: dict[str, dict]) -> nn.Module:
    """A stem conv, a depthwise conv and a linear, each adapted by ``adapters[name]``, with
    non-zero adapter weights (as after training)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GELU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.Flatten(2),
        nn.Linear(36, 12),
    )
    for target, cfg in adapters.items():
        mm_spectral.inject(model, dict(cfg, targets=[target]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapter." in name and "magnitude" not in name:
                param.normal_(0, 0.2)
    return model


def step_results(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, x.grad


def assert_same_step(eager: nn.Module, compiled: nn.Module, **tolerance) -> None:
    x = torch.randn(2, 3, 6, 6)
    out_e, grads_e, xg_e = step_results(eager, x)
    out_c, grads_c, xg_c = step_results(compiled, x)
    torch.testing.assert_close(out_c, out_e, **tolerance)
    torch.testing.assert_close(xg_c, xg_e, **tolerance)
    assert grads_c.keys() == grads_e.keys() and any(".adapter." in n for n in grads_e)
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_c[name], grad, msg=name, **tolerance)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_adapter_traces_as_one_graph_with_eager_values_and_gradients(method):
    """fullgraph=True fails on any graph break: each method (conv, depthwise, linear) is one
    traced graph, and the traced ops reproduce the eager step exactly."""
    adapters = {target: METHODS[method] for target in ("0", "2", "4")}
    eager, compiled = conv_and_linear_model(adapters), conv_and_linear_model(adapters)
    torch._dynamo.reset()
    compile_modules(compiled, None, backend="aot_eager", fullgraph=True)
    assert_same_step(eager, compiled, rtol=0, atol=0)


def test_inductor_compiles_the_adapters_to_the_eager_numbers():
    """The real compiler (generated C++ on a CPU) on a model mixing methods per layer."""
    adapters = {"0": METHODS["FLoRA"], "2": METHODS["DoRA"], "4": METHODS["FoRA"]}
    eager, compiled = conv_and_linear_model(adapters), conv_and_linear_model(adapters)
    torch._dynamo.reset()
    compile_modules(compiled, None, fullgraph=True)
    assert_same_step(eager, compiled, rtol=1e-4, atol=1e-5)


def test_a_stash_is_left_alone_while_tracing(monkeypatch):
    """Batched spectra hand adapters a stash; a traced forward neither reads nor pops it
    (a dict pop breaks the graph on some torch versions)."""
    from mm_spectral.adapters.stash import stash, take_stash

    adapter = nn.Linear(2, 2)
    stash(adapter, "prebuilt")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert take_stash(adapter) is None
    monkeypatch.undo()
    assert take_stash(adapter) == "prebuilt"
    assert take_stash(adapter) is None  # taken once
