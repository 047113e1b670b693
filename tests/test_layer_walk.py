"""The kept walk of a model's adapted layers (mm_spectral.adapters.layer_walk): reused while
the module tree is unchanged, walked again after each kind of change the plan must see,
and always the same list a fresh walk finds."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

import mm_spectral
from mm_spectral.adapters import batched_spectra, layer_walk
from mm_spectral.kernels import OPTIONS


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)) for _ in range(3)
        )

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def adapted(targets: str = r"blocks\.\d\.0") -> nn.Module:
    torch.manual_seed(0)
    model = Blocks()
    mm_spectral.inject(model, dict(type="LoRA", rank=2, alpha=2, targets=[targets]))
    return model


@pytest.fixture
def walks(monkeypatch):
    """Counts the walks that really happen."""
    count = [0]
    walk = layer_walk._walk

    def counted(model):
        count[0] += 1
        return walk(model)

    monkeypatch.setattr(layer_walk, "_walk", counted)
    return count


def fresh(model: nn.Module):
    return layer_walk._walk(model).layers


def names(model: nn.Module, layers) -> list[str]:
    where = {id(m): n for n, m in model.named_modules()}
    return [where[id(layer)] for layer, _ in layers]


def test_kept_walk_is_reused_and_lists_every_adapted_layer(walks):
    model = adapted()
    first = layer_walk.adapted_layer_walk(model)
    assert layer_walk.adapted_layer_walk(model) is first
    assert walks[0] == 1
    assert sorted(names(model, first)) == ["blocks.0.0", "blocks.1.0", "blocks.2.0"]
    assert all(layer.adapter is adapter for layer, adapter in first)


def test_registering_any_module_walks_again(walks):
    model = adapted()
    layer_walk.adapted_layer_walk(model)
    mm_spectral.inject(model, dict(type="LoRA", rank=2, alpha=2, targets=[r"blocks\.1\.2"]))
    layers = layer_walk.adapted_layer_walk(model)
    assert walks[0] == 2
    assert "blocks.1.2" in names(model, layers)
    nn.Sequential().add_module("elsewhere", nn.Linear(2, 2))  # another model entirely
    assert layer_walk.adapted_layer_walk(model) == fresh(model)
    assert walks[0] == 4  # the check's walk and the fresh one


def test_removed_adapters_and_swapped_classes_walk_again(walks):
    model = adapted()
    layer_walk.adapted_layer_walk(model)
    mm_spectral.remove_adapters(model)  # layers turned back into nn.Linear in place
    assert layer_walk.adapted_layer_walk(model) == []

    model = adapted()
    layer_walk.adapted_layer_walk(model)
    block = model.blocks[1]
    # what fully_shard does to a module: its class becomes an FSDPModule subclass in place
    block.__class__ = type("FSDPSequential", (FSDPModule, nn.Sequential), {})
    assert layer_walk.adapted_layer_walk(model) is None
    assert batched_spectra._groups(model) == []


def test_a_child_gone_walks_again():
    model = adapted()
    layer_walk.adapted_layer_walk(model)
    del model.blocks[2]  # ModuleList deletion registers nothing; the child count changes
    assert sorted(names(model, layer_walk.adapted_layer_walk(model))) == [
        "blocks.0.0",
        "blocks.1.0",
    ]


def test_plans_with_the_kept_walk_match_fresh_ones(monkeypatch):
    monkeypatch.setattr(OPTIONS, "batched_linears", "on")
    model = adapted(r"blocks\.\d\.[02]")
    x = torch.randn(2, 8)
    model(x)  # tokens recorded: the next plans batch the linears' ΔW
    groups = batched_spectra._groups(model)
    assert [(kind, len(members)) for kind, members in groups] == [("low-rank", 6)]
    model.blocks[0][0].merged = True  # a merged layer leaves its group at the next plan
    assert [len(m) for _, m in batched_spectra._groups(model)] == [5]
    model.blocks[0][0].merged = False
    kept = batched_spectra._groups(model)
    model.__dict__.pop(layer_walk._KEPT)
    assert kept == batched_spectra._groups(model)
