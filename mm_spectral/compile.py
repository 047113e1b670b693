"""Compile a model (or its repeated blocks) with ``torch.compile``, in place, names unchanged.

An adapted layer adds a few small ops per linear or conv; in eager mode each op costs the
host tens of µs of dispatch, which on a GPU can outweigh its arithmetic. Compiling fuses
those ops into few kernels launched by generated code, and lets the partitioner recompute
cheap activations instead of saving them. ``nn.Module.compile`` keeps parameter names and
state-dict keys, so checkpoints, adapters and merging are unaffected; blocks of the same
code and shapes share one compiled graph, so compile time does not grow with depth.

Every adapter traces as one graph (no graph break, tested with ``fullgraph=True``); while
compiling, the adapters take their plain-torch paths (``torch.compiler.is_compiling``), so
the compiler sees ordinary ops instead of the hand-written Triton kernels.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn


def compile_modules(
    model: nn.Module, targets: list[str] | None = None, **compile_kwargs: Any
) -> list[str]:
    """Compile every module whose name fully matches one of ``targets`` (regexes over
    ``model.named_modules()``), or ``model`` itself when ``targets`` is None.

    Modules inside an already chosen one are skipped (the outer graph covers them).
    ``compile_kwargs`` go to ``torch.compile`` (``mode``, ``dynamic``, ``backend``, …).
    Returns the compiled names ('' for the model itself). Raises ValueError when a pattern
    matches nothing, naming it.
    """
    if targets is None:
        model.compile(**compile_kwargs)
        return [""]
    patterns = [re.compile(t) for t in targets]
    chosen: list[tuple[str, nn.Module]] = []
    used = [False] * len(patterns)
    for name, module in model.named_modules():
        hits = [i for i, p in enumerate(patterns) if p.fullmatch(name)]
        for i in hits:
            used[i] = True
        if hits and not any(name.startswith(outer + ".") for outer, _ in chosen):
            chosen.append((name, module))
    unused = [t for t, hit in zip(targets, used) if not hit]
    if unused:  # checked before compiling anything: nothing half-applied
        raise ValueError(f"compile targets matched no module: {unused}")
    for _, module in chosen:
        module.compile(**compile_kwargs)
    return [name for name, _ in chosen]
