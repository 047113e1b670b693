"""AdamW that steps each parameter group as one flat tensor.

torch's fused AdamW does each element's arithmetic in one kernel set, but its Python side
visits every tensor at every step (state lookup, six lists) and its launches take every
tensor's pointers: about 3 ms of host time per step for the 192 tensors of LoRA r16 on
ViT-L (this project's CPU), where an eager step is bound by the host. Here a group's
trainable tensors are views of one flat buffer, and so are their Adam moments and step
counts (``optimizer.state[p]`` keeps its usual keys and shapes): a step gathers the
gradients with one ``cat`` and runs ``torch._fused_adamw_`` once, on the same per-element
arithmetic, so parameters and state equal ``torch.optim.AdamW(fused=True)``'s bit for bit.

A group's flat fast path needs every flattened tensor to have a gradient and all their
step counts equal; otherwise that step runs torch's own per-tensor fused path on the same
views (a parameter without a gradient is skipped, as torch does). Tensors that cannot be
views of a private buffer (FSDP's flat parameters, DTensors, non-contiguous or
storage-sharing tensors, frozen ones) stay as they are and step per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.adam import adam

__all__ = ["FlatAdamW"]

_set_versions = torch._C._autograd._unsafe_set_version_counter


def _flattenable(params: list[Tensor], previous: int | None = None) -> list[Tensor]:
    """The plain, trainable, contiguous real tensors of ``params`` on the first one's device
    with its dtype that are the whole of their storage, or live in the ``previous`` buffer
    (its storage's address). A tensor that shares its storage otherwise (FSDP's views into
    its flat parameters, another FlatAdamW's buffer) stays where it is."""
    plain = [
        p for p in params
        if type(p) is nn.Parameter and p.requires_grad and p.layout == torch.strided
        and p.is_floating_point() and p.is_contiguous()
    ]  # fmt: skip
    if not plain:
        return []
    like = plain[0]
    return [
        p for p in plain
        if p.device == like.device and p.dtype == like.dtype
        and (_owns_storage(p) or p.untyped_storage().data_ptr() == previous)
    ]  # fmt: skip


def _owns_storage(p: Tensor) -> bool:
    """Whether ``p`` is the whole of its storage."""
    return p.storage_offset() == 0 and p.untyped_storage().nbytes() == p.numel() * p.element_size()


def _same(previous: _FlatGroup | None, members: list[Tensor]) -> bool:
    """Whether ``previous`` still holds exactly ``members`` (so its buffer can stay)."""
    if previous is None or len(previous.members) != len(members) or not previous.intact():
        return False
    return all(a is b for a, b in zip(previous.members, members))


@dataclass
class _FlatGroup:
    """One group's buffers: its members are views of ``params``; their state of the others."""

    members: list[Tensor]
    loose: list[Tensor]
    params: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    max_exp_avg_sq: Tensor | None
    steps: Tensor  # one float32 step count per member: the members' state["step"] views
    pointers: list[int]
    uniform: bool  # all member step counts are known (on the host) to be equal
    first_step: Tensor = field(init=False)  # steps[0]: the flat tensor's step for the kernel
    partial_steps: int = 0

    def __post_init__(self) -> None:
        self.first_step = self.steps[0]

    def intact(self) -> bool:
        """No member's data was replaced since packing (e.g. by ``model.to()``)."""
        return [p.data_ptr() for p in self.members] == self.pointers

    def bump_versions(self) -> None:
        """Count the flat step as an in-place change of every member (as a per-tensor step
        would): a view made by ``.data =`` keeps its own version counter, which autograd's
        saved-tensor checks and the adapters' build stashes read."""
        _set_versions(self.members, [p._version + 1 for p in self.members])

    def gradients(self) -> Tensor | None:
        """All members' gradients as one flat tensor, or None if one has none."""
        grads = [p.grad for p in self.members]
        if any(g is None for g in grads):
            return None
        return torch._C._nn.flatten_dense_tensors(grads)


class FlatAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW(fused=True)`` with one fused launch per parameter group.

    Args are AdamW's (``foreach``/``fused``/``capturable``/``differentiable`` aside: this is
    always the fused implementation). Each group's trainable tensors move into one buffer
    when the optimizer is built (their ``.data`` become views of it, so autograd hooks and
    DDP's stay), so build it after moving the model, as MMEngine's Runner does; a later
    move is seen and packed again at the next step.
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, fused=True
        )
        # Pack now, before any CUDA graph captures the parameters' addresses.
        self._flat: dict[int, _FlatGroup | None] = {
            index: self._pack(group, None) for index, group in enumerate(self.param_groups)
        }

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_flat"):  # not while AdamW's __init__ adds its groups
            self._flat[len(self.param_groups) - 1] = self._pack(self.param_groups[-1], None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        previous = dict(self._flat)
        super().load_state_dict(state_dict)
        # The loaded moments are new tensors: repack them (the parameters stay in place).
        self._flat = {
            index: self._pack(group, previous.get(index))
            for index, group in enumerate(self.param_groups)
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also the end of load_state_dict
        if not hasattr(self, "_flat"):  # unpickled: packed at the first step
            self._flat = {}

    def step(self, closure: Any = None) -> Any:
        """One AdamW step over every group (``closure`` as in torch's optimizers)."""
        self._accelerator_graph_capture_health_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            for index, group in enumerate(self.param_groups):
                flat = self._packed(index, group)
                grads = flat.gradients() if flat is not None and self._uniform(flat) else None
                if grads is None:
                    self._step_tensors(group, group["params"])
                    if flat is not None and flat.uniform:
                        had = [p.grad is not None for p in flat.members]
                        flat.uniform = all(had) or not any(had)
                    continue
                if flat.loose:
                    self._step_tensors(group, flat.loose)
                self._step_flat(group, flat, grads)
        return loss

    # -- the flat path --------------------------------------------------------------------

    def _uniform(self, flat: _FlatGroup) -> bool:
        """Whether the members' step counts are equal; after a step that left some members
        out they may differ, and are checked again (a device sync) after 1, 2, 4, … steps."""
        if flat.uniform:
            return True
        flat.partial_steps += 1
        if flat.partial_steps & (flat.partial_steps - 1) == 0:
            flat.uniform = bool((flat.steps == flat.first_step).all())
        return flat.uniform

    def _step_flat(self, group: dict[str, Any], flat: _FlatGroup, grad: Tensor) -> None:
        device = flat.params.device
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if grad_scale is not None:
            grad_scale = grad_scale.to(device, non_blocking=True)
        if found_inf is not None:
            found_inf = found_inf.to(device, non_blocking=True)
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.device.type != "cpu" and lr.device != device:
            lr = lr.to(device, non_blocking=True)
        beta1, beta2 = (b.item() if isinstance(b, Tensor) else b for b in group["betas"])
        flat.steps.add_(1)
        torch._fused_adamw_(
            [flat.params],
            [grad],
            [flat.exp_avg],
            [flat.exp_avg_sq],
            [flat.max_exp_avg_sq] if flat.max_exp_avg_sq is not None else [],
            [flat.first_step],
            amsgrad=group["amsgrad"],
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            grad_scale=grad_scale,
            found_inf=found_inf,
        )
        if found_inf is not None:
            flat.steps.sub_(found_inf)
        flat.bump_versions()

    def _step_tensors(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """torch's own fused AdamW step over ``params`` of ``group``."""
        lists: tuple[list[Tensor], ...] = ([], [], [], [], [], [])
        has_complex = self._init_group({**group, "params": params}, *lists)
        beta1, beta2 = group["betas"]
        adam(
            *lists,
            amsgrad=group["amsgrad"],
            has_complex=has_complex,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            foreach=group["foreach"],
            capturable=group["capturable"],
            differentiable=group["differentiable"],
            fused=group["fused"],
            grad_scale=getattr(self, "grad_scale", None),
            found_inf=getattr(self, "found_inf", None),
            decoupled_weight_decay=group["decoupled_weight_decay"],
        )

    # -- packing --------------------------------------------------------------------------

    def _packed(self, index: int, group: dict[str, Any]) -> _FlatGroup | None:
        """The group's flat buffers, packed again if a member's data was replaced."""
        if index not in self._flat:
            self._flat[index] = self._pack(group, None)
        flat = self._flat[index]
        if flat is not None and not flat.intact():
            flat = self._flat[index] = self._pack(group, flat)
        return flat

    def _pack(self, group: dict[str, Any], previous: _FlatGroup | None) -> _FlatGroup | None:
        """Move the group's flattenable tensors into one buffer (kept where ``previous``
        still holds them all) and their state into matching buffers."""
        old = previous.params.untyped_storage().data_ptr() if previous is not None else None
        members = _flattenable(group["params"], old)
        if len(members) < 2:
            return None
        chosen = {id(p) for p in members}
        loose = [p for p in group["params"] if id(p) not in chosen]
        sizes = [p.numel() for p in members]
        if _same(previous, members):
            flat_params = previous.params
        else:
            flat_params = torch.cat([p.detach().reshape(-1) for p in members])
            for p, view in zip(members, flat_params.split(sizes)):
                p.data = view.view_as(p)

        states = [self.state[p] if p in self.state else {} for p in members]
        moments = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])
        flats = {}
        for key in moments:
            parts = [
                s[key].detach().to(members[0].device, members[0].dtype).reshape(-1) if key in s
                else torch.zeros_like(p).reshape(-1)
                for p, s in zip(members, states)
            ]  # fmt: skip
            flats[key] = torch.cat(parts)
        counts = [float(s["step"]) if "step" in s else 0.0 for s in states]
        steps = torch.tensor(counts, dtype=torch.float32, device=members[0].device)
        views = {key: flats[key].split(sizes) for key in moments}
        for i, p in enumerate(members):
            state = self.state[p]
            for key in moments:
                state[key] = views[key][i].view_as(p)
            state["step"] = steps[i]
        return _FlatGroup(
            members=members,
            loose=loose,
            params=flat_params,
            exp_avg=flats["exp_avg"],
            exp_avg_sq=flats["exp_avg_sq"],
            max_exp_avg_sq=flats.get("max_exp_avg_sq"),
            steps=steps,
            pointers=[p.data_ptr() for p in members],
            uniform=len(set(counts)) == 1,
        )
