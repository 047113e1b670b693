"""The adapter contract: an adapted layer keeps its own parameters, gains an ``adapter``
child, and can fold the adapter's ΔW into its weight (merge) and take it out (unmerge).

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

from .functional import delta_linear, low_rank_linear

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

    @classmethod
    def of(cls, name: str, layer: nn.Module) -> LayerSpec:
        if isinstance(layer, nn.Linear):
            return cls(name, "linear", tuple(layer.weight.shape))
        if isinstance(layer, nn.Conv2d):
            return cls(name, "conv2d", tuple(layer.weight.shape), layer.groups)
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


def layer_op(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Run the layer's own operation (linear or conv with its stride/padding/…) with ``weight``."""
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, weight, bias)
    return F.linear(x, weight, bias)


class BaseAdapter(nn.Module):
    """Parameters of one layer's weight change ΔW.

    Subclasses set ``method`` (the config ``type``), register with :func:`register_adapter`
    and implement :meth:`delta` (ΔW in float32 or the parameters' dtype, any shape that
    reshapes to the weight). The default forward is the dense path, one op with
    ``W0 + ΔW``; low-rank methods override it with a factored path.
    """

    method: ClassVar[str] = ""
    # Buffers fixed at construction (spectral entries drawn from a seed): a state dict
    # loads only if they equal the model's, since the coefficients mean nothing elsewhere.
    fixed_buffers: ClassVar[tuple[str, ...]] = ()

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

    def forward(self, x: Tensor, layer: nn.Module) -> Tensor:
        """Output of ``layer`` with weight ``W0 + ΔW``: one op, ΔW built once."""
        delta = self.delta().reshape(self.spec.weight_shape)
        if self.spec.kind == "linear":
            return delta_linear(x, layer.weight, layer.bias, delta)
        return layer_op(layer, x, layer.weight + delta.to(layer.weight.dtype), layer.bias)

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

    def low_rank_factors(self) -> tuple[Tensor, Tensor, float]:
        raise NotImplementedError

    def delta(self) -> Tensor:
        down, up, scale = self.low_rank_factors()
        delta = torch.mm(up, down)
        return delta if scale == 1.0 else delta.mul_(scale)

    def forward(self, x: Tensor, layer: nn.Module) -> Tensor:
        if not self.spec.factorable:
            return super().forward(x, layer)
        down, up, scale = self.low_rank_factors()
        if self.spec.kind == "linear":
            return low_rank_linear(x, layer.weight, layer.bias, down, up, scale)
        base = layer_op(layer, x, layer.weight, layer.bias)
        rank = down.shape[0]
        hidden = layer_op(layer, x, down.reshape(rank, *self.spec.weight_shape[1:]), None)
        up = up if scale == 1.0 else up * scale
        return base + F.conv2d(hidden, up.reshape(*up.shape, 1, 1))


class AdaptedLayerMixin:
    """Forward, merge and unmerge for a Linear/Conv2d that carries an ``adapter`` child."""

    adapter: BaseAdapter
    merged: bool

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        if self.merged:
            return super().forward(x)  # type: ignore[misc]
        # Straight to forward: nn.Module.__call__'s hook machinery costs more host time
        # than a small adapter's arithmetic, and adapters carry no hooks.
        return self.adapter.forward(x, self)

    def delta_weight(self) -> Tensor:
        """ΔW of this layer in its weight's shape and dtype, scale included."""
        return self.adapter.delta_weight(self.weight.dtype)  # type: ignore[attr-defined]

    @torch.no_grad()
    def finite_delta(self) -> Tensor:
        """:meth:`delta_weight`, detached; raises naming the layer if it is not finite."""
        delta = self.delta_weight()
        if not torch.isfinite(delta).all():
            raise ValueError(f"ΔW of layer '{self.adapter.spec.name}' is not finite; not merged")
        return delta

    @torch.no_grad()
    def merge(self, delta: Tensor | None = None) -> None:
        """Add ΔW (or the given, already checked ``delta``) to the weight; idempotent."""
        if self.merged:
            return
        self.weight.add_(self.finite_delta() if delta is None else delta)  # type: ignore[attr-defined]
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the current ΔW from the weight again (idempotent)."""
        if not self.merged:
            return
        self.weight.sub_(self.delta_weight())  # type: ignore[attr-defined]
        self.merged = False

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
