"""FlatAdamW against torch's fused AdamW: the same parameters and state.

On CUDA bit for bit (the fused kernel's arithmetic per element does not depend on where the
element sits); on the CPU the kernel's vectorized loop and its scalar tail round some
elements differently (1 ulp), so there the comparison allows a few ulps, far below what a
wrong step count, learning rate or decay would move.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from mm_spectral.flat_adamw import FlatAdamW

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _model(seed: int = 0, device: str = DEVICE) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.LayerNorm(5))
    return model.to(device)


def _groups(model: nn.Module, lr: float = 1e-2) -> list[dict]:
    """Two groups with different settings, as MMEngine's paramwise rules make them."""
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
    return [dict(params=decay), dict(params=rest, weight_decay=0.0, lr=lr * 3)]


def _backward(model: nn.Module, step: int) -> None:
    torch.manual_seed(100 + step)
    x = torch.randn(7, 6, device=next(model.parameters()).device)
    model(x).square().mean().backward()


def _pair(
    device: str = DEVICE, **kwargs
) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module, torch.optim.Optimizer]:
    ours, theirs = _model(device=device), _model(device=device)
    opt = FlatAdamW(_groups(ours), lr=1e-2, weight_decay=0.1, **kwargs)
    ref = torch.optim.AdamW(_groups(theirs), lr=1e-2, weight_decay=0.1, fused=True, **kwargs)
    return ours, opt, theirs, ref


def _equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    a, b = a.detach(), b.detach().to(a.device)
    if a.device.type == "cuda":
        assert torch.equal(a, b), what
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8, msg=what)


def _assert_same(ours: nn.Module, opt, theirs: nn.Module, ref) -> None:
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        _equal(a, b, name)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        mine, stock = opt.state[a], ref.state[b]
        for key, value in stock.items():
            _equal(mine[key], value, key)


def _train(model, opt, steps: range, skip: nn.Parameter | None = None) -> None:
    for step in steps:
        _backward(model, step)
        if skip is not None:
            skip.grad = None
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kwargs", [{}, dict(amsgrad=True), dict(maximize=True)])
def test_steps_equal_fused_adamw(kwargs, device):
    ours, opt, theirs, ref = _pair(device, **kwargs)
    _train(ours, opt, range(6))
    _train(theirs, ref, range(6))
    _assert_same(ours, opt, theirs, ref)


def _count_launches(monkeypatch) -> list[int]:
    """The tensor count of every ``torch._fused_adamw_`` launch from now on."""
    calls: list[int] = []
    real = torch._fused_adamw_

    def counting(params, *args, **kwargs):
        calls.append(len(params))
        return real(params, *args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", counting)
    return calls


def test_one_fused_launch_per_group(monkeypatch):
    ours, opt, _, _ = _pair()
    calls = _count_launches(monkeypatch)
    assert opt.layout() == "6 tensors in 2 flat buffers, 0 per tensor"
    _train(ours, opt, range(2))
    assert calls == [1, 1, 1, 1]  # two groups, two steps, one flat tensor each
    buffers = {p.untyped_storage().data_ptr() for p in opt.param_groups[0]["params"]}
    assert len(buffers) == 1


def test_parameter_without_gradient_is_skipped_as_torch_does():
    ours, opt, theirs, ref = _pair()
    _train(ours, opt, range(3), skip=ours[2].weight)
    _train(theirs, ref, range(3), skip=theirs[2].weight)
    _assert_same(ours, opt, theirs, ref)
    # Step counts now differ within the group; later full steps stay exact.
    _train(ours, opt, range(3, 8))
    _train(theirs, ref, range(3, 8))
    _assert_same(ours, opt, theirs, ref)


def test_state_dict_round_trips_with_torch_adamw():
    ours, opt, theirs, ref = _pair()
    _train(ours, opt, range(3))
    _train(theirs, ref, range(3))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    # Ours → a fresh torch AdamW, torch's → a fresh FlatAdamW; both go on stepping.
    mine_in_stock = torch.optim.AdamW(_groups(ours), lr=1e-2, weight_decay=0.1, fused=True)
    mine_in_stock.load_state_dict(torch.load(buffer, weights_only=True, map_location=DEVICE))
    copy_of_theirs = copy.deepcopy(theirs)
    stock_in_flat = FlatAdamW(_groups(copy_of_theirs), lr=1e-2, weight_decay=0.1)
    stock_in_flat.load_state_dict(ref.state_dict())
    _train(ours, mine_in_stock, range(3, 6))
    _train(theirs, ref, range(3, 6))
    _train(copy_of_theirs, stock_in_flat, range(3, 6))
    _assert_same(ours, mine_in_stock, theirs, ref)
    _assert_same(copy_of_theirs, stock_in_flat, theirs, ref)


def test_grad_scaler_skips_a_step_with_inf_as_torch_does():
    ours, opt, theirs, ref = _pair()
    for model, optimizer in ((ours, opt), (theirs, ref)):
        scaler = torch.amp.GradScaler(DEVICE, init_scale=256.0)
        for step in range(4):
            torch.manual_seed(100 + step)
            loss = model(torch.randn(7, 6, device=DEVICE)).square().mean()
            scaler.scale(loss).backward()
            if step == 1:
                model[0].weight.grad[0, 0] = float("inf")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
    _assert_same(ours, opt, theirs, ref)


def test_step_counts_as_an_inplace_change_of_every_member():
    ours, opt, _, _ = _pair()
    before = [p._version for p in ours.parameters()]
    _train(ours, opt, range(1))
    assert all(p._version > v for p, v in zip(ours.parameters(), before))
    # So autograd still refuses a backward through a parameter changed since the forward.
    out = ours(torch.randn(2, 6, device=DEVICE)).sum()
    _backward(ours, 9)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_replaced_parameter_data_is_packed_again():
    ours, opt, theirs, ref = _pair()
    _train(ours, opt, range(2))
    _train(theirs, ref, range(2))
    ours[0].weight.data = ours[0].weight.data.clone()  # as model.to() would
    _train(ours, opt, range(2, 5))
    _train(theirs, ref, range(2, 5))
    _assert_same(ours, opt, theirs, ref)
    buffers = {p.untyped_storage().data_ptr() for p in opt.param_groups[0]["params"]}
    assert len(buffers) == 1


def test_tensors_that_cannot_move_step_per_tensor():
    ours, theirs = _model(), _model()
    for model in (ours, theirs):
        model[0].weight.data = model[0].weight.data.t().contiguous().t()  # not contiguous
        model[3].bias.requires_grad_(False)
        model.register_parameter("empty", nn.Parameter(torch.zeros(0, device=DEVICE)))
    ours[2].bias._fsdp_flattened = True  # as FSDP marks the parameters it manages
    opt = FlatAdamW(ours.parameters(), lr=1e-2)
    ref = torch.optim.AdamW(theirs.parameters(), lr=1e-2, fused=True)
    assert not ours[0].weight.is_contiguous()
    loose = {id(p) for p in opt._flat[0].loose}
    assert {id(ours[0].weight), id(ours[2].bias), id(ours.empty)} <= loose
    _train(ours, opt, range(4))
    _train(theirs, ref, range(4))
    _assert_same(ours, opt, theirs, ref)
    assert not ours[0].weight.is_contiguous()


def test_model_state_dict_of_flat_views_saves_and_loads():
    ours, opt, _, _ = _pair()
    _train(ours, opt, range(2))
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    fresh = _model(seed=1)
    fresh.load_state_dict(torch.load(buffer, weights_only=True, map_location=DEVICE))
    for a, b in zip(ours.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    # A second optimizer leaves tensors in another's buffer where they are (and steps them).
    again = FlatAdamW(ours.parameters(), lr=1e-2)
    assert again._flat[0] is None
    reference = copy.deepcopy(ours)
    stock = torch.optim.AdamW(reference.parameters(), lr=1e-2, fused=True)
    _train(ours, again, range(2))
    _train(reference, stock, range(2))
    _assert_same(ours, again, reference, stock)


def test_members_start_on_aligned_slots_with_zero_gaps():
    """A 5-element bias does not shift the tensors after it off a 128-byte boundary."""
    ours, opt, _, _ = _pair()
    for packed in (group.buffers[0] for group in opt._flat.values()):
        base = packed.params.data_ptr()
        assert all((p.data_ptr() - base) % 128 == 0 for p in packed.members)
        covered = torch.zeros(packed.params.numel(), dtype=torch.bool)
        for p in packed.members:
            start = (p.data_ptr() - base) // p.element_size()
            covered[start : start + p.numel()] = True
        _train(ours, opt, range(2))
        assert not packed.params.cpu()[~covered].any()
        _backward(ours, 3)
        assert not packed.gradients(packed.grads()).cpu()[~covered].any()
        opt.zero_grad()


def test_aligned_sizes_first_then_padded_ones_step_as_torch():
    """Members whose sizes keep alignment go first (no gaps), odd-sized ones after."""
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 32), nn.Linear(32, 6)).to(DEVICE)
    theirs = copy.deepcopy(ours)
    opt = FlatAdamW(ours.parameters(), lr=1e-2)
    ref = torch.optim.AdamW(theirs.parameters(), lr=1e-2, fused=True)
    (packed,) = opt._flat[0].buffers
    assert [p.numel() for p in packed.members] == [160, 32, 192, 30, 5, 6]
    assert packed.unpadded == 3 and [g.numel() for g in packed.gaps] == [2, 27, 0]
    _train(ours, opt, range(3))
    _train(theirs, ref, range(3))
    _assert_same(ours, opt, theirs, ref)


def test_buffers_hold_at_most_their_cap_and_step_as_torch(monkeypatch):
    """Past BUFFER_BYTES a group takes several buffers, one fused launch each."""
    monkeypatch.setattr(FlatAdamW, "BUFFER_BYTES", 200)  # bytes: 50 float32 elements
    ours, opt, theirs, ref = _pair()
    sizes = [[p.numel() for p in b.members] for b in opt._flat[0].buffers]
    assert sizes == [[48], [40]]
    sizes = [[p.numel() for p in b.members] for b in opt._flat[1].buffers]
    assert sizes == [[8, 5, 5, 5]]
    calls = _count_launches(monkeypatch)
    _train(ours, opt, range(3))
    _train(theirs, ref, range(3))
    assert calls[:9] == [1] * 9  # ours: three buffers, three steps
    _assert_same(ours, opt, theirs, ref)
