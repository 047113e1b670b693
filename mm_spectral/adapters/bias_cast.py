"""A frozen bias in autocast's dtype, cast once and kept while the bias is unchanged.

Under autocast every adapted layer's op casts the layer's bias to the compute dtype each
step: one more dispatched op per layer, and on a GPU the host's cost per op (tens of µs)
is what an eager step of a ViT or of ConvNeXt's late stages is bound by. A frozen bias
does not change between steps, so its cast is kept, keyed on the bias tensor itself (weakly:
the copy goes when the bias goes), its version counter (any in-place change, e.g.
``load_state_dict``, bumps it), its storage address and the dtype.

Not kept: a bias that trains (BitFit, ``trainable`` patterns), in inference mode (its
tensors cannot enter a later training step), while compiling or capturing a CUDA graph
(the cast is then part of the graph, reading the live bias), and for a bias that does not
own its storage exactly (FSDP's views into a flat parameter, which it frees and refills).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

# id(bias) -> (weak reference to the bias, (dtype, version, data_ptr), the cast copy); the
# entry goes when the bias does. A plain dict by id: this lookup runs per adapted layer
# and step, and torch.utils.weak.WeakIdKeyDictionary builds a reference object per lookup.
_CASTS: dict[int, tuple[weakref.ref, tuple, Tensor]] = {}


def compute_bias(bias: Tensor | None, x: Tensor) -> Tensor | None:
    """``bias`` in the dtype that ``x``'s op computes in under autocast: a kept copy for a
    frozen bias (see the module docstring), else ``bias`` itself (the op casts it)."""
    if bias is None or bias.requires_grad:
        return bias
    if x.is_cuda:  # (x.device.type builds a device object: µs per call)
        if torch.cuda.is_current_stream_capturing():
            return bias  # the graph casts the live bias on every replay
        device_type = "cuda"
    else:
        device_type = x.device.type
    if not torch.is_autocast_enabled(device_type) or torch.compiler.is_compiling():
        return bias
    dtype = torch.get_autocast_dtype(device_type)
    if bias.dtype == dtype:
        return bias
    key = (dtype, bias._version, bias.data_ptr())
    kept = _CASTS.get(id(bias))
    if kept is not None and kept[1] == key and kept[0]() is bias:
        return kept[2]
    if not (bias.is_floating_point() and _may_keep(bias)):
        return bias
    cast = bias.detach().to(dtype)
    ident = id(bias)
    _CASTS[ident] = (weakref.ref(bias, lambda _, ident=ident: _forget(ident)), key, cast)
    return cast


def _forget(ident: int) -> None:
    """Drop the entry of a bias that was freed (its weak reference's callback)."""
    _CASTS.pop(ident, None)


def _may_keep(bias: Tensor) -> bool:
    """Whether a cast of ``bias`` may outlive this step (see the module docstring)."""
    if torch.is_inference_mode_enabled():
        return False
    return bias.untyped_storage().nbytes() == bias.numel() * bias.element_size()
