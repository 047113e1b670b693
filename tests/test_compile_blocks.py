"""compile_modules: which modules it compiles, its errors, and unchanged outputs and names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mm_spectral
from tools.compile_blocks import compile_modules


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
