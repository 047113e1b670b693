"""A batched build's weights in the compute dtype, made once per chunk of linears instead of
once per layer.

Low-rank linears that take their whole weight change from a batched build step as
y = x (W0 + ΔW)ᵀ + b, and each layer formed W0 + ΔW (float32 sum, stored in the compute
dtype) itself: two ops per layer and step (DoRA's layers: one cast of W'). Once the plan has
packed a chunk's frozen W0 back to back (:mod:`~mm_spectral.adapters.packed_weights`), one
op over the chunk makes them all; each layer then takes its row as a :class:`Prebuilt`,
and its gradient gᵀx still goes to the build's float32 output (``route``), as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..kernels.dispatch import compute_dtype
from .functional import add_as, planned_prebuilt_linear
from .packed_weights import back_to_back, rows_view


class Prebuilt(NamedTuple):
    """One layer's weight in the compute dtype (``weight``, no gradient) and the batched
    build's output it was made from (``route``: ΔW, or DoRA's W'), which takes gᵀx."""

    weight: Tensor
    route: Tensor


def _compute_dtype(like: Tensor, default: torch.dtype) -> torch.dtype:
    device_type = like.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return default


def _unbound_from(rows: Sequence[Tensor]) -> Tensor | None:
    """The contiguous (L, ...) tensor that ``rows`` are, in order, the ``unbind`` of (as a
    batched build returns its results), else None; checked at both ends, O(1)."""
    whole = rows[0]._base
    if whole is None or whole.dim() != rows[0].dim() + 1 or whole.shape[0] != len(rows):
        return None
    if rows[-1]._base is not whole or not whole.is_contiguous():
        return None
    row_bytes = rows[0].numel() * rows[0].element_size()
    last = whole.data_ptr() + (len(rows) - 1) * row_bytes
    if rows[0].data_ptr() != whole.data_ptr() or rows[-1].data_ptr() != last:
        return None
    return whole


def prebuilt_sums(bases: Sequence[Tensor | None], deltas: list[Tensor]) -> list:
    """Each layer's W0 + ΔW in the compute dtype from one op, as :class:`Prebuilt` beside
    its ΔW; ``deltas`` unchanged where the bases are not frozen and back to back (a stack
    would copy them) or the ΔW are not rows of one tensor."""
    if any(b is None or b.requires_grad for b in bases):
        return deltas
    whole = _unbound_from(deltas)
    if whole is None or not back_to_back(bases) or bases[0].device != whole.device:
        return deltas
    dtype = _compute_dtype(whole, bases[0].dtype)
    with torch.no_grad():
        summed = add_as(rows_view(bases), whole, 1.0, dtype)
    return [Prebuilt(w, d) for w, d in zip(summed.unbind(0), deltas)]


def prebuilt_casts(weights: list[Tensor]) -> list:
    """DoRA's W' rows in the compute dtype from one cast, as :class:`Prebuilt` beside each
    W'; ``weights`` unchanged where no cast is needed or they are not rows of one tensor."""
    dtype = _compute_dtype(weights[0], weights[0].dtype)
    whole = None if dtype == weights[0].dtype else _unbound_from(weights)
    if whole is None:
        return weights
    with torch.no_grad():
        cast = whole.to(dtype)
    return [Prebuilt(w, r) for w, r in zip(cast.unbind(0), weights)]


def prebuilt_or_own(
    x: Tensor, layer: nn.Module, planned: Tensor | Prebuilt, own: Callable[..., Tensor]
) -> Tensor:
    """The layer's step with what its batched build handed it: the prebuilt weight where
    its dtype is the one x computes in, else ``own(x, layer, route)`` (the per-layer sum or
    cast, e.g. :func:`~mm_spectral.adapters.functional.planned_delta_linear`)."""
    if isinstance(planned, Prebuilt):
        if planned.weight.dtype == compute_dtype(x):
            return planned_prebuilt_linear(x, layer, planned.weight, planned.route)
        planned = planned.route
    return own(x, layer, planned)
