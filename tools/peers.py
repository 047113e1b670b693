"""The same adapters built by HF peft, for side-by-side timing in ``tools/benchmark.py --peers``.

peft (an optional, benchmark-only dependency) adapts the same timm model at the same rank,
n and scale. Targets are those both libraries support: peft's LoRA needs the rank to be a
multiple of a grouped conv's groups, so ConvNeXt's depthwise 7×7 convs are left out for
both, and peft's FourierFT adapts only nn.Linear layers, so on ConvNeXt both adapt its MLP
linears only. Each pair therefore runs the same work; only the implementation differs.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from torch import nn

import mm_spectral


@dataclass(frozen=True)
class PeerPair:
    """One comparison: our adapter config and peft's, on one target set."""

    label: str
    ours: dict
    targets: list[str]


def peer_pairs(backbone_name: str, model: nn.Module, tiny: bool) -> list[PeerPair]:
    """The LoRA r16 and FourierFT (n 3000, α 150) pairs for a backbone of ``benchmark.py``;
    FourierFT only where its targets are nn.Linear (ConvNeXt atto–nano use 1×1 convs)."""
    n = 300 if tiny else 3000
    convnext = backbone_name.startswith("ConvNeXt")
    if convnext:
        lora_targets = [
            r"stem\.0",
            r"stages\.\d+\.downsample\.1",
            r"stages\.\d+\.blocks\.\d+\.mlp\.fc\d",
        ]
        fourier_targets = [r"stages\.\d+\.blocks\.\d+\.mlp\.fc\d"]
    else:
        lora_targets = [r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"]
        fourier_targets = lora_targets
    pairs = [PeerPair("LoRA r16", dict(type="LoRA", rank=16, alpha=16), lora_targets)]
    linear = [
        isinstance(module, nn.Linear)
        for name, module in model.named_modules()
        if any(re.fullmatch(t, name) for t in fourier_targets)
    ]
    if linear and all(linear):
        fourier = dict(type="FourierFT", n=n, alpha=150.0)
        pairs.append(PeerPair(f"FourierFT n{n}", fourier, fourier_targets))
    return pairs


def ours(base: nn.Module, pair: PeerPair, device: str) -> nn.Module:
    """A device copy of ``base`` with our adapter (everything else frozen)."""
    model = copy.deepcopy(base)
    mm_spectral.inject(model, dict(pair.ours, targets=pair.targets))
    return model.to(device)


def theirs(base: nn.Module, pair: PeerPair, device: str) -> nn.Module:
    """A device copy of ``base`` with peft's adapter of the same method and size."""
    import peft  # optional: only the --peers benchmark needs it

    model = copy.deepcopy(base)
    for param in model.parameters():
        param.requires_grad_(False)
    targets = "|".join(f"(?:{t})" for t in pair.targets)  # peft full-matches one regex
    cfg = pair.ours
    if cfg["type"] == "LoRA":
        config = peft.LoraConfig(
            r=cfg["rank"], lora_alpha=cfg["alpha"], lora_dropout=0.0, target_modules=targets
        )
    else:
        config = peft.FourierFTConfig(
            n_frequency=cfg["n"], scaling=cfg["alpha"], target_modules=targets
        )
    model = peft.inject_adapter_in_model(config, model)
    adapted = sum(p.numel() for p in model.parameters() if p.requires_grad)
    mine = sum(p.numel() for p in ours(base, pair, "cpu").parameters() if p.requires_grad)
    if adapted != mine:  # the same work or no comparison
        raise RuntimeError(f"{pair.label}: peft trains {adapted:,} parameters, ours {mine:,}")
    return model.to(device)
