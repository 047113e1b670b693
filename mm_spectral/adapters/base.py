"""The adapter contract: an adapted layer keeps its own parameters, gains an ``adapter``
child, and can fold the adapter into its weight and bias (merge) and take it out (unmerge).

Pure PyTorch: nothing here imports OpenMMLab.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.dispatch import batched_delta_linear
from ..kernels.native import native_ops
from .bias_cast import compute_bias
from .functional import delta_linear, low_rank_linear, outside_autocast, planned_delta_linear
from .stash import TOKENS, WHOLE_DELTA, take_stash, take_stash_eagerly

ADAPTABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)

ADAPTERS: dict[str, type[BaseAdapter]] = {}
"""Every adapter method by its config ``type`` name, filled by :func:`register_adapter`."""

AdapterClass = TypeVar("AdapterClass", bound="type[BaseAdapter]")


def register_adapter(cls: AdapterClass) -> AdapterClass:
    """Class decorator: make ``cls`` buildable as ``dict(type=cls.method, ...)``."""
    if not cls.method:
        raise TypeError(f"{cls.__name__} needs a non-empty `method` name to be registered")
    known = ADAPTERS.get(cls.method)
    if known is not None and known is not cls:
        raise ValueError(f"adapter type {cls.method!r} is already registered by {known.__name__}")
    ADAPTERS[cls.method] = cls
    return cls


@dataclass(frozen=True)
class LayerSpec:
    """What an adapter needs to know about the layer it adapts (no reference to it)."""

    name: str
    kind: str  # 'linear' or 'conv2d'
    weight_shape: tuple[int, ...]
    groups: int = 1
    bias: bool = True  # whether the layer has a bias (BitFit needs one)

    @classmethod
    def of(cls, name: str, layer: nn.Module) -> LayerSpec:
        bias = getattr(layer, "bias", None) is not None
        if isinstance(layer, nn.Linear):
            return cls(name, "linear", tuple(layer.weight.shape), bias=bias)
        if isinstance(layer, nn.Conv2d):
            return cls(name, "conv2d", tuple(layer.weight.shape), layer.groups, bias)
        raise TypeError(
            f"layer '{name}' is a {type(layer).__name__}; adapters apply to nn.Linear and nn.Conv2d"
        )

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """The weight seen as a matrix: (out, in/groups · kh · kw) for a conv."""
        return self.weight_shape[0], math.prod(self.weight_shape[1:])

    @property
    def factorable(self) -> bool:
        """Whether a low-rank ΔW can run as two thin ops instead of one dense one."""
        return self.groups == 1

    @property
    def type_label(self) -> str:
        """A short human-readable description used in reports (e.g. 'Conv2d 7x7 depthwise')."""
        if self.kind == "linear":
            return "Linear"
        out, in_per_group, kh, kw = self.weight_shape
        label = f"Conv2d {kh}x{kw}"
        if self.groups > 1:
            label += " depthwise" if in_per_group == 1 else " grouped"
        return label


def check_positive(spec: LayerSpec, method: str, **values: int | float) -> None:
    """Raise a ValueError naming the layer when a hyper-parameter is not positive."""
    for key, value in values.items():
        if not value > 0:
            raise ValueError(f"{method} on layer '{spec.name}': {key} must be > 0, got {value!r}")


@dataclass
class Fold:
    """What merging one layer writes: its new weight and bias (None: left as they are), and
    what unmerging needs besides the adapter (``memo``, e.g. DoRA's column norms)."""

    weight: Tensor | None
    bias: Tensor | None = None
    memo: Any = None


def layer_op(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Run the layer's own operation (linear or conv with its stride/padding/…) with ``weight``."""
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, weight, bias)
    return F.linear(x, weight, bias)


def native_conv_ops(layer: nn.Conv2d) -> Any:
    """The C++ module (:mod:`mm_spectral.kernels.native`) where ``layer``'s conv can run in
    it: an eager step, and zero padding given as numbers; else None."""
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        return None
    return None if torch.compiler.is_compiling() else native_ops()


def conv_options(layer: nn.Conv2d) -> tuple[Any, Any, Any, int]:
    """(stride, padding, dilation, groups) of ``layer``, as the C++ conv nodes take them."""
    return layer.stride, layer.padding, layer.dilation, layer.groups


def delta_conv(layer: nn.Conv2d, x: Tensor, bias: Tensor | None, delta: Tensor) -> Tensor:
    """The conv ``layer`` run with weight W0 + ΔW: eagerly one C++ node
    (:func:`native_conv_ops`), else its own op on ``W0 + ΔW`` (ΔW cast to W0's dtype first)."""
    native = native_conv_ops(layer)
    if native is not None:
        bias = compute_bias(bias, x)
        return native.delta_conv2d(x, layer.weight, bias, delta, *conv_options(layer))
    return layer_op(layer, x, layer.weight + delta.to(layer.weight.dtype), bias)


class BaseAdapter(nn.Module):
    """Parameters of one layer's weight change ΔW (and, for BitFit, bias change Δb).

    Subclasses set ``method`` (the config ``type``), register with :func:`register_adapter`
    and implement :meth:`delta` (ΔW in float32 or the parameters' dtype, any shape that
    reshapes to the weight). The default forward is the dense path, one op with
    ``W0 + ΔW``; low-rank methods override it with a factored path.

    Merging goes through :meth:`merged_weight` / :meth:`unmerged_weight` and
    :meth:`delta_bias`: W0 + ΔW, W' − ΔW and None here; DoRA (not ``additive``: it rescales
    W0 + ΔW) and BitFit (Δb only) override them. Everything else (merge, unmerge,
    merged state dicts, finite checks) is written once, on top of these.
    """

    method: ClassVar[str] = ""
    # Buffers fixed at construction (spectral entries drawn from a seed): a state dict
    # loads only if they equal the model's, since the coefficients mean nothing elsewhere.
    fixed_buffers: ClassVar[tuple[str, ...]] = ()
    # Whether merging adds a ΔW that does not depend on W0 (all but DoRA).
    additive: ClassVar[bool] = True
    # Tensors derived from the base weight (DoRA's magnitude ‖W0‖_c): re-derived by
    # :meth:`reset_from_base` when the base weight changes after injection.
    base_dependent: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: LayerSpec) -> None:
        super().__init__()
        self.spec = spec

    def delta(self) -> Tensor:
        raise NotImplementedError

    def delta_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """ΔW with the base weight's shape, scale included, in ``dtype`` (the host layer
        passes its weight's; None keeps the adapter's compute dtype)."""
        delta = self.delta().reshape(self.spec.weight_shape)
        return delta if dtype is None else delta.to(dtype)

    def delta_bias(self) -> Tensor | None:
        """Δb added to the layer's bias (None: the method leaves the bias alone)."""
        return None

    def merged_weight(self, weight: Tensor) -> tuple[Tensor, Any]:
        """(W', memo): the weight merging writes over base weight ``weight`` (W0 + ΔW, in
        W0's dtype), and what :meth:`unmerged_weight` needs besides to undo it."""
        return weight + self.delta_weight(weight.dtype), None

    def unmerged_weight(self, weight: Tensor, memo: Any) -> Tensor:
        """W0 back from the merged weight W' and :meth:`merged_weight`'s memo."""
        return weight - self.delta_weight(weight.dtype)

    def reset_from_base(self, weight: Tensor) -> None:
        """Re-derive the tensors that depend on the base weight (none here; DoRA's
        magnitude): called at injection and whenever the base weight is loaded later."""

    def size_warning(self) -> str | None:
        """What exceeds the layer's shape (a rank above a mode, more parameters than the
        weight), or None; :func:`mm_spectral.inject` warns once with every such layer."""
        return None

    def forward(self, x: Tensor, layer: nn.Module) -> Tensor:
        """Output of ``layer`` with weight ``W0 + ΔW`` (bias b + Δb): one op, ΔW built once."""
        delta, shape = self.delta(), self.spec.weight_shape
        if delta.shape != shape:  # a linear's ΔW has it already: no view node per step
            delta = delta.reshape(shape)
        bias, delta_bias = layer.bias, self.delta_bias()
        if delta_bias is not None:
            bias = bias + delta_bias
        if self.spec.kind == "linear":
            return delta_linear(x, layer.weight, bias, delta)
        return delta_conv(layer, x, bias, delta)

    def refresh_buffers(self) -> None:
        """Recompute derived (non-persistent) buffers after persistent ones changed."""

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh_buffers()

    def extra_repr(self) -> str:
        return f"layer={self.spec.name!r}, weight_shape={self.spec.weight_shape}"


class LowRankAdapter(BaseAdapter):
    """An adapter whose ΔW (as a matrix) is ``up @ down`` for thin factors.

    Subclasses implement :meth:`low_rank_factors` → (down (r, fan_in), up (out, r), scale).
    On linear and ungrouped conv layers the forward runs ``x → down → up`` and never
    builds ΔW: a linear through one fused autograd function, a conv's ``down`` as a conv
    with the base layer's stride, padding and dilation and ``up`` as a 1×1 conv.
    """

    rank: int  # the inner dimension r of up @ down (FLoRA: its core's output-mode size)

    def low_rank_factors(self) -> tuple[Tensor, Tensor, float]:
        raise NotImplementedError

    @property
    def factored(self) -> bool:
        """Whether the forward runs ``x → down → up`` (else the dense path with ΔW)."""
        return self.spec.factorable

    def batches_linear_delta(self) -> bool:
        """Whether, on a linear, a batched build (:func:`mm_spectral.enable_batched_spectra`)
        should make this adapter's whole weight change ΔW (DoRA's: its whole weight W') and
        the layer step as W0 + ΔW (with W'), by the tokens of the layer's last forward
        (:func:`mm_spectral.kernels.dispatch.batched_delta_linear`)."""
        if self.spec.kind != "linear":
            return False
        out_features, in_features = self.spec.weight_shape
        tokens = self.__dict__.get(TOKENS)
        return batched_delta_linear(tokens, out_features, in_features, self.rank)

    def planned_delta(self, x: Tensor) -> Tensor | None:
        """On a linear: the whole weight change a batched build made for this forward,
        where the plan said so (:data:`~mm_spectral.adapters.stash.WHOLE_DELTA`); records
        the tokens for the next plan."""
        if torch.compiler.is_compiling():  # a compiled model plans nothing (no stash)
            return None
        state = self.__dict__
        state[TOKENS] = x.numel() // x.shape[-1] if x.dim() else 0
        return take_stash_eagerly(self) if state.get(WHOLE_DELTA) else None

    def delta(self) -> Tensor:
        """s · up down, float32 under autocast too: a weight-sized product of thin factors,
        which in half precision would cost two casts forward and two backward per layer
        (and round ΔW before it joins W0). On a layer it cannot run factored (a grouped
        conv), the ΔW a batched build made for it and its batch-mates, where there is one."""
        if not self.factored:
            prebuilt = take_stash(self)  # from mm_spectral.enable_batched_spectra
            if prebuilt is not None:
                return prebuilt
        params = self._parameters  # every low-rank adapter holds a parameter of its own
        device_type = next(iter(params.values())).device.type if params else "cpu"
        if torch.is_autocast_enabled(device_type):
            return outside_autocast(device_type, self._delta)
        return self._delta()

    def _delta(self) -> Tensor:
        down, up, scale = self.low_rank_factors()
        delta = torch.mm(up, down)
        return delta if scale == 1.0 else delta.mul_(scale)

    def forward(self, x: Tensor, layer: nn.Module) -> Tensor:
        if not self.factored:
            return super().forward(x, layer)
        if self.spec.kind == "linear":
            delta = self.planned_delta(x)  # the whole ΔW, from a batched build
            if delta is not None:
                return planned_delta_linear(x, layer, delta)
        return self.factored_forward(x, layer, layer.bias)

    def factored_forward(self, x: Tensor, layer: nn.Module, bias: Tensor | None) -> Tensor:
        """x W0ᵀ + bias + scale · (x downᵀ) upᵀ (for a conv: its op with W0, then down, up)."""
        down, up, scale = self.low_rank_factors()
        if self.spec.kind == "linear":
            return low_rank_linear(x, layer.weight, bias, down, up, scale)
        base = layer_op(layer, x, layer.weight, compute_bias(bias, x))
        rank = down.shape[0]
        hidden = layer_op(layer, x, down.reshape(rank, *self.spec.weight_shape[1:]), None)
        up = up if scale == 1.0 else up * scale
        return base + F.conv2d(hidden, up.reshape(*up.shape, 1, 1))


class AdaptedLayerMixin:
    """Forward, merge and unmerge for a Linear/Conv2d that carries an ``adapter`` child."""

    adapter: BaseAdapter
    merged: bool
    merge_memo: Any = None  # what unmerge needs besides the adapter (DoRA's column norms)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        if self.merged:
            return super().forward(x)  # type: ignore[misc]
        # Straight to forward: nn.Module.__call__'s hook machinery costs more host time
        # than a small adapter's arithmetic, and adapters carry no hooks. (_modules: what
        # self.adapter reads, without nn.Module.__getattr__'s lookups.)
        return self._modules["adapter"].forward(x, self)  # type: ignore[attr-defined]

    def base_weight(self) -> Tensor:
        """W0, merged or not."""
        weight = self.weight  # type: ignore[attr-defined]
        return self.adapter.unmerged_weight(weight, self.merge_memo) if self.merged else weight

    def delta_weight(self) -> Tensor:
        """ΔW of this layer, what merging adds to its weight, in the weight's shape and
        dtype, scale included (for DoRA the rescaled W' − W0)."""
        adapter = self.adapter
        if adapter.additive:
            return adapter.delta_weight(self.weight.dtype)  # type: ignore[attr-defined]
        base = self.base_weight()
        return adapter.merged_weight(base)[0] - base

    @torch.no_grad()
    def fold(self) -> Fold:
        """What :meth:`merge` writes (the layer must not be merged); raises naming the
        layer if it is not finite."""
        name = self.adapter.spec.name
        if self.merged:
            raise RuntimeError(f"layer '{name}' is merged already")
        weight, memo = self.adapter.merged_weight(self.weight)  # type: ignore[attr-defined]
        delta_bias = self.adapter.delta_bias()
        bias = None if delta_bias is None else self.bias + delta_bias.to(self.bias.dtype)  # type: ignore[attr-defined]
        fold = Fold(None if weight is self.weight else weight, bias, memo)  # type: ignore[attr-defined]
        if not all(torch.isfinite(t).all() for t in (fold.weight, fold.bias) if t is not None):
            raise ValueError(f"ΔW of layer '{name}' is not finite; not merged")
        return fold

    @torch.no_grad()
    def merge(self, fold: Fold | None = None) -> None:
        """Write the adapted weight and bias (or the given, already checked ``fold``)
        into the layer; idempotent."""
        if self.merged:
            return
        fold = self.fold() if fold is None else fold
        if fold.weight is not None:
            self.weight.copy_(fold.weight)  # type: ignore[attr-defined]
        if fold.bias is not None:
            self.bias.copy_(fold.bias)  # type: ignore[attr-defined]
        self.merge_memo = fold.memo
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W0 (and b0) from the merged weight and the adapter (idempotent)."""
        if not self.merged:
            return
        weight = self.weight  # type: ignore[attr-defined]
        restored = self.adapter.unmerged_weight(weight, self.merge_memo)
        if restored is not weight:
            weight.copy_(restored)
        delta_bias = self.adapter.delta_bias()
        if delta_bias is not None:
            self.bias.sub_(delta_bias.to(self.bias.dtype))  # type: ignore[attr-defined]
        self.merge_memo = None
        self.merged = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # A base weight loaded after injection (OpenMMLab loads pretrained weights in
        # init_weights): what the adapter derived from the old weight follows it. The
        # adapter's own tensors load after this (children load after their parent).
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]
        if f"{prefix}weight" in state_dict and not self.merged:
            self.adapter.reset_from_base(self.weight)  # type: ignore[attr-defined]

    def __reduce_ex__(self, protocol: int):
        # Adapted<X> classes are made at run time, so pickle cannot find them by name:
        # rebuild from the plain class X instead (torch.save(model), deepcopy, spawn).
        return (_new_adapted, (type(self).__mro__[2],), self.__dict__)


@functools.cache
def adapted_class(base_cls: type[nn.Module]) -> type[nn.Module]:
    """The subclass of ``base_cls`` (e.g. nn.Linear) that runs an adapter; one per class."""
    return type(f"Adapted{base_cls.__name__}", (AdaptedLayerMixin, base_cls), {})


def _new_adapted(base_cls: type[nn.Module]) -> nn.Module:
    cls = adapted_class(base_cls)
    return cls.__new__(cls)


def is_adapted(module: nn.Module) -> bool:
    """Whether ``module`` is a layer that carries an adapter (made by ``inject``)."""
    return isinstance(module, AdaptedLayerMixin)
