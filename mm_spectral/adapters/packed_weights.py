"""Frozen weights of a batched build's layers laid back to back in one buffer, so that the
build reads them as one (L, out, in) view instead of stacking a copy every step.

DoRA's batched linears (:mod:`mm_spectral.adapters.batched_dora`) need every layer's W0
in one tensor, forward and backward: ``torch.stack`` wrote a float32 copy of each chunk's
weights twice per step (for ViT-L's 96 linears, about 1.2 GB written and read back each
time). The plan moves a chunk's frozen weights into one buffer once, through ``.data =`` (each
parameter object stays where it is, and keeps its name, hooks and value), after which
:func:`stacked` sees them back to back and returns a view. Weights moved elsewhere later
(``model.to()``, ``cast_frozen``) are simply stacked again, and packed anew at the next
plan. Weights a CUDA graph has captured are pinned (:func:`pin_in_place`) and never move:
its replays read them at the addresses of the capture.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

_PACKED = "_mm_spectral_packed_storage"  # on a packed weight: its buffer's storage pointer
_PINNED = "_mm_spectral_pinned"  # on a weight that must keep its address (a graph reads it)


def back_to_back(tensors: Sequence[Tensor]) -> bool:
    """Whether ``tensors`` (≥ 1, contiguous, of one shape, dtype and device) follow each
    other in one storage, so that they are one (L, ...) tensor's rows."""
    first = tensors[0]
    if not first.is_contiguous():
        return False
    size, storage = first.numel(), first.untyped_storage().data_ptr()
    for i, t in enumerate(tensors[1:], start=1):
        if (
            t.shape != first.shape
            or t.dtype != first.dtype
            or t.device != first.device
            or not t.is_contiguous()
            or t.untyped_storage().data_ptr() != storage
            or t.storage_offset() != first.storage_offset() + i * size
        ):
            return False
    return True


def stacked(tensors: Sequence[Tensor]) -> Tensor:
    """``torch.stack(tensors)``, as a view where they lie back to back (no copy)."""
    if back_to_back(tensors):
        first = tensors[0]
        return first.as_strided((len(tensors), *first.shape), (first.numel(), *first.stride()))
    return torch.stack(tuple(tensors))


def _movable(weight: Tensor) -> bool:
    """A frozen, plain, contiguous tensor alone on its storage, or on a buffer of ours: a
    weight whose storage another tensor holds too (tied to it, or a view of something
    bigger) stays put, or the two would part."""
    if weight.requires_grad or type(weight.data) is not torch.Tensor:
        return False
    if weight.__dict__.get(_PINNED):
        return False
    if not weight.is_contiguous() or weight.numel() == 0:
        return False
    storage = weight.untyped_storage()
    if weight.__dict__.get(_PACKED) == storage.data_ptr():
        return True
    if storage.nbytes() != weight.numel() * weight.element_size():
        return False
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    # the weight itself and ``storage`` here; more means another tensor shares it
    return use_count is None or use_count(storage._cdata) <= 2


def pin_in_place(tensors: Iterable[Tensor]) -> None:
    """Keep ``tensors`` where they are from now on: :func:`pack_back_to_back` leaves them
    be. For the parameters of a module a CUDA graph captured, whose replays read them at
    their present address; moving them would free that memory under the graph."""
    for tensor in tensors:
        tensor.__dict__[_PINNED] = True


def _tracing_or_capturing() -> bool:
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return torch.compiler.is_compiling() or capturing


def pack_back_to_back(weights: Sequence[Tensor]) -> bool:
    """Move ``weights`` (frozen, one shape, dtype and device) into one new buffer in this
    order, unless they lie back to back already or one cannot move (see module docstring);
    returns whether they moved. Values are unchanged; the old storages are freed where
    nothing else holds them."""
    if len(weights) < 2 or back_to_back(weights) or _tracing_or_capturing():
        return False
    first = weights[0]
    same = all(w.shape == first.shape and w.dtype == first.dtype and w.device == first.device
               for w in weights)  # fmt: skip
    if not same or not all(_movable(w) for w in weights):
        return False
    buffer = torch.empty((len(weights), *first.shape), dtype=first.dtype, device=first.device)
    with torch.no_grad():
        for row, weight in zip(buffer.unbind(0), weights):
            row.copy_(weight)
    pointer = buffer.untyped_storage().data_ptr()
    for row, weight in zip(buffer.unbind(0), weights):
        weight.data = row
        weight.__dict__[_PACKED] = pointer
    return True
