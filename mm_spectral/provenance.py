"""What a checkpoint records about how its adapters were made, and the checks against it.

Two records travel with adapter checkpoints (pure PyTorch, plain types only, so they load
with ``torch.load(weights_only=True)``):

- hyper-parameters: the adapter config (method ``type``, rank / alpha / scale / n / seed /
  targets …, the method's defaults filled in) and the adapted layer names. A model whose
  adapters were built otherwise computes another ΔW from the same tensors, often without
  any shape error (scale, alpha, seed of equal-size spectra), so loading compares them.
- base fingerprint: per frozen tensor its dtype, shape, float64 sum and absolute sum and
  :data:`PROBES` values at evenly spaced positions. It identifies the base weights an
  adapter-only file was trained on (another checkpoint, a re-initialised or fine-tuned base
  all differ), cheaply: no hash of every byte, so a change that keeps the sums within
  1e-6 relative and every probe equal passes unnoticed.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .adapters.base import ADAPTERS

PROBES = 8
"""Values sampled at evenly spaced flat positions of each fingerprinted tensor."""

_SUM_RTOL = 1e-6  # float64 sums of the same values on another device / in another order


class CheckpointMismatch(ValueError):
    """A checkpoint does not fit the config or the base it is applied to (nothing loaded)."""


# ----------------------------------------------------------------------- hyper-parameters
def adapter_hyper_parameters(cfg: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``cfg`` with the method's defaults filled in: equal results mean equal adapters,
    whether a default was written out or not. ``trainable`` (a freezing rule, not part
    of ΔW) is left out."""
    if cfg is None:
        return None
    params = {k: plain_types(v) for k, v in cfg.items() if k != "trainable"}
    method = ADAPTERS.get(params.get("type"))
    if method is not None:
        for name, param in inspect.signature(method.__init__).parameters.items():
            if param.default is not inspect.Parameter.empty:
                params.setdefault(name, param.default)
    return params


def record_problems(saved: Mapping[str, Any], current: Mapping[str, Any], where: str) -> list[str]:
    """One line per hyper-parameter that differs between two records of one backbone:
    the key, the checkpoint's value, the config's value."""
    problems = []
    saved_hp = adapter_hyper_parameters(saved.get("adapter"))
    current_hp = adapter_hyper_parameters(current.get("adapter"))
    if (saved_hp is None) != (current_hp is None):
        state = ("has adapters", "has none") if current_hp is None else ("has none", "has")
        return [f"{where}: the checkpoint {state[0]}, the config {state[1]}"]
    for key in sorted(set(saved_hp or {}) | set(current_hp or {})):
        old, new = (saved_hp or {}).get(key), (current_hp or {}).get(key)
        if old != new:
            problems.append(
                f"{where}: adapter '{key}' is {old!r} in the checkpoint, {new!r} in the config"
            )
    old_layers, new_layers = list(saved.get("adapted", [])), list(current.get("adapted", []))
    if not problems and old_layers != new_layers:
        only_old = sorted(set(old_layers) - set(new_layers))[:5]
        only_new = sorted(set(new_layers) - set(old_layers))[:5]
        problems.append(
            f"{where}: adapted layers differ ({len(old_layers)} in the checkpoint, "
            f"{len(new_layers)} in the config; only in the checkpoint: {only_old}, "
            f"only in the config: {only_new})"
        )
    return problems


def plain_types(value: Any) -> Any:
    """Mappings → dicts, tuples → lists, recursively: what a record read back from a file
    holds, so records compare equal before and after a save."""
    if isinstance(value, Mapping):
        return {k: plain_types(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_types(v) for v in value]
    return value


# ----------------------------------------------------------------------- base fingerprint
@torch.no_grad()
def tensor_fingerprint(tensor: Tensor) -> dict[str, Any]:
    """dtype, shape, float64 sum and absolute sum, :data:`PROBES` evenly spaced values."""
    flat = tensor.detach().reshape(-1)
    probes = flat[_probe_positions(flat.numel(), flat.device)]
    return dict(
        dtype=str(tensor.dtype).removeprefix("torch."),
        shape=list(tensor.shape),
        sum=flat.sum(dtype=torch.float64).item(),
        abs_sum=torch.linalg.vector_norm(flat, 1, dtype=torch.float64).item(),
        probes=probes.double().tolist(),
    )


def base_fingerprint(tensors: Mapping[str, Tensor]) -> dict[str, dict[str, Any]]:
    """{key: :func:`tensor_fingerprint`} of the base (frozen) tensors an adapter needs."""
    return {key: tensor_fingerprint(tensor) for key, tensor in sorted(tensors.items())}


def fingerprint_problems(
    saved: Mapping[str, Mapping[str, Any]], tensors: Mapping[str, Tensor]
) -> list[str]:
    """Keys whose tensor in ``tensors`` is not the one ``saved`` fingerprinted, with why.

    A tensor held in another dtype than recorded (``frozen_dtype``) is compared in the
    lower of the two precisions: exact probes when it can be cast down to the recorded
    dtype, else within that dtype's resolution.
    """
    problems = []
    for key, record in saved.items():
        tensor = tensors.get(key)
        if tensor is None:
            problems.append(f"'{key}': not in the model")
            continue
        if list(tensor.shape) != list(record["shape"]):
            problems.append(f"'{key}': shape {list(tensor.shape)}, recorded {record['shape']}")
            continue
        recorded = getattr(torch, record["dtype"])
        if _resolution(tensor.dtype) <= _resolution(recorded):
            tensor, rtol, probe_rtol = tensor.to(recorded), _SUM_RTOL, 0.0
        else:
            rtol = probe_rtol = 2 * _resolution(tensor.dtype)
        now = tensor_fingerprint(tensor)
        scale = max(record["abs_sum"], now["abs_sum"], 1e-30)
        if abs(now["sum"] - record["sum"]) > rtol * scale or (
            abs(now["abs_sum"] - record["abs_sum"]) > rtol * scale
        ):
            problems.append(
                f"'{key}': sum {now['sum']:.9g} / abs sum {now['abs_sum']:.9g}, recorded "
                f"{record['sum']:.9g} / {record['abs_sum']:.9g}"
            )
        elif any(
            abs(a - b) > probe_rtol * max(abs(a), abs(b))
            for a, b in zip(now["probes"], record["probes"])
        ):
            problems.append(
                f"'{key}': probed values {now['probes'][:3]}…, recorded {record['probes'][:3]}…"
            )
    return problems


def _probe_positions(numel: int, device: torch.device) -> Tensor:
    count = min(PROBES, numel)
    if count == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.linspace(0, numel - 1, count, device=device).round().long()


def _resolution(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
