"""``AdaptedBackbone``: builds a backbone, puts adapters into it, freezes the rest.

Registered as a builder function, not a wrapper module: it returns the inner backbone
itself, so parameter names and class names are exactly the plain backbone's. Pretrained
``init_cfg`` checkpoints load into unchanged keys, layer-decay optimizer constructors see
the real names, and a merged checkpoint loads into the adapter-free config as it is.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from mmengine.logging import MMLogger
from mmengine.registry import MODELS, Registry
from torch import nn

from ..cuda_graph import enable_cuda_graph
from ..inject import adapted_layers, adapter_state_dict, freeze, inject

ADAPTER_CFG_ATTR = "mm_spectral_cfg"


def AdaptedBackbone(  # noqa: N802  (a registry name, used like a class in configs)
    backbone: dict,
    adapter: dict | None = None,
    trainable: list[str] | None = None,
    frozen_dtype: str | None = None,
    cuda_graph: bool | dict = False,
) -> nn.Module:
    """Build ``backbone``, inject ``adapter`` (targets: regexes over its module names).

    Args:
        backbone: config of the inner backbone (any registered backbone).
        adapter: ``dict(type='FLoRA' | 'FourierFT' | 'FoRA' | 'LoRA', targets=[...], **hp)``;
            None gives the frozen-backbone ("Base") baseline.
        trainable: regexes over the inner backbone's parameter names that stay trainable
            (e.g. new output norms); everything else of the backbone is frozen.
        frozen_dtype: e.g. 'bfloat16': store the frozen parameters in that dtype (halves
            the memory of a frozen 6B backbone); adapters and ``trainable`` stay float32.
            The backbone then expects to run under autocast of that dtype (AMP training).
        cuda_graph: True (or ``dict(max_shapes=2, warmup_iters=3)``) to replay the
            backbone's training forward and backward as CUDA graphs whenever its input
            shape repeats (fixed-size crops): removes the host's per-op cost of the
            adapters. Not with ``with_cp``; other shapes, eval and CPU run eagerly.

    Returns:
        The inner backbone itself, with ``mm_spectral_cfg`` recording what was done.
    """
    inner = _build_inner(backbone)
    trainable = list(trainable or [])
    if adapter is not None:
        adapted = inject(inner, dict(adapter, trainable=trainable))
    else:
        adapted = []
        freeze(inner, trainable)
    if frozen_dtype is not None:
        cast_frozen(inner, getattr(torch, frozen_dtype))
    if cuda_graph:
        if getattr(inner, "with_cp", False):
            raise ValueError("cuda_graph=True cannot capture activation checkpointing (with_cp)")
        enable_cuda_graph(inner, **(cuda_graph if isinstance(cuda_graph, dict) else {}))
    record = dict(
        adapter=_plain(adapter),
        trainable=trainable,
        adapted=adapted,
        frozen_dtype=frozen_dtype,
        cuda_graph=bool(cuda_graph),
    )
    setattr(inner, ADAPTER_CFG_ATTR, record)
    if hasattr(type(inner), "init_weights"):
        inner.init_weights = _GuardedInitWeights(inner)
    return inner


MODELS.register_module(name="AdaptedBackbone", module=AdaptedBackbone)


def _build_inner(cfg: dict) -> nn.Module:
    """Build through the default scope's registry, else through the one toolbox registry
    that knows the type (a config built outside its toolbox's scope)."""
    try:
        return MODELS.build(cfg)
    except KeyError as err:
        name = cfg.get("type")
        if not isinstance(name, str) or "." in name or "is not in the" not in str(err):
            raise
        scopes = [scope for scope, reg in _descendants(MODELS) if name in reg.module_dict]
        if len(scopes) != 1:  # unknown, or ambiguous (e.g. mmdet's and mmseg's ResNet)
            raise
        return MODELS.build(dict(cfg, type=f"{scopes[0]}.{name}"))


def _descendants(registry: Registry) -> Iterator[tuple[str, Registry]]:
    for scope, child in registry.children.items():
        yield scope, child
        yield from _descendants(child)


def _plain(cfg: Any) -> Any:
    """ConfigDicts → dicts (the record is saved in checkpoint metas)."""
    if isinstance(cfg, dict):
        return {k: _plain(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [_plain(v) for v in cfg]
    return cfg


class _GuardedInitWeights:
    """Stands in for the backbone's ``init_weights``: runs the class's own, then restores
    the requires_grad flags and adapter tensors, with adapter keys summed up in the log.

    An object holding its module (not a closure): deepcopy (EMA) and pickle rebind it to
    the copied module.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self) -> None:
        module = self.module
        flags = {name: p.requires_grad for name, p in module.named_parameters()}
        adapters = {k: v.detach().clone() for k, v in adapter_state_dict(module).items()}
        with summarised_adapter_keys():
            type(module).init_weights(module)
        with torch.no_grad():
            for name, param in module.named_parameters():
                param.requires_grad_(flags[name])
            current = module.state_dict(keep_vars=True)
            for key, value in adapters.items():
                current[key].copy_(value)


class AdapterKeySummary(logging.Filter):
    """Rewrites mmengine's 'missing keys in source state_dict: …' warning so that adapter
    keys (new, hence never in a pretrained checkpoint) become one count."""

    PREFIX = "missing keys in source state_dict: "

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.PREFIX not in message:
            return True
        lines, n_adapter = [], 0
        for line in message.splitlines():
            if not line.startswith(self.PREFIX):
                lines.append(line)
                continue
            keys = [k.strip() for k in line[len(self.PREFIX) :].split(",") if k.strip()]
            rest = [k for k in keys if ".adapter." not in f".{k}"]
            n_adapter += len(keys) - len(rest)
            if rest:
                lines.append(self.PREFIX + ", ".join(rest))
        if n_adapter == 0:
            return True
        note = f"{n_adapter} adapter tensors are not in the checkpoint (expected: they are new)"
        if not any(line.startswith(("missing keys", "unexpected key")) for line in lines):
            record.msg, record.args = f"pretrained weights loaded; {note}", ()
            record.levelno, record.levelname = logging.INFO, "INFO"
        else:
            record.msg, record.args = "\n".join([*lines, note]), ()
        return True


@contextlib.contextmanager
def summarised_adapter_keys() -> Iterator[None]:
    """While active, mmengine's missing-key warnings count adapter keys instead of listing them."""
    logger = MMLogger.get_current_instance()
    summary = AdapterKeySummary()
    logger.addFilter(summary)
    try:
        yield
    finally:
        logger.removeFilter(summary)


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> None:
    """Store every floating parameter that does not require grad in ``dtype`` (in place)."""
    for param in module.parameters():
        if not param.requires_grad and param.is_floating_point():
            param.data = param.data.to(dtype)
    for _, layer in adapted_layers(module):
        layer.adapter.weight_dtype = layer.weight.dtype


def adapted_backbones(model: nn.Module) -> dict[str, nn.Module]:
    """{prefix: module} for every module built by AdaptedBackbone inside ``model``."""
    return {
        name: module for name, module in model.named_modules() if hasattr(module, ADAPTER_CFG_ATTR)
    }
