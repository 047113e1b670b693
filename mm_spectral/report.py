"""Counting what trains: the trainable-parameter table and per-model totals."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from torch import Tensor, nn

from .state import adapted_layers, is_adapter_key


def parameter_counts(module: nn.Module) -> dict[str, int]:
    """{'adapter', 'trainable', 'total'} parameter counts of ``module`` (shared ones once)."""
    named = dict(module.named_parameters())
    return dict(
        adapter=sum(p.numel() for n, p in named.items() if is_adapter_key(n)),
        trainable=sum(p.numel() for p in named.values() if p.requires_grad),
        total=sum(p.numel() for p in named.values()),
    )


def trainable_report(module: nn.Module, numel: Callable[[Tensor], int] = Tensor.numel) -> str:
    """A table of trainable parameters per adapted layer type, totals and model share.

    ``numel`` counts one parameter (a sharded model passes the unsharded size).
    """
    rows: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    adapter_params = 0
    for _, layer in adapted_layers(module):
        count = sum(numel(p) for p in layer.adapter.parameters() if p.requires_grad)
        row = rows[(layer.adapter.method, layer.adapter.spec.type_label)]
        row[0] += 1
        row[1] += count
        adapter_params += count
    total = sum(numel(p) for p in module.parameters())
    trainable = sum(numel(p) for p in module.parameters() if p.requires_grad)
    lines = [f"{'adapter':<10} {'layer type':<22} {'layers':>7} {'trainable':>14}"]
    lines += [
        f"{method:<10} {label:<22} {n:>7} {count:>14,}"
        for (method, label), (n, count) in sorted(rows.items())
    ]
    lines.append(f"{'other trainable (not adapters)':<41} {trainable - adapter_params:>14,}")
    share = 100.0 * trainable / max(total, 1)
    lines.append(f"{'total trainable':<41} {trainable:>14,} of {total:,} ({share:.3f}%)")
    return "\n".join(lines)
