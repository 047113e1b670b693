"""Many same-shape sparse-spectrum inverse FFTs as one batched ``irfft2`` (pure torch).

A ViT-L has 24 blocks whose FourierFT layers share four shapes; building each ΔW costs a
handful of small launches (zero-fill, two scatters, an inverse FFT; in the backward a
forward FFT and a gather), so the per-layer builds are host-bound on a fast GPU. Here all
layers of one shape go through one scatter and one ``irfft2`` over a (layers, rows, cols)
batch, and one ``rfft2`` plus one gather in the backward.

- :func:`batched_sparse_spectrum_to_real` — the batched form of
  :func:`mm_spectral.adapters.spectral.sparse_spectrum_to_real` (same values, gradients);
- :func:`batched_fourierft_deltas`, :func:`batched_fora_factors` — every adapter's
  ``delta()`` / ``low_rank_factors()`` for a list of same-shape adapters;
  :func:`batched_flora_deltas` / :func:`batched_flora_downs` likewise for FLoRA's Tucker
  products, built every forward too: a grouped conv's ΔW, a linear's down factor
  (:mod:`mm_spectral.adapters.batched_tucker`); :func:`batched_low_rank_deltas` and
  :func:`batched_fora_deltas` for the ΔW = s·B A that LoRA, DoRA and FoRA build where
  they cannot run factored (grouped convs: ConvNeXt's 7×7 depthwise layers), one ``bmm``;
  these, :func:`batched_flora_linear_deltas` and :func:`batched_dora_weights` (DoRA's W'
  itself) also for the low-rank linears that step with a whole built weight (change) with
  few tokens
  (:func:`mm_spectral.kernels.dispatch.batched_delta_linear`);
- :func:`enable_batched_spectra` — a forward pre-hook that plans, before each forward,
  batched builds of a model's spectral ΔW / factors (and the Tucker and low-rank
  products above) in chunks, each made by the first of its layers to run, and hands each
  adapter its own (on by default in eager ``AdaptedBackbone`` training; the layers'
  scatter slots are computed once and kept).
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..kernels.dispatch import batched_delta_linear
from .base import LowRankAdapter
from .batched_dora import batched_rescaled_weights
from .batched_tucker import (
    batched_conv_tucker_deltas,
    batched_core_products,
    batched_low_rank_products,
    batched_tucker_linear_deltas,
)
from .dora import DoRA
from .flora import FLoRA
from .fora import FoRA
from .fourierft import FourierFT
from .functional import outside_autocast, scaled_mm
from .layer_walk import ADAPTED, SHARDED, adapted_layer_walk, role
from .lora import LoRA
from .packed_weights import pack_back_to_back
from .stash import WHOLE_DELTA, stash_all, stash_builder


def _layer_slots(rows: int, cols: int) -> int:
    """Float slots of one layer's half spectrum plus its spare complex slot (as the
    single-layer scatter lays it out)."""
    return 2 * (rows * (cols // 2 + 1) + 1)


class _BatchedSparseSpectrumToReal(torch.autograd.Function):
    """Forward: one scatter into all layers' half spectra, one batched ``irfft2``.

    Backward: one batched ``rfft2`` of the gradients, one gather (cf. the single-layer
    ``_SparseSpectrumToReal``: ∂/∂c = scale · Re(fft2(g))[entry] / (rows · cols)).
    """

    @staticmethod
    def forward(ctx, shape, slots, scales, *coefficients):  # type: ignore[override]
        own, mirror, gather = slots
        rows, cols = shape
        layers = len(coefficients)
        device = coefficients[0].device
        sizes = [c.numel() for c in coefficients]
        # 1-D coefficients (FourierFT's, FoRA's) go in as they are: a reshape would add a
        # view node per layer and step.
        values = torch.cat(
            [c.float() if c.dim() == 1 else c.float().reshape(-1) for c in coefficients]
        )
        if len(set(scales)) == 1:
            per_entry: Tensor | float = scales[0]
        else:  # repeat_interleave with output_size: no device sync
            per_entry = torch.repeat_interleave(
                torch.tensor(scales, device=device),
                torch.tensor(sizes, device=device),
                output_size=values.numel(),
            )
        # Each coefficient gives half of itself (times its layer's scale) to its own slot
        # and half to its mirror's, as in the single-layer build.
        values = values * (per_entry * 0.5)
        flat = torch.zeros(layers * _layer_slots(rows, cols), device=device)
        flat.index_add_(0, own, values)
        flat.index_add_(0, mirror, values)
        spectra = torch.view_as_complex(flat.view(layers, -1, 2)[:, :-1])
        ctx.save_for_backward(gather)
        ctx.per_entry = per_entry
        ctx.shape, ctx.sizes = shape, sizes
        ctx.dtypes = [c.dtype for c in coefficients]
        return torch.fft.irfft2(spectra.view(layers, rows, cols // 2 + 1), s=shape)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (gather,) = ctx.saved_tensors
        rows, cols = ctx.shape
        spectrum = torch.view_as_real(torch.fft.rfft2(grad_out.float()))
        per_entry = ctx.per_entry
        if isinstance(per_entry, float):  # one scalar op
            grads = torch.take(spectrum, gather).mul_(per_entry / (rows * cols))
        else:
            grads = torch.take(spectrum, gather).mul_(per_entry).div_(rows * cols)
        parts = grads.split(ctx.sizes)
        return (None, None, None, *(p.to(d) for p, d in zip(parts, ctx.dtypes)))


def batched_positions(
    positions: Sequence[Tensor], shape: tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor]:
    """Scatter and gather slots of several layers in the batched layout.

    Args:
        positions: each layer's :func:`~mm_spectral.adapters.spectral.half_spectrum_positions`.
        shape: the common (rows, cols).

    Returns:
        (own, mirror, gather): flat float slots of all layers' entries, concatenated; the
        scatter slots index one (layers, rows·(cols//2+1) + 1, 2) buffer, the gather slots
        the (layers, rows, cols//2+1, 2) real view of a batched ``rfft2``.
    """
    rows, cols = shape
    scatter_stride = _layer_slots(rows, cols)
    gather_stride = 2 * rows * (cols // 2 + 1)
    own, mirror, gather = [], [], []
    for layer, pos in enumerate(positions):
        n = pos.numel() // 3
        own.append(pos[:n] + layer * scatter_stride)
        mirror.append(pos[n : 2 * n] + layer * scatter_stride)
        gather.append(pos[2 * n :] + layer * gather_stride)
    return torch.cat(own), torch.cat(mirror), torch.cat(gather)


def batched_sparse_spectrum_to_real(
    coefficients: Sequence[Tensor],
    positions: Sequence[Tensor],
    shape: tuple[int, int],
    scales: Sequence[float],
    slots: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """(layers, rows, cols) float32: layer ℓ is ``sparse_spectrum_to_real(coefficients[ℓ],
    positions[ℓ], shape, scales[ℓ])``, all from one batched inverse real FFT.

    ``slots``: the :func:`batched_positions` of ``positions``, when precomputed (a batch
    built every step); ``positions`` is then not read.
    """
    if not coefficients:
        raise ValueError("batched_sparse_spectrum_to_real needs at least one layer")
    if len(scales) != len(coefficients):
        raise ValueError(f"{len(coefficients)} layers but {len(scales)} scales")
    if slots is None:
        slots = batched_positions(positions, shape)
    scales = tuple(float(s) for s in scales)
    return _BatchedSparseSpectrumToReal.apply(tuple(shape), slots, scales, *coefficients)


Slots = tuple[Tensor, Tensor, Tensor]


class SlotCache:
    """:func:`batched_positions` of each group of layers, computed once per set of
    positions tensors (a loaded state dict or a move to another device replaces them): the
    per-layer offsets cost three device ops per layer, more than the batched build."""

    MAX_ENTRIES = 256  # many more than a model's groups: past it, start afresh

    def __init__(self) -> None:
        # Keyed by the positions tensors' ids, which the entry keeps alive (so not reused).
        self._entries: dict[tuple, tuple[tuple[Tensor, ...], Slots]] = {}

    def slots(self, positions: Sequence[Tensor], shape: tuple[int, int]) -> Slots:
        """The slots of ``positions`` (one group's layers, in order) in ``shape``."""
        key = (tuple(shape), *map(id, positions))
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries.clear()
            entry = (tuple(positions), batched_positions(positions, shape))
            self._entries[key] = entry
        return entry[1]


def _parameter_lists(adapters: Sequence[nn.Module], *names: str) -> list[list[Tensor]]:
    """Each named parameter of every adapter, one list per name. From ``_parameters``:
    ``nn.Module.__getattr__`` cost about 1 µs per lookup here, and a build makes two or
    three per layer and step (batched builds never run inside FSDP units, whose forwards
    swap parameters for plain attributes)."""
    tables = [a._parameters for a in adapters]
    return [[table[name] for table in tables] for name in names]


def _same_shape(adapters: Sequence[nn.Module], shape_of: Any, caller: str) -> Any:
    shape = shape_of(adapters[0])
    if any(shape_of(a) != shape for a in adapters):
        raise ValueError(f"{caller}: the adapters' weights differ in shape")
    return shape


def batched_fourierft_deltas(
    adapters: Sequence[FourierFT], cache: SlotCache | None = None
) -> list[Tensor]:
    """Each adapter's ``delta()`` (float32, its weight's matrix shape) from one batched build;
    ``cache`` keeps the group's slots between steps."""
    shape = _same_shape(adapters, lambda a: a.spec.matrix_shape, "batched_fourierft_deltas")
    positions = [a.positions for a in adapters]
    slots = None if cache is None else cache.slots(positions, shape)
    deltas = batched_sparse_spectrum_to_real(
        [a.coefficients for a in adapters], positions, shape, [a.alpha for a in adapters], slots
    )
    return list(deltas.unbind(0))


def _fora_stacks(
    adapters: Sequence[FoRA], cache: SlotCache | None, caller: str
) -> tuple[Tensor, Tensor]:
    """All adapters' down and up factors, (layers, r, fan_in) and (layers, out, r), from
    two batched builds."""
    a_shape, b_shape = _same_shape(adapters, lambda a: (a.a_shape, a.b_shape), caller)
    ones = [1.0] * len(adapters)
    factors = []
    for part, shape in (("a", a_shape), ("b", b_shape)):
        positions = [getattr(a, f"{part}_positions") for a in adapters]
        slots = None if cache is None else cache.slots(positions, shape)
        coefficients = [getattr(a, f"{part}_coefficients") for a in adapters]
        factors.append(batched_sparse_spectrum_to_real(coefficients, positions, shape, ones, slots))
    return factors[0], factors[1]


def batched_fora_factors(
    adapters: Sequence[FoRA], cache: SlotCache | None = None
) -> list[tuple[Tensor, Tensor, float]]:
    """Each adapter's ``low_rank_factors()`` (down, up, scale) from two batched builds;
    ``cache`` keeps the group's slots between steps."""
    downs, ups = _fora_stacks(adapters, cache, "batched_fora_factors")
    return [(d, u, a.scale) for d, u, a in zip(downs.unbind(0), ups.unbind(0), adapters)]


def _low_rank_shapes(adapter: LoRA) -> tuple:
    """What LoRA/DoRA layers must share to be built together: what fixes the factors'
    shapes (weight shape, groups, rank, conv factors) and the scale."""
    spec = adapter.spec
    return spec.weight_shape, spec.groups, adapter.rank, adapter.conv_factors, adapter.scale


def batched_low_rank_deltas(adapters: Sequence[LoRA]) -> list[Tensor]:
    """Each LoRA/DoRA adapter's ``delta()`` on a layer it cannot run factored (a grouped
    conv, or loralib's conv factors), s · B A, from one batched product."""
    _same_shape(adapters, _low_rank_shapes, "batched_low_rank_deltas")
    ups, downs = _parameter_lists(adapters, "lora_B", "lora_A")
    return list(batched_low_rank_products(ups, downs, adapters[0].scale).unbind(0))


_BASE = "_batched_base_weight"  # a DoRA linear's W0, set by the plan (_groups) for its build


def batched_dora_weights(adapters: Sequence[DoRA]) -> list[Tensor]:
    """Each DoRA linear's rescaled weight W' (float32, (out, in)) from one batched build
    (:mod:`mm_spectral.adapters.batched_dora`), for linears that step with it
    (:func:`~mm_spectral.adapters.functional.planned_weight_linear`). Reads each layer's
    frozen W0 where the plan left it on the adapter (and takes it off: the next plan sets
    it again)."""
    _same_shape(adapters, _low_rank_shapes, "batched_dora_weights")
    weights = [a.__dict__.pop(_BASE, None) for a in adapters]
    if any(w is None for w in weights):
        raise ValueError(
            "batched_dora_weights needs each layer's base weight, which the plan of "
            "enable_batched_spectra / build_batched_spectra hands over"
        )
    ups, downs, magnitudes = _parameter_lists(adapters, "lora_B", "lora_A", "magnitude")
    rescaled = batched_rescaled_weights(weights, ups, downs, magnitudes, adapters[0].scale)
    return list(rescaled.unbind(0))


def batched_fora_deltas(adapters: Sequence[FoRA], cache: SlotCache | None = None) -> list[Tensor]:
    """Each FoRA adapter's ``delta()`` on a layer it cannot run factored: its factors from
    two batched spectral builds, then one batched product."""
    downs, ups = _fora_stacks(adapters, cache, "batched_fora_deltas")
    # float32, as LowRankAdapter.delta; the scale in the GEMM's alpha
    deltas = _float32(scaled_mm, ups, downs, adapters[0].scale)
    return list(deltas.unbind(0))


def _float32(fn: Any, *args: Any) -> Tensor:
    """``fn(*args)`` of float32 operands, kept float32 under autocast."""
    device_type = args[0].device.type
    if torch.is_autocast_enabled(device_type):
        return outside_autocast(device_type, fn, *args)
    return fn(*args)


def _flora_shapes(adapter: FLoRA) -> tuple:
    """What FLoRA layers must share to be built together: weight shape, ranks (which fix
    the core's shape) and scale. Plain attributes: asked per layer and step,
    ``adapter.core`` (``nn.Module.__getattr__``) was most of the walk's cost per adapter."""
    return adapter.spec.weight_shape, adapter.rank, adapter.kernel_rank, adapter.scale


def batched_flora_deltas(adapters: Sequence[FLoRA]) -> list[Tensor]:
    """Each grouped-conv FLoRA adapter's ``delta()`` (float32, (out, in/groups·kh·kw)) from
    one batched Tucker product (:mod:`mm_spectral.adapters.batched_tucker`)."""
    _same_shape(adapters, _flora_shapes, "batched_flora_deltas")
    deltas = batched_conv_tucker_deltas(
        [a.core for a in adapters], [a.factor_tensors() for a in adapters], adapters[0].scale
    )
    return list(deltas.unbind(0))


def batched_flora_linear_deltas(adapters: Sequence[FLoRA]) -> list[Tensor]:
    """Each linear FLoRA adapter's whole ΔW = s · U_out core U_inᵀ (float32, (out, in)) from
    two batched ``bmm``, for linears that step as W0 + ΔW
    (:meth:`~mm_spectral.adapters.base.LowRankAdapter.batches_linear_delta`)."""
    _same_shape(adapters, _flora_shapes, "batched_flora_linear_deltas")
    factors = [a.factor_tensors() for a in adapters]
    (cores,) = _parameter_lists(adapters, "core")
    deltas = batched_tucker_linear_deltas(
        cores, [f[0] for f in factors], [f[1] for f in factors], adapters[0].scale
    )
    return list(deltas.unbind(0))


def batched_flora_downs(adapters: Sequence[FLoRA]) -> list[Tensor]:
    """Each linear FLoRA adapter's down factor s · core U_inᵀ (float32, (J_out, in)) from
    one batched ``bmm``; its forward then runs as a plain low-rank linear with up = U_out."""
    _same_shape(adapters, _flora_shapes, "batched_flora_downs")
    downs = batched_core_products(
        [a.core for a in adapters], [a.factor_tensors()[1] for a in adapters], adapters[0].scale
    )
    return list(downs.unbind(0))


# --- use in the forward ---------------------------------------------------------------------


def _group_key(adapter: nn.Module) -> tuple | None:
    """The shape group ``adapter`` batches in, or None where it builds alone (FLoRA on an
    ungrouped conv runs factored)."""
    if isinstance(adapter, FourierFT):
        return ("FourierFT", adapter.spec.matrix_shape)
    # Low-rank linears that step as W0 + ΔW (_whole_delta) batch their whole ΔW, as the
    # layers that cannot run factored (grouped convs) do.
    if isinstance(adapter, FoRA):  # factors, or its ΔW
        if adapter.factored and not _whole_delta(adapter):
            return ("FoRA", adapter.a_shape, adapter.b_shape)
        return ("FoRA-delta", adapter.a_shape, adapter.b_shape, adapter.scale)
    if isinstance(adapter, LoRA):  # LoRA and DoRA: their ΔW (DoRA's linears: W' itself)
        if not adapter.factored:
            return ("low-rank", *_low_rank_shapes(adapter))
        if not _whole_delta(adapter):
            return None
        kind = "DoRA-linear" if isinstance(adapter, DoRA) else "low-rank"
        return (kind, *_low_rank_shapes(adapter))
    if isinstance(adapter, FLoRA):
        # a linear's ΔW or down factor, a grouped conv's ΔW (ungrouped convs build per layer)
        if adapter.spec.kind == "linear":
            if _whole_delta(adapter):
                return ("FLoRA-linear-delta", *_flora_shapes(adapter))
            return ("FLoRA-linear", *_flora_shapes(adapter))
        if not adapter.factored:
            return ("FLoRA", *_flora_shapes(adapter))
    return None


def _whole_delta(adapter: LowRankAdapter) -> bool:
    """Whether a low-rank adapter on a linear takes its whole weight change from this plan's
    batched build (:meth:`~mm_spectral.adapters.base.LowRankAdapter.batches_linear_delta`);
    recorded on the adapter, which its forward reads (its stash then holds that change)."""
    whole = adapter.batches_linear_delta()
    adapter.__dict__[WHOLE_DELTA] = whole
    return whole


def _groups(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """Unmerged FourierFT / FoRA / FLoRA adapters (FLoRA's on linears and grouped convs),
    low-rank adapters on grouped convs and on linears that take their whole weight change
    (:func:`_whole_delta`) of ``model`` grouped by shape (groups of ≥ 2); none when FSDP
    units sit inside ``model`` (their layers build their own).

    The layers come from :func:`~mm_spectral.adapters.layer_walk.adapted_layer_walk`,
    which keeps its walk of the module tree between plans.
    """
    layers = adapted_layer_walk(model)
    if layers is None:
        return []
    found: list[tuple[tuple, nn.Module]] = []
    for layer, adapter in layers:
        if layer.merged:
            continue
        key = _group_key(adapter)
        if key is not None and key[0] == "DoRA-linear":
            weight = layer._parameters["weight"]
            if weight.requires_grad:  # its batched build takes W0 as frozen
                adapter.__dict__[WHOLE_DELTA] = False
                continue
            adapter.__dict__[_BASE] = weight
        if key is not None:
            found.append((key, adapter))
    # The stack visits layers last-first: back in module order, a shared layer at its first
    # place (as model.modules() lists it).
    groups: dict[tuple, list[nn.Module]] = defaultdict(list)
    seen: set[int] = set()
    for key, adapter in reversed(found):
        if id(adapter) not in seen:
            seen.add(id(adapter))
            groups[key].append(adapter)
    return [(key[0], members) for key, members in groups.items() if len(members) > 1]


def has_batched_spectra(model: nn.Module) -> bool:
    """Whether ``model`` has a group of same-shape layers a batched build serves, now or
    once its linears' tokens are known (:func:`_linears_may_batch`)."""
    return bool(_groups(model)) or _linears_may_batch(model)


def _linears_may_batch(model: nn.Module) -> bool:
    """Whether two same-shape low-rank linears of ``model`` would take their whole weight
    change from a batched build with few tokens (which the plan learns at their first
    forward: before it, a model of such linears alone has no group yet)."""
    seen: set[tuple] = set()
    for module in model.modules():
        if role(type(module)) == SHARDED:
            return False  # FSDP units build their own
        if role(type(module)) != ADAPTED or module.merged:
            continue
        adapter = module._modules["adapter"]
        if not isinstance(adapter, LowRankAdapter) or adapter.spec.kind != "linear":
            continue
        out_features, in_features = adapter.spec.weight_shape
        one_token = batched_delta_linear(1, out_features, in_features, adapter.rank)
        key = (type(adapter), adapter.spec.weight_shape, adapter.rank)
        if one_token and adapter.factored:
            if key in seen:
                return True
            seen.add(key)
    return False


def _build(kind: str, members: Sequence[nn.Module], cache: SlotCache | None) -> None:
    """Build ``members``' spectra batched and stash each in its adapter."""
    if kind == "FourierFT":
        results: list[Any] = batched_fourierft_deltas(members, cache)
    elif kind == "FLoRA":
        results = batched_flora_deltas(members)
    elif kind == "FLoRA-linear":
        results = batched_flora_downs(members)
    elif kind == "FLoRA-linear-delta":
        results = batched_flora_linear_deltas(members)
    elif kind == "low-rank":
        results = batched_low_rank_deltas(members)
    elif kind == "DoRA-linear":
        results = batched_dora_weights(members)
    elif kind == "FoRA-delta":
        results = batched_fora_deltas(members, cache)
    else:
        results = batched_fora_factors(members, cache)
    stash_all(members, results)


def build_batched_spectra(model: nn.Module, cache: SlotCache | None = None) -> int:
    """Build every spectral ΔW (FourierFT), factor pair (FoRA) and FLoRA Tucker product of
    ``model`` now, in one batched call per shape, and stash each in its adapter; returns
    the layers built.
    ``cache`` keeps each group's scatter slots between calls."""
    built = 0
    for kind, members in _groups(model):
        _build(kind, members, cache)
        built += len(members)
    return built


DEFAULT_CHUNK_BYTES = 256 * 2**20


def _layer_bytes(adapter: nn.Module) -> int:
    """Bytes of what a batched build makes for one layer (float32 ΔW, down factor or factor
    pair)."""
    delta = adapter.__dict__.get(WHOLE_DELTA, False)
    if isinstance(adapter, FLoRA) and adapter.spec.kind == "linear" and not delta:
        return 4 * adapter.core.shape[0] * adapter.spec.weight_shape[1]
    if isinstance(adapter, FoRA) and adapter.factored and not delta:
        return 4 * (math.prod(adapter.a_shape) + math.prod(adapter.b_shape))
    return 4 * math.prod(adapter.spec.matrix_shape)  # a ΔW


def chunks(members: Sequence[nn.Module], max_bytes: int) -> list[list[nn.Module]]:
    """``members`` (one shape group, in module order) in consecutive chunks whose builds
    each make at most ``max_bytes`` (one layer if it alone is more), smallest at the end.

    A chunk's storage lives from its first layer's forward to its last one's. Near the end
    of the forward, where the saved activations peak, only small chunks may be alive, so
    sizes double from the last layers back (from an eighth of the cap, at least 2 layers, up
    to the cap): whatever a chunk holds is then less than what the layers after it add.
    """
    layer_bytes = _layer_bytes(members[0])
    cap = max(1, max_bytes // layer_bytes)
    sizes: list[int] = []
    left, size = len(members), max(2, max_bytes // 8 // layer_bytes)
    while left:
        take = min(size, cap, left)
        if sizes and 2 * take < sizes[-1] and sizes[-1] + take <= cap:
            sizes[-1] += take  # a small remainder at the start joins its neighbour
        else:
            sizes.append(take)
        left -= take
        size *= 2
    out, start = [], 0
    for size in reversed(sizes):
        out.append(list(members[start : start + size]))
        start += size
    return out


def plan_batched_spectra(
    model: nn.Module, cache: SlotCache | None = None, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> int:
    """Hand each same-shape group's spectral adapters, in chunks of at most
    ``max_chunk_bytes``, one batched build that the first of them to run makes for all
    (:func:`~mm_spectral.adapters.stash.stash_builder`); returns the layers planned.

    Built on demand rather than all before the forward: a chunk's storage is freed once its
    last layer has run, so the forward never holds every layer's ΔW at once (for ViT-L's
    FourierFT that would be 1.2 GB held to the end of the forward, the memory peak).
    """
    planned = 0
    for kind, members in _groups(model):
        for chunk in chunks(members, max_chunk_bytes):
            if len(chunk) < 2:
                continue  # a layer alone builds itself
            if kind == "DoRA-linear":  # the build then reads the chunk's W0 as one view
                pack_back_to_back([adapter.__dict__[_BASE] for adapter in chunk])
            build = functools.partial(_build, kind, chunk, cache)
            for adapter in chunk:
                stash_builder(adapter, build)
            planned += len(chunk)
    return planned


def enable_batched_spectra(
    model: nn.Module, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> RemovableHandle:
    """Before each ``model(...)`` call, plan batched builds of its spectral adapters
    (:func:`plan_batched_spectra`).

    Each adapter of a group then takes its prebuilt ΔW / factors in its forward
    instead of building them itself (merged layers and adapters whose parameters changed
    since ignore them). Returns the hook's handle; ``handle.remove()`` turns it off.
    """
    cache = SlotCache()

    def pre_hook(module: nn.Module, args: Any) -> None:
        plan_batched_spectra(module, cache, max_chunk_bytes)

    return model.register_forward_pre_hook(pre_hook)
