"""Put adapters into any nn.Module, and merge, unmerge, save, load, count them.

Everything is validated before anything is changed, so a bad config leaves the module
exactly as it was.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .adapters import ADAPTABLE_TYPES, ADAPTERS, BaseAdapter, LayerSpec, adapted_class, is_adapted
from .adapters.base import AdaptedLayerMixin

ADAPTER_KEY = "adapter"


def _as_patterns(value: str | list[str] | tuple[str, ...] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def build_adapter(name: str, layer: nn.Module, cfg: Mapping[str, Any]) -> BaseAdapter:
    """Build the adapter that ``cfg`` (type + hyper-parameters) describes for one layer."""
    cfg = dict(cfg)
    method = cfg.pop("type", None)
    if method not in ADAPTERS:
        raise ValueError(f"unknown adapter type {method!r}; known types: {sorted(ADAPTERS)}")
    for key in ("targets", "trainable"):
        cfg.pop(key, None)
    spec = LayerSpec.of(name, layer)
    try:
        return ADAPTERS[method](spec, weight_dtype=layer.weight.dtype, **cfg)
    except TypeError as err:  # an unknown hyper-parameter name
        raise TypeError(f"{method} on layer '{name}': {err}") from None


def find_targets(module: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the Linear/Conv2d modules that fully match one of ``patterns``.

    Raises when a pattern matches no adaptable layer, listing what it did match.
    """
    if not patterns:
        raise ValueError("adapter config needs 'targets': regular expressions over module names")
    named = dict(module.named_modules())
    targets: list[str] = []
    for pattern in patterns:
        regex = re.compile(pattern)
        matched = [name for name in named if regex.fullmatch(name)]
        adaptable = [name for name in matched if isinstance(named[name], ADAPTABLE_TYPES)]
        if not adaptable:
            seen = ", ".join(f"'{n}' ({type(named[n]).__name__})" for n in matched[:10])
            detail = f"it matched only {seen}" if matched else "it matched no module at all"
            raise ValueError(
                f"target pattern {pattern!r} matches no nn.Linear or nn.Conv2d; {detail}"
            )
        targets.extend(name for name in adaptable if name not in targets)
    return targets


def inject(module: nn.Module, cfg: Mapping[str, Any]) -> list[str]:
    """Give every targeted Linear/Conv2d of ``module`` an adapter; return their names.

    ``cfg``: ``type`` ('LoRA' | 'FLoRA' | 'FourierFT' | 'FoRA'), ``targets`` (regexes that
    must fully match module names), optional ``trainable`` (regexes over parameter names
    that stay trainable, e.g. norms), and the method's hyper-parameters. Afterwards only
    adapter parameters and ``trainable`` matches require grad.
    """
    targets = find_targets(module, _as_patterns(cfg.get("targets")))
    named = dict(module.named_modules())
    already = [name for name in targets if is_adapted(named[name])]
    if already:
        raise ValueError(f"layers already carry an adapter (inject once per layer): {already}")
    trainable = _as_patterns(cfg.get("trainable"))
    # Build every adapter (which validates the hyper-parameters per layer) before attaching any.
    adapters = {name: build_adapter(name, named[name], cfg) for name in targets}
    _match_parameters(module, trainable)  # validate the patterns before changing anything
    for name, adapter in adapters.items():
        layer = named[name]
        layer.__class__ = adapted_class(type(layer))
        layer.add_module(ADAPTER_KEY, adapter.to(layer.weight.device))
        layer.merged = False
    freeze(module, trainable)
    return targets


def freeze(module: nn.Module, trainable: list[str] | None = None) -> None:
    """Only adapter parameters and ``trainable`` matches (regexes over parameter names,
    fully matched) keep requires_grad; everything else of ``module`` is frozen."""
    keep = _match_parameters(module, _as_patterns(trainable))
    for name, param in module.named_parameters():
        param.requires_grad_(_is_adapter_key(name) or name in keep)


def _match_parameters(module: nn.Module, patterns: list[str]) -> set[str]:
    names = [name for name, _ in module.named_parameters()]
    selected: set[str] = set()
    for pattern in patterns:
        regex = re.compile(pattern)
        hits = {name for name in names if regex.fullmatch(name)}
        if not hits:
            raise ValueError(f"trainable pattern {pattern!r} matches no parameter name")
        selected |= hits
    return selected


def _is_adapter_key(key: str) -> bool:
    return f".{ADAPTER_KEY}." in key or key.startswith(f"{ADAPTER_KEY}.")


def adapted_layers(module: nn.Module) -> Iterator[tuple[str, AdaptedLayerMixin]]:
    """(name, layer) for every adapted layer of ``module``."""
    for name, layer in module.named_modules():
        if is_adapted(layer):
            yield name, layer  # type: ignore[misc]


@torch.no_grad()
def merge(module: nn.Module) -> None:
    """Fold every ΔW into its weight; all-or-nothing if some ΔW is not finite."""
    layers = [(name, layer) for name, layer in adapted_layers(module) if not layer.merged]
    bad = [name for name, layer in layers if not torch.isfinite(layer.adapter.delta_weight()).all()]
    if bad:
        raise ValueError(f"ΔW is not finite in {bad}; nothing was merged")
    for _, layer in layers:
        layer.merge()


def unmerge(module: nn.Module) -> None:
    """Take every merged ΔW out of its weight again."""
    for _, layer in adapted_layers(module):
        layer.unmerge()


def remove_adapters(module: nn.Module, merge_first: bool = True) -> None:
    """Turn adapted layers back into their plain classes (after merging, by default)."""
    if merge_first:
        merge(module)
    for _, layer in list(adapted_layers(module)):
        del layer._modules[ADAPTER_KEY]
        del layer.merged
        layer.__class__ = type(layer).__mro__[2]  # Adapted<X> → (mixin, X): back to X


def adapter_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors of ``module`` (keys contain '.adapter.'), entries included."""
    return {k: v for k, v in module.state_dict().items() if _is_adapter_key(k)}


def load_adapter_state_dict(module: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load adapter tensors after checking that they fit, layer by layer; all-or-nothing."""
    own = adapter_state_dict(module)
    by_layer_own, by_layer_new = _group_by_layer(own), _group_by_layer(state)
    problems: list[str] = []
    for layer in sorted(set(by_layer_own) | set(by_layer_new)):
        mine, theirs = by_layer_own.get(layer, {}), by_layer_new.get(layer, {})
        if not mine:
            problems.append(f"'{layer}': the model has no adapter there")
            continue
        if not theirs:
            problems.append(f"'{layer}': the state has no tensors for its adapter")
            continue
        if set(mine) != set(theirs):
            method = _adapter_at(module, layer).method
            problems.append(
                f"'{layer}': state keys {sorted(theirs)} do not fit the model's {method} "
                f"adapter (keys {sorted(mine)}); was it saved from another method?"
            )
            continue
        for key, tensor in theirs.items():
            if tuple(tensor.shape) != tuple(mine[key].shape):
                problems.append(
                    f"'{layer}': {key} has shape {tuple(tensor.shape)}, "
                    f"the model's is {tuple(mine[key].shape)}"
                )
            elif key.endswith("indices") and not torch.equal(tensor.cpu(), mine[key].cpu()):
                problems.append(
                    f"'{layer}': spectral entries {key} differ from the model's "
                    f"(saved with another seed or n?)"
                )
    if problems:
        raise ValueError("adapter state does not fit the model:\n  " + "\n  ".join(problems))
    module.load_state_dict(dict(state), strict=False)


def _group_by_layer(state: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """{layer name: {adapter tensor name: tensor}} from '<layer>.adapter.<tensor>' keys."""
    grouped: dict[str, dict[str, Tensor]] = defaultdict(dict)
    for key, tensor in state.items():
        layer, sep, name = key.rpartition(f".{ADAPTER_KEY}.")
        if not sep:  # the root module itself is the adapted layer: 'adapter.<tensor>'
            layer, name = "", key.removeprefix(f"{ADAPTER_KEY}.")
        grouped[layer][name] = tensor
    return grouped


def _adapter_at(module: nn.Module, layer_name: str) -> BaseAdapter:
    return module.get_submodule(layer_name).adapter if layer_name else module.adapter


def trainable_report(module: nn.Module) -> str:
    """A table of trainable parameters per adapted layer type, totals and model share."""
    rows: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    adapter_params = 0
    for _, layer in adapted_layers(module):
        count = sum(p.numel() for p in layer.adapter.parameters() if p.requires_grad)
        row = rows[(layer.adapter.method, layer.adapter.spec.type_label)]
        row[0] += 1
        row[1] += count
        adapter_params += count
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    lines = [f"{'adapter':<10} {'layer type':<22} {'layers':>7} {'trainable':>14}"]
    lines += [
        f"{method:<10} {label:<22} {n:>7} {count:>14,}"
        for (method, label), (n, count) in sorted(rows.items())
    ]
    lines.append(f"{'other trainable (not adapters)':<41} {trainable - adapter_params:>14,}")
    share = 100.0 * trainable / max(total, 1)
    lines.append(f"{'total trainable':<41} {trainable:>14,} of {total:,} ({share:.3f}%)")
    return "\n".join(lines)
