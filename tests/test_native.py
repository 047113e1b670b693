"""The C++ autograd nodes for adapted layers (``mm_spectral.kernels.native``) against the
Python functions they replace in eager steps, against finite differences, and their
modes: a failed build falls back with a warning ('auto') or raises ('on')."""

from __future__ import annotations

import pytest
import torch

from mm_spectral.adapters.functional import LowRankLinear, low_rank_linear
from mm_spectral.kernels import OPTIONS, native, set_native_mode
from mm_spectral.kernels.dispatch import FORMS

from conftest import make_case

# Methods whose adapted linears run through the C++ nodes.
METHODS = ["LoRA", "FLoRA", "FoRA", "DoRA", "FourierFT", "LoRA-rows", "FoRA-rows"]


def step(method, mode, rank_term, monkeypatch, autocast=False, train_base=False, layer="linear"):
    """Output, gradients and the grad_fn's type name of one forward + backward."""
    model, x = make_case(method, layer)
    model.layer.weight.requires_grad_(train_base)
    model.layer.bias.requires_grad_(train_base)
    x.requires_grad_(True)
    params = [x, *(p for p in model.parameters() if p.requires_grad)]
    monkeypatch.setattr(OPTIONS, "rank_term", rank_term)
    previous = set_native_mode(mode)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        grads = torch.autograd.grad(out.float().square().sum(), params)
    finally:
        set_native_mode(previous)
    return out, grads, out.grad_fn.name()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rank_term", ["weight", "output", "dense"])
@pytest.mark.parametrize("train_base", [False, True], ids=["frozen", "trainable-base"])
def test_native_node_equals_the_python_function(
    method, rank_term, train_base, monkeypatch, native_module
):
    got, got_grads, node = step(method, "on", rank_term, monkeypatch, train_base=train_base)
    ref, ref_grads, ref_node = step(method, "off", rank_term, monkeypatch, train_base=train_base)
    assert "CppNode<mm_spectral_native" in node and "CppNode" not in ref_node  # C++ ran, not Python
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert len(got_grads) == len(ref_grads) >= 2 + 2 * train_base  # x, adapter (W0, b)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["LoRA", "DoRA", "FLoRA", "FourierFT", "FoRA"])
@pytest.mark.parametrize("rank_term", ["weight", "output", "dense"])
def test_native_node_under_bf16_autocast(method, rank_term, monkeypatch, native_module):
    """Autocast's dtype for the output, float32 factor gradients, and the same step as
    the Python function under autocast (FLoRA's scale rides on the rank term instead of
    the down factor, so it rounds differently: bf16 tolerance)."""
    got, got_grads, _ = step(method, "on", rank_term, monkeypatch, autocast=True)
    ref, ref_grads, _ = step(method, "off", rank_term, monkeypatch, autocast=True)
    assert got.dtype == ref.dtype == torch.bfloat16
    exact = method != "FLoRA"
    torch.testing.assert_close(got, ref, **(dict(rtol=0, atol=0) if exact else {}))
    for g, r in zip(got_grads, ref_grads):
        assert g.dtype == r.dtype
        tolerance = 1e-6 if exact else 2e-2 * r.abs().max().item()
        torch.testing.assert_close(g, r, rtol=1e-6 if exact else 2e-2, atol=tolerance)


@pytest.mark.parametrize("form", [0, 1, 2], ids=FORMS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_native_node_passes_gradcheck(form, with_bias, native_module):
    """Float64 finite differences on every input, 3-D tokens (the view back and forth)."""
    torch.manual_seed(0)
    kw = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 5, **kw)
    weight, down, up = torch.randn(4, 5, **kw), torch.randn(2, 5, **kw), torch.randn(4, 2, **kw)
    bias = torch.randn(4, **kw) if with_bias else None

    def fn(x, weight, bias, down, up):
        return native_module.low_rank_linear(x, weight, bias, down, up, 0.7, form)

    assert torch.autograd.gradcheck(fn, (x, weight, bias, down, up))
    reference = x @ (weight + 0.7 * up @ down).T + (0 if bias is None else bias)
    torch.testing.assert_close(fn(x, weight, bias, down, up), reference)


@pytest.mark.parametrize("form", [0, 1, 2], ids=FORMS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_native_dora_node_passes_gradcheck(form, with_bias, native_module):
    """DoRA's node: every input but the (detached) inverse norms, against finite
    differences and the formula c ⊙ (x (W + s·up·down)ᵀ) + b."""
    torch.manual_seed(0)
    kw = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 5, **kw)
    weight, down, up = torch.randn(4, 5, **kw), torch.randn(2, 5, **kw), torch.randn(4, 2, **kw)
    magnitude = torch.rand(4, **kw)
    inv_norm = torch.rand(4, dtype=torch.float64) + 0.5
    bias = torch.randn(4, **kw) if with_bias else None

    def fn(x, weight, bias, down, up, magnitude):
        return native_module.rescaled_low_rank_linear(
            x, weight, bias, down, up, 0.7, magnitude, inv_norm, form
        )

    assert torch.autograd.gradcheck(fn, (x, weight, bias, down, up, magnitude))
    direction = x @ (weight + 0.7 * up @ down).T
    reference = direction * (magnitude * inv_norm) + (0 if bias is None else bias)
    torch.testing.assert_close(fn(x, weight, bias, down, up, magnitude), reference)


@pytest.mark.parametrize("with_bias", [True, False])
def test_native_dense_dora_node_passes_gradcheck(with_bias, native_module):
    """DoRA's dense node: finite differences on the inputs the norm does not see (x, b, m),
    and every gradient against autograd through the formula with the norm detached,
    m ⊙ x (W + s·up·down)ᵀ / ‖W + s·up·down‖ + b."""
    torch.manual_seed(0)
    kw = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 5, **kw)
    weight, down, up = torch.randn(4, 5, **kw), torch.randn(2, 5, **kw), torch.randn(4, 2, **kw)
    magnitude = torch.rand(4, **kw)
    bias = torch.randn(4, **kw) if with_bias else None

    def fn(x, weight, bias, down, up, magnitude):
        return native_module.rescaled_weight_linear(x, weight, bias, down, up, 0.7, magnitude)

    def reference(x, weight, bias, down, up, magnitude):
        direction = weight + 0.7 * up @ down
        norm = direction.detach().norm(dim=1)
        y = x @ (direction * (magnitude / norm)[:, None]).T
        return y if bias is None else y + bias

    frozen = [t.detach() for t in (weight, down, up)]
    assert torch.autograd.gradcheck(
        lambda x, bias, m: fn(x, frozen[0], bias, frozen[1], frozen[2], m), (x, bias, magnitude)
    )
    inputs = (x, weight, bias, down, up, magnitude)
    got, ref = fn(*inputs), reference(*inputs)
    torch.testing.assert_close(got, ref)
    wanted = [t for t in inputs if t is not None]
    for g, r in zip(
        torch.autograd.grad(got.square().sum(), wanted),
        torch.autograd.grad(ref.square().sum(), wanted),
    ):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("known_base", [False, True])
def test_native_inverse_norms_equal_the_python_ones(dtype, known_base, native_module):
    """1 / ‖W0 + s·up·down‖ per row: the C++ function against the Python one and against
    the norm of the formed sum; float32 out, no gradient."""
    from mm_spectral.adapters.dora import _inverse_norms, row_squares

    torch.manual_seed(0)
    weight = torch.randn(6, 8).to(dtype)
    down = torch.randn(3, 8, requires_grad=True)
    up = torch.randn(6, 3, requires_grad=True)
    base = row_squares(weight) if known_base else None
    got = native_module.low_rank_inverse_norms(weight, down, up, 0.3, base)
    assert got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got, _inverse_norms(weight, down, up, 0.3, base))
    formed = weight.double() + 0.3 * up.detach().double() @ down.detach().double()
    torch.testing.assert_close(got.double(), 1 / formed.norm(dim=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", [0, 1, 2], ids=FORMS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_native_flora_node_passes_gradcheck(form, with_bias, native_module):
    """FLoRA's node (down = core U_inᵀ formed inside): every input against finite
    differences, and the formula x (W + s · U_out core U_inᵀ)ᵀ + b."""
    torch.manual_seed(0)
    kw = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 5, **kw)
    weight, core = torch.randn(4, 5, **kw), torch.randn(2, 3, **kw)
    u_out, u_in = torch.randn(4, 2, **kw), torch.randn(5, 3, **kw)
    bias = torch.randn(4, **kw) if with_bias else None

    def fn(x, weight, bias, core, u_out, u_in):
        return native_module.tucker_low_rank_linear(x, weight, bias, core, u_out, u_in, 0.7, form)

    assert torch.autograd.gradcheck(fn, (x, weight, bias, core, u_out, u_in))
    reference = x @ (weight + 0.7 * u_out @ core @ u_in.T).T + (0 if bias is None else bias)
    torch.testing.assert_close(fn(x, weight, bias, core, u_out, u_in), reference)


CONV_LAYERS = ["conv3x3", "conv_strided", "depthwise7x7", "stem4x4"]


@pytest.mark.parametrize("layer", CONV_LAYERS)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_native_flora_conv_equals_the_python_function(layer, autocast, monkeypatch, native_module):
    """FLoRA on convs (factored, and the grouped conv's ΔW): its factors come from the C++
    node, and the step equals the Python function's (exactly in float32; both compute the
    factors in float32 under autocast too)."""
    model, _ = make_case("FLoRA", layer)
    adapter = model.layer.adapter
    factor = adapter.delta() if layer == "depthwise7x7" else adapter.low_rank_factors()[0]
    assert "CppNode<mm_spectral_native" in factor.grad_fn.name()
    got, got_grads, _ = step("FLoRA", "on", "auto", monkeypatch, autocast=autocast, layer=layer)
    ref, ref_grads, _ = step("FLoRA", "off", "auto", monkeypatch, autocast=autocast, layer=layer)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert len(got_grads) == len(ref_grads) == 6  # x, core, four factors
    for g, r in zip(got_grads, ref_grads):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_up", [False, True], ids=["down", "delta"])
@pytest.mark.parametrize("shape", [(6, 1, 7, 7), (5, 3, 4, 4), (4, 6, 1, 1)])
def test_native_tucker_conv_factor_passes_gradcheck(shape, with_up, native_module):
    """scale · core ×₁ U_out ×₂ U_in ×₃ U_h ×₄ U_w (or without U_out, unfolded to
    (J_out, in · kh · kw)) against an einsum and finite differences on every input."""
    torch.manual_seed(0)
    kw = dict(dtype=torch.float64, requires_grad=True)
    ranks = [min(3, size) for size in shape]
    core = torch.randn(*ranks, **kw)
    factors = [torch.randn(size, r, **kw) for size, r in zip(shape, ranks)]

    def fn(core, u_out, u_in, u_h, u_w):
        up = u_out if with_up else None
        return native_module.tucker_conv_factor(core, u_in, u_h, u_w, up, 0.7)

    assert torch.autograd.gradcheck(fn, (core, *factors))
    u_out = factors[0] if with_up else torch.eye(ranks[0], dtype=torch.float64)
    reference = 0.7 * torch.einsum("abcd,ia,jb,kc,ld->ijkl", core, u_out, *factors[1:])
    torch.testing.assert_close(fn(core, *factors), reference.reshape(reference.shape[0], -1))


DENSE_CONV_CASES = [("FourierFT", layer) for layer in CONV_LAYERS] + [
    ("LoRA", "depthwise7x7"), ("FLoRA", "depthwise7x7"), ("FoRA", "depthwise7x7"),
    ("LoRA-loralib", "conv3x3"), ("LoRA-loralib", "conv_strided"),
    ("DoRA", "depthwise7x7"), ("DoRA-loralib", "conv3x3"), ("DoRA-loralib", "stem4x4"),
]  # fmt: skip


@pytest.mark.parametrize("method,layer", DENSE_CONV_CASES)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("train_base", [False, True], ids=["frozen", "trainable-base"])
def test_native_delta_conv_equals_the_python_op(
    method, layer, autocast, train_base, monkeypatch, native_module
):
    """Convs that build ΔW run W0 + ΔW (DoRA: rescaled per channel) through one C++ node:
    the same output and gradients (x, adapter, and the base weight and bias when they
    train) as the Python ops."""
    kw = dict(autocast=autocast, train_base=train_base, layer=layer)
    got, got_grads, node = step(method, "on", "auto", monkeypatch, **kw)
    ref, ref_grads, ref_node = step(method, "off", "auto", monkeypatch, **kw)
    assert "CppNode<mm_spectral_native" in node and "CppNode" not in ref_node
    assert got.dtype == ref.dtype == (torch.bfloat16 if autocast else torch.float32)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert len(got_grads) == len(ref_grads)
    for g, r in zip(got_grads, ref_grads):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
def test_native_delta_conv_passes_gradcheck(groups, with_bias, native_module):
    """conv2d(x, W + ΔW, b) with stride, padding, dilation and groups: finite differences
    on every input (ΔW given as the weight's matrix view), and the formula."""
    torch.manual_seed(0)
    kw = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 4, 7, 6, **kw)
    weight = torch.randn(6, 4 // groups, 3, 2, **kw)
    delta = torch.randn(6, 4 // groups * 3 * 2, **kw)
    bias = torch.randn(6, **kw) if with_bias else None
    options = dict(stride=[2, 1], padding=[1, 2], dilation=[1, 2], groups=groups)

    def fn(x, weight, bias, delta):
        return native_module.delta_conv2d(x, weight, bias, delta, *options.values())

    assert torch.autograd.gradcheck(fn, (x, weight, bias, delta))
    reference = torch.nn.functional.conv2d(x, weight + delta.view_as(weight), bias, **options)
    torch.testing.assert_close(fn(x, weight, bias, delta), reference)


@pytest.mark.parametrize("with_bias", [True, False])
def test_native_rescaled_delta_conv_passes_gradcheck(with_bias, native_module):
    """DoRA's conv2d(x, m ⊙ (W + ΔW) / ‖W + ΔW‖_c, b) with the norm held constant: finite
    differences on every input against the same formula with a detached norm."""
    torch.manual_seed(0)
    kw = dict(dtype=torch.float64, requires_grad=True)
    x, weight = torch.randn(2, 4, 6, 5, **kw), torch.randn(6, 2, 3, 3, **kw)
    delta, magnitude = torch.randn(6, 18, **kw), torch.rand(6, **kw) + 0.5
    bias = torch.randn(6, **kw) if with_bias else None
    options = dict(stride=[1, 2], padding=[1, 0], dilation=[2, 1], groups=2)

    def fn(x, weight, bias, delta, magnitude):
        return native_module.rescaled_delta_conv2d(
            x, weight, bias, delta, magnitude, *options.values()
        )

    def reference(x, weight, bias, delta, magnitude):
        direction = weight + delta.view_as(weight)
        norm = direction.detach().flatten(1).norm(dim=1)
        rescaled = direction * (magnitude / norm).view(-1, 1, 1, 1)
        return torch.nn.functional.conv2d(x, rescaled, bias, **options)

    inputs = (x, weight, bias, delta, magnitude)
    torch.testing.assert_close(fn(*inputs), reference(*inputs))
    # gradcheck perturbs inputs, which would move the (detached) norm: compare analytic
    # gradients with the reference's autograd instead, and check the node's own Jacobian
    # where the norm is fixed (only x and the bias enter linearly).
    probe = torch.randn_like(fn(*inputs))
    wanted = [t for t in inputs if t is not None]
    got = torch.autograd.grad((fn(*inputs) * probe).sum(), wanted)
    ref = torch.autograd.grad((reference(*inputs) * probe).sum(), wanted)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r)

    def linear_in(x, bias):
        return fn(x, weight.detach(), bias, delta.detach(), magnitude.detach())

    assert torch.autograd.gradcheck(linear_in, (x, bias))


@pytest.mark.parametrize("shape", [(6, 8), (5, 7), (4, 1)])
def test_native_sparse_spectrum_equals_python_and_an_explicit_dft(shape, native_module):
    """Re(ifft2(F)) of a sparse spectrum: the C++ node against the Python function (values
    and coefficient gradients) and against the complex inverse FFT of the dense F."""
    from mm_spectral.adapters.spectral import (
        _SparseSpectrumToReal,
        half_spectrum_positions,
        sample_entries,
    )

    rows, cols = shape
    n = min(10, rows * cols)
    indices = sample_entries(rows, cols, n, seed=3)
    positions = half_spectrum_positions(indices, shape)
    coefficients = torch.randn(n, requires_grad=True)
    got = native_module.sparse_spectrum_to_real(coefficients, positions, rows, cols, 1.7)
    ref = _SparseSpectrumToReal.apply(coefficients, positions, shape, 1.7)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    dense = torch.zeros(rows, cols, dtype=torch.complex128)
    dense[indices[0], indices[1]] = coefficients.detach().double().to(torch.complex128)
    torch.testing.assert_close(got.double(), 1.7 * torch.fft.ifft2(dense).real, atol=1e-6, rtol=0)
    probe = torch.randn(rows, cols)
    (grad,) = torch.autograd.grad((got * probe).sum(), coefficients)
    (ref_grad,) = torch.autograd.grad((ref * probe).sum(), coefficients)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_bias", [True, False])
def test_native_delta_linear_passes_gradcheck(with_bias, native_module):
    """FourierFT's x (W + ΔW)ᵀ + b: finite differences on every input, 3-D tokens."""
    torch.manual_seed(0)
    kw = dict(dtype=torch.float64, requires_grad=True)
    x, weight, delta = torch.randn(2, 3, 5, **kw), torch.randn(4, 5, **kw), torch.randn(4, 5, **kw)
    bias = torch.randn(4, **kw) if with_bias else None
    assert torch.autograd.gradcheck(native_module.delta_linear, (x, weight, bias, delta))
    reference = x @ (weight + delta).T + (0 if bias is None else bias)
    torch.testing.assert_close(native_module.delta_linear(x, weight, bias, delta), reference)


def test_python_function_serves_where_the_native_node_is_off(monkeypatch):
    x, weight = torch.randn(3, 5, requires_grad=True), torch.randn(4, 5)
    down, up = torch.randn(2, 5, requires_grad=True), torch.randn(4, 2, requires_grad=True)
    previous = set_native_mode("off")
    try:
        out = low_rank_linear(x, weight, None, down, up, 0.5)
    finally:
        set_native_mode(previous)
    assert out.grad_fn.name() == "LowRankLinearBackward"
    torch.testing.assert_close(out, LowRankLinear.apply(x, weight, None, down, up, 0.5))


def test_failed_build_falls_back_with_a_warning_or_raises(monkeypatch):
    monkeypatch.setattr(native, "_build", lambda: RuntimeError("no compiler here"))
    monkeypatch.setattr(native, "_warn_once", native._warn_once.__wrapped__)
    previous = set_native_mode("auto")
    try:
        with pytest.warns(UserWarning, match="no compiler here"):
            assert native.native_ops() is None
        x, weight, down, up = (
            torch.randn(3, 5),
            torch.randn(4, 5),
            torch.randn(2, 5),
            torch.randn(4, 2),
        )
        with pytest.warns(UserWarning):
            out = low_rank_linear(x, weight, None, down, up, 1.0)
        torch.testing.assert_close(out, x @ (weight + up @ down).T)
        set_native_mode("on")
        with pytest.raises(RuntimeError, match="did not build"):
            native.native_ops()
    finally:
        set_native_mode(previous)


def test_native_mode_is_validated():
    with pytest.raises(ValueError, match="native mode"):
        set_native_mode("sometimes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rank_term", ["weight", "output", "dense"])
def test_native_node_on_cuda_under_bf16_autocast(rank_term, monkeypatch, native_module):
    """On the GPU the float32 factor gradients come out of cuBLAS (mm with out_dtype) in
    both paths: the same step to bf16 tolerance, float32 gradients."""
    monkeypatch.setattr(OPTIONS, "rank_term", rank_term)
    torch.manual_seed(0)
    x = torch.randn(2, 96, 128, device="cuda", requires_grad=True)
    weight, bias = torch.randn(256, 128, device="cuda"), torch.randn(256, device="cuda")
    down = torch.randn(16, 128, device="cuda", requires_grad=True)
    up = torch.randn(256, 16, device="cuda", requires_grad=True)
    results = []
    for mode in ("on", "off"):
        previous = set_native_mode(mode)
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = low_rank_linear(x, weight, bias, down, up, 0.5)
            results.append((out, torch.autograd.grad(out.float().square().sum(), (x, down, up))))
        finally:
            set_native_mode(previous)
    (got, got_grads), (ref, ref_grads) = results
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref)
    for g, r in zip(got_grads, ref_grads):
        assert g.dtype == r.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-2 * r.abs().max().item())
