"""Full tensors, full parameter counts and plain names from a model under FSDP.

Under ``FullyShardedDataParallel`` (``use_orig_params=True``) a rank's parameters are 1-D
slices of its shard (some empty) and names carry ``_fsdp_wrapped_module.``: a state dict,
a checksum or a parameter count read from them describes one rank's shard. The helpers
here gather one FSDP unit at a time (``summon_full_params(unit, recurse=False)``: the
memory of the largest unit, never of the whole model) and name tensors as the unwrapped
model does. Under FSDP every rank must call them (they communicate); on any other module
they read it directly and communicate nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

# Module names wrappers insert (FSDP units, activation checkpointing, torch.compile).
WRAPPER_NAMES = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def clean_name(name: str) -> str:
    """``backbone._fsdp_wrapped_module.blocks.0.weight`` → ``backbone.blocks.0.weight``."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_NAMES)


def is_fsdp(module: nn.Module) -> bool:
    return isinstance(module, FSDP)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def own_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of ``module`` outside the FSDP units nested in it: what a unit
    wrapping ``module`` flattens (or, inside an FSDP unit, what that unit manages)."""
    seen: set[int] = set()
    stack = [("", module)]
    while stack:
        prefix, current = stack.pop()
        for name, param in current._parameters.items():
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                yield _join(prefix, name), param
        for name, child in reversed(current._modules.items()):
            if child is not None and not isinstance(child, FSDP):
                stack.append((_join(prefix, name), child))


def fsdp_units(model: nn.Module) -> list[tuple[str, FSDP]]:
    """(plain name, unit) of every FSDP unit in ``model``, in the same order on every rank."""
    return [(clean_name(n), m) for n, m in model.named_modules() if isinstance(m, FSDP)]


def _require_orig_params(model: nn.Module) -> None:
    if not getattr(model, "_use_orig_params", True):
        raise ValueError(
            "mm_spectral needs FSDP with use_orig_params=True (MMEngine's default): with "
            "False, the adapters and frozen weights are not parameters the hooks can see"
        )


def _persistent_buffers(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Buffers a state dict holds (FSDP does not shard buffers), with plain names."""
    for prefix, module in model.named_modules():
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                yield clean_name(_join(prefix, name)), buf


@torch.no_grad()
def full_tensors(
    model: nn.Module, keep: Callable[[str], bool] | None = None, rank0_only: bool = True
) -> dict[str, Tensor]:
    """{plain name: full tensor, detached on the CPU} of the parameters and persistent
    buffers of ``model`` whose plain name passes ``keep`` (all by default).

    Under FSDP only units holding a kept parameter are gathered, one at a time; with
    ``rank0_only`` the other ranks take part and get ``{}``. A plain module gives its
    state dict (filtered) on every rank.
    """
    keep = keep or (lambda name: True)
    if not is_fsdp(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items() if keep(k)}
    _require_orig_params(model)
    receives = not rank0_only or dist.get_rank() == 0
    out: dict[str, Tensor] = {}
    for prefix, unit in fsdp_units(model):
        wanted = {
            full: param
            for name, param in own_parameters(unit.module)
            if keep(full := clean_name(_join(prefix, name)))
        }
        if not wanted:  # the same on every rank: names do not depend on the shard
            continue
        with FSDP.summon_full_params(unit, recurse=False, writeback=False, rank0_only=rank0_only):
            if receives:  # the parameters are whole views for the duration
                out.update((name, p.detach().cpu().clone()) for name, p in wanted.items())
    if receives:
        out.update((n, b.detach().cpu().clone()) for n, b in _persistent_buffers(model) if keep(n))
    return out


def full_numels(model: nn.Module) -> dict[int, int]:
    """{id(parameter): unsharded numel} of every parameter under FSDP ({} otherwise).

    Each unit is gathered once, in turn: the sizes of the original parameters are only
    visible while unsharded through FSDP's public API.
    """
    if not is_fsdp(model):
        return {}
    _require_orig_params(model)
    counts: dict[int, int] = {}
    for _, unit in fsdp_units(model):
        params = [p for _, p in own_parameters(unit.module)]
        if params:
            with FSDP.summon_full_params(unit, recurse=False, writeback=False):
                counts.update((id(p), p.numel()) for p in params)
    return counts


@contextlib.contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """Under FSDP: every parameter whole on rank 0 (in CPU memory) for the duration, the
    other ranks taking part; elsewhere nothing. For diagnostics that need the whole model."""
    if not is_fsdp(model):
        yield
        return
    _require_orig_params(model)
    offload = next(model.parameters()).device.type != "cpu"
    with FSDP.summon_full_params(model, writeback=False, rank0_only=True, offload_to_cpu=offload):
        yield


def unit_summary(model: nn.Module, numels: dict[int, int] | None = None) -> str:
    """One line per kind of FSDP unit: frozen (no gradient memory), trainable, and mixed
    (whose frozen parameters still get gradient memory: FSDP flattens a unit into one
    tensor), naming the mixed ones. ``numels`` from :func:`full_numels` (else gathered)."""
    numels = full_numels(model) if numels is None else numels
    kinds: dict[str, list[int]] = {"frozen": [0, 0], "trainable": [0, 0]}
    mixed = []
    for prefix, unit in fsdp_units(model):
        params = [p for _, p in own_parameters(unit.module)]
        frozen = sum(numels.get(id(p), p.numel()) for p in params if not p.requires_grad)
        trainable = sum(numels.get(id(p), p.numel()) for p in params if p.requires_grad)
        if frozen and trainable:
            mixed.append(f"'{prefix or '<root>'}' ({frozen:,} frozen, {trainable:,} trainable)")
        elif frozen or trainable:
            kind = kinds["frozen" if frozen else "trainable"]
            kind[0] += 1
            kind[1] += frozen or trainable
    line = "FSDP units: " + ", ".join(f"{n} {k} ({c:,} params)" for k, (n, c) in kinds.items())
    if mixed:
        line += f"; {len(mixed)} mixed, whose frozen params get gradients: " + ", ".join(mixed)
    return line
