"""Put adapters into any nn.Module, and merge, unmerge, save, load, count them.

Everything is validated before anything is changed, so a bad config leaves the module
exactly as it was.
"""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .adapters import ADAPTABLE_TYPES, ADAPTERS, BaseAdapter, LayerSpec, adapted_class, is_adapted
from .adapters.row_blocks import RowBlocks
from .state import ADAPTER_KEY, adapted_layers, finite_folds, is_adapter_key


def _as_patterns(value: str | list[str] | tuple[str, ...] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def build_adapter(name: str, layer: nn.Module, cfg: Mapping[str, Any]) -> BaseAdapter:
    """Build the adapter that ``cfg`` (type + hyper-parameters, optional ``row_blocks``)
    describes for one layer."""
    cfg = dict(cfg)
    method = cfg.pop("type", None)
    if method not in ADAPTERS:
        raise ValueError(f"unknown adapter type {method!r}; known types: {sorted(ADAPTERS)}")
    for key in ("targets", "trainable"):
        cfg.pop(key, None)
    row_blocks = cfg.pop("row_blocks", None)

    def build(spec: LayerSpec) -> BaseAdapter:
        try:
            return ADAPTERS[method](spec, **cfg)
        except TypeError as err:  # an unknown hyper-parameter name
            raise TypeError(f"{method} on layer '{spec.name}': {err}") from None

    spec = LayerSpec.of(name, layer)
    return build(spec) if row_blocks is None else RowBlocks.from_config(spec, row_blocks, build)


def _build_all(named: Mapping[str, nn.Module], targets: list[str], cfg: Mapping[str, Any]):
    """{name: adapter} for every target; one error listing every layer that does not fit."""
    adapters, problems = {}, []
    for name in targets:
        try:
            adapters[name] = build_adapter(name, named[name], cfg)
        except ValueError as err:
            problems.append(str(err))
    if len(problems) == 1:
        raise ValueError(problems[0])
    if problems:
        raise ValueError(
            f"the adapter config does not fit {len(problems)} layers:\n  " + "\n  ".join(problems)
        )
    return adapters


def _warn_sizes(adapters: Mapping[str, BaseAdapter]) -> None:
    """One warning for the whole inject call, listing every layer whose hyper-parameters
    exceed what its shape can use (layers with the same note grouped)."""
    by_note: dict[str, list[str]] = defaultdict(list)
    for name, adapter in adapters.items():
        note = adapter.size_warning()
        if note:
            by_note[note].append(name)
    if not by_note:
        return
    count = sum(len(names) for names in by_note.values())
    lines = [f"{', '.join(repr(n) for n in names)}: {note}" for note, names in by_note.items()]
    warnings.warn(
        f"{count} adapted layer(s) have a rank larger than a mode of the weight or more adapter "
        "parameters than weight entries (the extra rank adds parameters, not expressiveness; "
        "FLoRA clips its core to the mode):\n  " + "\n  ".join(lines),
        UserWarning,
        stacklevel=3,
    )


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

    ``cfg``: ``type`` (a registered method: 'LoRA', 'DoRA', 'FLoRA', 'FourierFT', 'FoRA',
    'BitFit'), ``targets`` (regexes that must fully match module names), optional
    ``trainable`` (regexes over parameter names that stay trainable, e.g. norms), optional
    ``row_blocks=dict(split=S, use=(i, ...))`` (adapt only these row blocks of each Linear,
    e.g. q and v of a fused qkv), and the method's hyper-parameters. Afterwards only
    adapter parameters and ``trainable`` matches require grad. Warns once, listing the
    layers, when a rank exceeds a mode of the weight.
    """
    targets = find_targets(module, _as_patterns(cfg.get("targets")))
    named = dict(module.named_modules())
    already = [name for name in targets if is_adapted(named[name])]
    if already:
        raise ValueError(f"layers already carry an adapter (inject once per layer): {already}")
    trainable = _as_patterns(cfg.get("trainable"))
    # Build every adapter (which validates the hyper-parameters per layer) before attaching any.
    adapters = _build_all(named, targets, cfg)
    _match_parameters(module, trainable)  # validate the patterns before changing anything
    for name, adapter in adapters.items():
        layer = named[name]
        layer.__class__ = adapted_class(type(layer))
        layer.add_module(ADAPTER_KEY, adapter.to(layer.weight.device))
        layer.merged = False
        adapter.reset_from_base(layer.weight)  # DoRA's magnitude ‖W0‖_c
    freeze(module, trainable)
    _warn_sizes(adapters)
    return targets


@torch.no_grad()
def reset_from_base(module: nn.Module) -> None:
    """Re-derive every unmerged adapter's base-dependent tensors (DoRA's magnitude) from
    the current base weights, except those loaded from a state dict.

    Loading a state dict with a layer's weight does this for that layer by itself; call
    it after changing base weights in place (an ``init_weights`` that re-draws them).
    """
    for _, layer in adapted_layers(module):
        if not layer.merged:
            layer.adapter.reset_from_base(layer.weight)


def freeze(module: nn.Module, trainable: list[str] | None = None) -> None:
    """Only adapter parameters and ``trainable`` matches (regexes over parameter names,
    fully matched) keep requires_grad; everything else of ``module`` is frozen."""
    keep = _match_parameters(module, _as_patterns(trainable))
    for name, param in module.named_parameters():
        param.requires_grad_(is_adapter_key(name) or name in keep)


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


@torch.no_grad()
def merge(module: nn.Module) -> None:
    """Fold every adapter into its weight (and bias); all-or-nothing if some result is not
    finite."""
    for name, fold in finite_folds(module).items():
        module.get_submodule(name).merge(fold)


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
        layer.__dict__.pop("merge_memo", None)
        layer.__class__ = type(layer).__mro__[2]  # Adapted<X> → (mixin, X): back to X


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> None:
    """Store every floating parameter that does not require grad in ``dtype`` (in place)."""
    for param in module.parameters():
        if not param.requires_grad and param.is_floating_point():
            param.data = param.data.to(dtype)
