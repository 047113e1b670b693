"""An FSDP auto-wrap policy for adapted models: frozen and trainable parameters in
separate units.

FSDP flattens each unit's parameters into one tensor. A unit holding frozen base weights
and trainable adapters together must use ``use_orig_params=True`` and still gets gradient
memory for its frozen part (FSDP's own warning), which throws away what freezing saves on
a 6B backbone. This policy builds units bottom-up (FSDP's post-order) and never wraps a
module whose not-yet-wrapped parameters mix ``requires_grad``:

- every adapter is a unit of its own (its parameters all train), so the adapted layer
  around it keeps only frozen weights;
- a module whose class name is in ``module_classes`` (blocks, e.g. ``'InternBlock'``) is a
  unit if its remaining parameters are uniform: one unit per frozen block;
- a layer holding its remaining parameters itself (an adapted Linear / Conv2d once its
  adapter is a unit, a plain Linear) is a unit once they are uniform and reach
  ``min_num_params``;
- everything else (mixed leftovers such as a trainable norm beside small frozen weights)
  moves up to the parent, at the end into FSDP's root unit with the necks and heads.

Containers are wrapped only when named in ``module_classes``, and modules without a
``forward`` (``nn.ParameterList``, e.g. FLoRA's factors) never: FSDP gathers a unit's
parameters when the unit's ``forward`` runs, and backbones often run a container's
children themselves (ConvNeXt stages, ``nn.ModuleList``), which would leave its parameters
sharded during their use. Name block classes whose forward the model calls.

With ``use_orig_params=True`` (MMEngine's default) the root may mix; see
:func:`mm_spectral.distributed.unit_summary` for what ended up where.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..adapters.base import BaseAdapter
from .fsdp import own_parameters


def frozen_apart_wrap_policy(
    module: nn.Module,
    recurse: bool,
    nonwrapped_numel: int,
    min_num_params: int = 1_000_000,
    module_classes: Sequence[str] = (),
) -> bool:
    """FSDP ``auto_wrap_policy`` callable (``partial`` it, or name it in an MMEngine
    ``model_wrapper`` config). Returns whether to descend (``recurse=True``: always) or
    to wrap ``module`` as a unit (``recurse=False``, its children already decided)."""
    if recurse:
        return True
    named = list(own_parameters(module))
    if not named or len({p.requires_grad for _, p in named}) > 1:
        return False
    if isinstance(module, BaseAdapter) or type(module).__name__ in module_classes:
        return True
    holds_them = all("." not in name for name, _ in named)  # no container
    runs = type(module).forward is not nn.Module.forward  # its parent calls it
    return holds_them and runs and sum(p.numel() for _, p in named) >= min_num_params
