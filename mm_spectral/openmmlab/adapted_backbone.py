"""``AdaptedBackbone``: builds a backbone, puts adapters into it, freezes the rest.

Registered as a builder function, not a wrapper module: it returns the inner backbone
itself, so parameter names and class names are exactly the plain backbone's. Pretrained
``init_cfg`` checkpoints load into unchanged keys, layer-decay optimizer constructors see
the real names, and a merged checkpoint loads into the adapter-free config as it is.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from mmengine.registry import MODELS, Registry
from torch import nn

from ..adapters.batched_spectra import enable_batched_spectra, has_batched_spectra
from ..compile import compile_modules
from ..cuda_graph import enable_cuda_graph
from ..distributed import clean_name
from ..inject import cast_frozen, freeze, inject
from ..provenance import plain_types
from .init_guard import GuardedInitWeights

ADAPTER_CFG_ATTR = "mm_spectral_cfg"


def AdaptedBackbone(  # noqa: N802  (a registry name, used like a class in configs)
    backbone: dict,
    adapter: dict | None = None,
    trainable: list[str] | None = None,
    frozen_dtype: str | None = None,
    cuda_graph: bool | dict = False,
    batched_spectra: bool | None = None,
    compile: bool | dict = False,  # noqa: A002  (the config key users write)
) -> nn.Module:
    """Build ``backbone``, inject ``adapter`` (targets: regexes over its module names).

    Args:
        backbone: config of the inner backbone (any registered backbone).
        adapter: ``dict(type=<a registered method, e.g. 'FLoRA'>, targets=[...], **hp)``;
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
        batched_spectra: build the ΔW / factors of all same-shape FourierFT and FoRA
            layers with one FFT per forward (:func:`mm_spectral.enable_batched_spectra`)
            instead of one per layer, and FLoRA's Tucker products (grouped-conv ΔW, linear
            down factors), LoRA / DoRA / FoRA grouped-conv ΔW and the weight changes of
            low-rank linears with few tokens (``OPTIONS.batched_linears``) batched likewise:
            fewer host ops in eager training. None (default):
            on when the backbone has such layers and none of ``cuda_graph``, ``compile``
            and the backbone's ``with_cp`` is set. Not with ``cuda_graph`` (the graph
            replays its own builds) nor ``with_cp`` (its recomputation builds per layer).
        compile: True, or ``dict(targets=[regexes], **torch.compile kwargs)``, to run the
            backbone (or the modules ``targets`` names, e.g. its blocks) through
            ``torch.compile`` (:func:`mm_spectral.compile.compile_modules`): the adapters'
            small ops fuse into few kernels. Meant for fixed input sizes: a new size
            recompiles (with dynamic shapes from the second), which torch 2.14's inductor
            fails to do for ConvNeXt-V2 on a CPU, plain backbone alike. Names and
            checkpoints are unchanged. The first iterations compile (tens of seconds).
            Not with ``cuda_graph`` or ``batched_spectra``.

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
    checkpointed = getattr(inner, "with_cp", False)
    if batched_spectra is None:
        batched_spectra = not (cuda_graph or compile or checkpointed) and has_batched_spectra(inner)
    if batched_spectra:
        if checkpointed:
            raise ValueError(
                "batched_spectra=True hands each layer a build made once per forward, which "
                "with_cp's recomputation in the backward cannot take again; use one of "
                "batched_spectra and with_cp"
            )
        if cuda_graph:
            raise ValueError(
                "batched_spectra=True builds spectra before the forward, outside a captured "
                "CUDA graph; use one of batched_spectra and cuda_graph"
            )
        enable_batched_spectra(inner)
    if compile:
        switches = dict(cuda_graph=cuda_graph, batched_spectra=batched_spectra)
        clash = [name for name, on in switches.items() if on]
        if clash:
            raise ValueError(
                f"compile cannot be combined with {clash[0]}: torch.compile already removes the "
                "per-op host cost they address; use one of them"
            )
        options = dict(compile) if isinstance(compile, dict) else {}
        compile_modules(inner, options.pop("targets", None), **options)
    if cuda_graph:
        if getattr(inner, "with_cp", False):
            raise ValueError("cuda_graph=True cannot capture activation checkpointing (with_cp)")
        enable_cuda_graph(inner, **(cuda_graph if isinstance(cuda_graph, dict) else {}))
    record = dict(
        adapter=plain_types(adapter),
        trainable=trainable,
        adapted=adapted,
        frozen_dtype=frozen_dtype,
        cuda_graph=bool(cuda_graph),
        batched_spectra=batched_spectra,
        compile=plain_types(compile),
    )
    setattr(inner, ADAPTER_CFG_ATTR, record)
    if hasattr(type(inner), "init_weights"):
        inner.init_weights = GuardedInitWeights(inner)
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


def adapted_backbones(model: nn.Module) -> dict[str, nn.Module]:
    """{prefix: module} for every module built by AdaptedBackbone inside ``model`` (prefixes
    as in the unwrapped model, also under FSDP)."""
    return {
        clean_name(name): module
        for name, module in model.named_modules()
        if hasattr(module, ADAPTER_CFG_ATTR)
    }
