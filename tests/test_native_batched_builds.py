"""The C++ nodes of the batched linear builds (``mm_spectral.kernels.native``: one build
per chunk of same-shape layers) against the Python autograd functions they stand in for,
against finite differences and, for DoRA, against its formula written out; and that the
eager builds take them."""

from __future__ import annotations

import pytest
import torch

from mm_spectral.adapters.batched_dora import batched_rescaled_weights
from mm_spectral.adapters.batched_tucker import (
    batched_core_products,
    batched_low_rank_products,
    batched_tucker_linear_deltas,
)
from mm_spectral.kernels import native, set_native_mode

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LAYERS, OUT, IN, RANK = 3, 12, 10, 4


def leaves(*shapes, device="cpu", dtype=torch.float32, grad=True):
    """One list of LAYERS random leaf tensors per shape."""
    return [
        [torch.randn(shape, device=device, dtype=dtype).requires_grad_(grad) for _ in range(LAYERS)]
        for shape in shapes
    ]


def case(kind: str, device: str = "cpu"):
    """(build, its trainable inputs): each kind of batched linear build on random layers."""
    torch.manual_seed(0)
    if kind == "low-rank":  # LoRA's s·B A
        ups, downs = leaves((OUT, RANK), (RANK, IN), device=device)
        return lambda: batched_low_rank_products(ups, downs, 0.5), ups + downs
    if kind == "core":  # FLoRA's down factor s·G U_inᵀ (a transposed product)
        cores, u_in = leaves((RANK, RANK), (IN, RANK), device=device)
        return lambda: batched_core_products(cores, u_in, 0.5), cores + u_in
    if kind == "tucker":  # FLoRA's whole linear ΔW
        cores, u_out, u_in = leaves((RANK, RANK), (OUT, RANK), (IN, RANK), device=device)
        return (
            lambda: batched_tucker_linear_deltas(cores, u_out, u_in, 0.5),
            cores + u_out + u_in,
        )
    (weights,) = leaves((OUT, IN), device=device, grad=False)  # DoRA: W0 frozen
    ups, downs = leaves((OUT, RANK), (RANK, IN), device=device)
    magnitudes = [w.norm(dim=1).detach().requires_grad_() for w in weights]
    build = lambda: batched_rescaled_weights(weights, ups, downs, magnitudes, 0.5)  # noqa: E731
    return build, ups + downs + magnitudes


def run(kind: str, mode: str, device: str, autocast: bool):
    """Output, the grad_fn's name and the gradients under one fixed random probe."""
    build, params = case(kind, device)
    previous = set_native_mode(mode)
    try:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            out = build()
    finally:
        set_native_mode(previous)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    grads = torch.autograd.grad((out * probe).sum(), params)
    return out, out.grad_fn.name(), grads


KINDS = ["low-rank", "core", "tucker", "dora"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("kind", KINDS)
def test_native_batched_build_equals_the_python_function(kind, autocast, device, native_module):
    got, node, got_grads = run(kind, "on", device, autocast)
    ref, ref_node, ref_grads = run(kind, "off", device, autocast)
    assert "CppNode<mm_spectral_native" in node and "CppNode" not in ref_node
    assert got.dtype == ref.dtype == torch.float32 and got.shape[0] == LAYERS
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert len(got_grads) == len(ref_grads)
    for g, r in zip(got_grads, ref_grads):
        assert r.abs().max() > 0
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("transpose", [False, True])
def test_native_batched_product_passes_gradcheck(transpose, native_module):
    xs, ys = leaves((5, 3), (4, 3) if transpose else (3, 4), dtype=torch.float64)
    build = lambda *t: native_module.batched_product(t[:LAYERS], t[LAYERS:], 0.7, transpose)  # noqa: E731
    assert torch.autograd.gradcheck(build, (*xs, *ys))
    want = torch.stack([0.7 * (x @ (y.T if transpose else y)) for x, y in zip(xs, ys)])
    torch.testing.assert_close(build(*xs, *ys), want)


def test_native_batched_tucker_linear_passes_gradcheck(native_module):
    cores, u_out, u_in = leaves((2, 3), (5, 2), (4, 3), dtype=torch.float64)
    n = LAYERS
    build = lambda *t: native_module.batched_tucker_linear(t[:n], t[n : 2 * n], t[2 * n :], 0.7)  # noqa: E731
    assert torch.autograd.gradcheck(build, (*cores, *u_out, *u_in))
    want = torch.stack(
        [0.7 * torch.einsum("or,rj,ij->oi", o, c, i) for c, o, i in zip(cores, u_out, u_in)]
    )
    torch.testing.assert_close(build(*cores, *u_out, *u_in), want)


def test_native_dora_build_follows_the_written_out_formula(native_module):
    """W' = m ⊙ S / ‖S‖ per output row with S = W0 + s·B A; the norm takes no gradient, so
    the factors see (m / ‖S‖) ⊙ dW' and the magnitude Σ_in dW' ⊙ S / ‖S‖."""
    torch.manual_seed(0)
    (weights,) = leaves((OUT, IN), grad=False)
    ups, downs = leaves((OUT, RANK), (RANK, IN))
    magnitudes = [w.norm(dim=1).detach().requires_grad_() for w in weights]
    got = native_module.batched_rescaled_weight(weights, ups, downs, magnitudes, 0.5)
    summed = [w + 0.5 * b @ a for w, b, a in zip(weights, ups, downs)]
    want = torch.stack(
        [m[:, None] * s / s.norm(dim=1, keepdim=True).detach()
         for m, s in zip(magnitudes, summed)]
    )  # fmt: skip
    probe = torch.randn_like(want)
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad((got * probe).sum(), ups + downs + magnitudes)
    refs = torch.autograd.grad((want * probe).sum(), ups + downs + magnitudes)
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r)


def test_builds_alone_keep_their_python_functions_when_turned_off(native_module):
    """MM_SPECTRAL_NATIVE_BUILDS=off: the batched builds run their Python functions while
    the native mode stays on; the setting is validated."""
    from mm_spectral.kernels import set_native_builds_mode

    previous = set_native_builds_mode("off")
    try:
        out, node, _ = run("dora", "on", "cpu", autocast=False)
    finally:
        set_native_builds_mode(previous)
    assert node == "_BatchedRescaledWeightBackward"
    assert native.native_mode() == "on"
    with pytest.raises(ValueError, match="native builds mode"):
        set_native_builds_mode("on")
