"""DoRA's batched linears read their chunk's frozen W0 as one view once the plan has packed
them back to back (``mm_spectral/adapters/packed_weights.py``): the same values and
gradients as unpacked weights, parameters that stay the model's own (names, state dicts,
in-place loads), a fresh pack after ``.to()``, and tied weights left where they are."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import mm_spectral
from mm_spectral.adapters import batched_spectra, packed_weights
from mm_spectral.adapters.packed_weights import back_to_back, pack_back_to_back, stacked
from mm_spectral.kernels import set_native_mode

from batched_checks import SameShapeLinears
from conftest import randomize_adapter


def dora_blocks() -> nn.Module:
    torch.manual_seed(0)
    model = SameShapeLinears(5)
    mm_spectral.inject(model, dict(type="DoRA", rank=3, alpha=6, targets=[r"fc\.\d"]))
    for _, layer in mm_spectral.adapted_layers(model):
        randomize_adapter(layer.adapter)
    return model


class CountStacks(TorchDispatchMode):
    """Counts ``aten.stack`` calls, the C++ nodes' included."""

    def __init__(self) -> None:
        super().__init__()
        self.stacks = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.stacks += func.overloadpacket is torch.ops.aten.stack
        return func(*args, **(kwargs or {}))


def step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and the trainable parameters' gradients of one forward and backward."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


def bases(model: nn.Module) -> list[torch.Tensor]:
    return [model.fc[i].weight for i in range(5)]


def test_stacked_is_a_view_only_of_tensors_back_to_back():
    buffer = torch.randn(4, 3, 2)
    rows = list(buffer.unbind(0))
    view = stacked(rows)
    assert back_to_back(rows) and view.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(view, buffer, rtol=0, atol=0)
    for others in (rows[::-1], rows[:1] + rows[2:], [r.clone() for r in rows]):
        assert not back_to_back(others)
        copied = stacked(others)
        assert copied.data_ptr() != buffer.data_ptr()
        torch.testing.assert_close(copied, torch.stack(others), rtol=0, atol=0)
    assert not back_to_back(list(torch.randn(4, 2, 3).transpose(1, 2).unbind(0)))


@pytest.mark.parametrize("native", ["auto", "off"])
def test_packed_bases_give_the_same_values_and_gradients(native, whole_deltas, monkeypatch):
    """The plan packs the group's W0 in module order (the chunk's build then reads a view);
    outputs and every gradient equal a copy whose weights stay where they were."""
    previous = set_native_mode(native)
    try:
        packed, unpacked = dora_blocks(), dora_blocks()
        handles = [mm_spectral.enable_batched_spectra(m) for m in (packed, unpacked)]
        x = torch.randn(2, 7, 16)
        original = {n: t.clone() for n, t in packed.state_dict().items()}
        step(packed, x), step(unpacked, x)  # first forwards: the layers learn their tokens
        with monkeypatch.context() as patch:  # the copy never packs
            patch.setattr(batched_spectra, "pack_back_to_back", lambda weights: False)
            with CountStacks() as unpacked_ops:
                want = step(unpacked, x)
        with CountStacks() as packed_ops:
            got = step(packed, x)
        # one chunk: its W0 stacked in the forward and again in the backward, unless packed
        assert packed_ops.stacks == unpacked_ops.stacks - 2
        assert back_to_back(bases(packed)) and not back_to_back(bases(unpacked))
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
        assert got[1].keys() == want[1].keys()
        for name in want[1]:
            torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-6, atol=1e-6)
        # the parameters are still the model's own, with their values
        assert all(isinstance(w, nn.Parameter) and not w.requires_grad for w in bases(packed))
        for name, tensor in packed.state_dict().items():
            torch.testing.assert_close(tensor, original[name], rtol=0, atol=0)
        for handle in handles:
            handle.remove()
    finally:
        set_native_mode(previous)


def test_a_load_writes_into_the_packed_buffer(whole_deltas):
    model, fresh = dora_blocks(), SameShapeLinears(5)
    mm_spectral.inject(fresh, dict(type="DoRA", rank=3, alpha=6, targets=[r"fc\.\d"]))
    mm_spectral.enable_batched_spectra(model)
    x = torch.randn(2, 7, 16)
    step(model, x), step(model, x)
    pointer = model.fc[0].weight.data_ptr()
    model.load_state_dict(fresh.state_dict())
    assert model.fc[0].weight.data_ptr() == pointer and back_to_back(bases(model))
    mm_spectral.enable_batched_spectra(fresh)
    step(fresh, x)
    got, want = step(model, x), step(fresh, x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)


def test_weights_moved_by_to_are_packed_again(whole_deltas):
    model = dora_blocks()
    mm_spectral.enable_batched_spectra(model)
    x = torch.randn(2, 7, 16)
    step(model, x), step(model, x)
    reference = copy.deepcopy(model).double()
    model.double()  # each weight gets its own storage again
    assert not back_to_back(bases(model))
    got = step(model, x.double())
    assert back_to_back(bases(model)) and bases(model)[0].dtype == torch.float64
    with torch.no_grad():
        want = reference(x.double())
    torch.testing.assert_close(got[0], want, rtol=1e-10, atol=1e-10)


def test_only_frozen_plain_weights_with_their_own_storage_move():
    weights = [nn.Parameter(torch.randn(3, 4), requires_grad=False) for _ in range(3)]
    tied = nn.Parameter(weights[1].data, requires_grad=False)  # shares weights[1]'s storage
    wide = torch.randn(2, 3, 4)
    in_a_wider_storage = [weights[0], nn.Parameter(wide[0], requires_grad=False)]
    assert not pack_back_to_back(in_a_wider_storage)
    trainable = [weights[0], nn.Parameter(torch.randn(3, 4))]
    assert not pack_back_to_back(trainable)
    if hasattr(torch._C, "_storage_Use_Count"):
        assert not pack_back_to_back(weights)  # `tied` holds weights[1]'s storage too
    del tied
    values = [w.detach().clone() for w in weights]
    assert pack_back_to_back(weights)
    assert back_to_back(weights) and not pack_back_to_back(weights)  # once is enough
    for weight, value in zip(weights, values):
        torch.testing.assert_close(weight, value, rtol=0, atol=0)
    # a packed weight moves again into another order (the chunk changed)
    assert pack_back_to_back(weights[::-1]) and back_to_back(weights[::-1])
    assert weights[2].__dict__[packed_weights._PACKED] == weights[0].untyped_storage().data_ptr()


def test_weights_a_cuda_graph_captured_stay_where_it_read_them(whole_deltas, monkeypatch):
    """A graph captured at the first call reads W0 at its address; the plan of the second
    call (the first to know the tokens, so the first to batch DoRA's linears) must not
    pack them into a new buffer, which would free that memory under the graph's replays.
    The capture is stood in for on the CPU; its twin without a graph is packed."""
    from mm_spectral.cuda_graph import CudaGraphForward

    captured = []
    monkeypatch.setattr(
        torch.cuda, "make_graphed_callables", lambda module, args, **_: captured.append(module)
    )
    x = torch.randn(2, 7, 16)
    graphed, plain = dora_blocks(), dora_blocks()
    for model in (graphed, plain):
        mm_spectral.enable_batched_spectra(model)
    CudaGraphForward(graphed)._capture(x)
    assert len(captured) == 1
    addresses = [w.data_ptr() for w in bases(graphed)]
    for model in (graphed, plain):
        step(model, x), step(model, x)
    assert [w.data_ptr() for w in bases(graphed)] == addresses
    assert not back_to_back(bases(graphed)) and back_to_back(bases(plain))
    torch.testing.assert_close(step(graphed, x)[0], step(plain, x)[0], rtol=1e-6, atol=1e-6)
