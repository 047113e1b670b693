"""mm_spectral.kernels: Triton kernels against the torch path, the FourierFT coefficient
gradient's sign convention, batched spectral builds, dispatch, and the benchmark's smoke run.

The Triton kernels are checked by tests/kernel_checks.py in a subprocess: on the CPU under
``TRITON_INTERPRET=1`` (read when ``triton.jit`` decorates, so it cannot be switched on in
this process), in float32 because the interpreter has no bf16 dots; on a GPU compiled, in
float32 (IEEE dots) and, in the GPU-only tests below, in bf16 under autocast.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import mm_spectral
from mm_spectral.adapters.batched_spectra import (
    batched_fora_factors,
    batched_fourierft_deltas,
    batched_sparse_spectrum_to_real,
    enable_batched_spectra,
)
from mm_spectral.adapters.functional import low_rank_linear
from mm_spectral.adapters.spectral import (
    half_spectrum_positions,
    sample_entries,
    sparse_spectrum_to_real,
)
from mm_spectral.adapters.stash import stash, take_stash
from mm_spectral.kernels import (
    OPTIONS,
    fused_low_rank_mode,
    set_fused_low_rank_mode,
    use_fused_low_rank,
)
from mm_spectral.kernels.spectral_grad import (
    dense_spectrum_grad,
    sampled_spectrum_grad,
    spectrum_columns,
)

from batched_checks import assert_same_values_and_gradients
from conftest import randomize_adapter

REPO = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def run_python(*args: str, interpret: bool, timeout: int = 300) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MM_SPECTRAL_TUNE": "0"}
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


# --- Triton kernels: interpreted on the CPU, compiled on a GPU --------------------------------


CHECK_GROUPS = [
    "forward", "backward", "passes", "cublas", "linear", "spectral", "rescaled", "autocast",
]  # fmt: skip


@pytest.fixture(scope="module")
def interpreted_checks() -> str:
    """One interpreter process runs every group of tests/kernel_checks.py (startup once)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "tests/kernel_checks.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return done.stdout + done.stderr


@needs_triton
@pytest.mark.skipif(
    torch.cuda.is_available(), reason="on a GPU the compiled kernels are tested instead"
)
@pytest.mark.parametrize("group", CHECK_GROUPS)
def test_kernels_interpreted(interpreted_checks, group):
    """Values and gradients of the kernels equal the torch path (tests/kernel_checks.py)."""
    if f"ok {group}" not in interpreted_checks:
        start = interpreted_checks.find(f"FAIL {group}")
        pytest.fail(interpreted_checks[start : start + 3000] if start >= 0 else interpreted_checks)


@needs_triton
@needs_cuda
def test_kernels_compiled_on_gpu():
    out = run_python("tests/kernel_checks.py", interpret=False, timeout=600)
    assert out.count("ok ") == len(CHECK_GROUPS), out


@needs_triton
@needs_cuda
@pytest.mark.parametrize("strategy", ["cublas", "triton"])
@pytest.mark.parametrize("shape", [(1000, 512, 384, 16), (4, 257, 256, 320, 5)])
def test_gpu_fused_linear_bf16_autocast_matches_torch(shape, strategy):
    """Under bf16 autocast on a GPU the fused path ('on') matches the torch path; 'auto'
    takes it off the default stream only."""
    *lead, k, n, r = shape
    torch.manual_seed(0)
    x = torch.randn(*lead, k, device="cuda")
    w = torch.randn(n, k, device="cuda") * k**-0.5
    b = torch.randn(n, device="cuda")
    down = (torch.randn(r, k, device="cuda") * k**-0.5).requires_grad_()
    up = (torch.randn(n, r, device="cuda") * 0.1).requires_grad_()
    grad_out = torch.randn(*lead, n, device="cuda", dtype=torch.bfloat16)
    x2, w2, up2 = x.reshape(-1, k).bfloat16(), w.bfloat16(), up.bfloat16()
    assert not use_fused_low_rank(x2, w2, up2), "'auto' keeps eager default-stream work on torch"
    with torch.cuda.stream(torch.cuda.Stream()):
        assert use_fused_low_rank(x2, w2, up2), "'auto' takes the kernels on a side stream"
    results = {}
    for mode in ("on", "off"):
        previous = set_fused_low_rank_mode(mode)
        OPTIONS.strategy = strategy
        try:
            xi = x.clone().requires_grad_()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = low_rank_linear(xi, w, b, down, up, 2.0)
            results[mode] = (y, *torch.autograd.grad(y, [xi, down, up], grad_out))
        finally:
            set_fused_low_rank_mode(previous)
            OPTIONS.strategy = "cublas"
    for got, want in zip(results["on"], results["off"]):
        assert got.shape == want.shape
        rel = (got.float() - want.float()).norm() / want.float().norm()
        assert rel < 1e-2, f"relative difference {rel:.2e}"


@needs_triton
@needs_cuda
def test_fourierft_sampled_gradient_on_gpu():
    """FourierFT with the fused sampled gradient equals the dense route (bf16 autocast)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 512)).cuda()
    mm_spectral.inject(model, dict(type="FourierFT", targets=["0"], n=300, alpha=150.0))
    x = torch.randn(3, 200, 1024, device="cuda")
    grads = {}
    for route in ("sampled", "dense"):
        OPTIONS.fourier_grad = route
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = model(x)
            coefficients = model[0].adapter.coefficients
            grads[route] = torch.autograd.grad(y.float().square().sum(), coefficients)
        finally:
            OPTIONS.fourier_grad = "dense"
    got, want = grads["sampled"][0], grads["dense"][0]
    assert (got - want).norm() / want.norm() < 2e-2


# --- the FourierFT coefficient gradient (torch route; CPU) ----------------------------------


def explicit_cosine_delta(coefficients, indices, shape, scale):
    """ΔW = scale/(o·i) Σⱼ cⱼ cos 2π(kⱼ p/o + lⱼ q/i), float64, differentiable."""
    rows, cols = shape
    p = torch.arange(rows, dtype=torch.float64)[:, None, None]
    q = torch.arange(cols, dtype=torch.float64)[None, :, None]
    phase = 2 * math.pi * (indices[0] * p / rows + indices[1] * q / cols)
    return (coefficients * torch.cos(phase)).sum(-1) * scale / (rows * cols)


@pytest.mark.parametrize("shape", [(12, 10), (9, 16), (7, 5)])
def test_sampled_gradient_sign_convention(shape):
    """∂L/∂c = scale/(o·i) · Re Σₜ FG[t,k] FX[t,l] — no conjugate with torch's FFT sign."""
    rows, cols = shape
    torch.manual_seed(rows * cols)
    n = min(30, rows * cols)
    indices = sample_entries(rows, cols, n, seed=3)
    coefficients = torch.randn(n, dtype=torch.float64, requires_grad=True)
    x = torch.randn(11, cols, dtype=torch.float64)
    g = torch.randn(11, rows, dtype=torch.float64)
    delta = explicit_cosine_delta(coefficients, indices, shape, 2.5)
    (want,) = torch.autograd.grad(((x @ delta.t()) * g).sum(), coefficients)
    torch.testing.assert_close(sampled_spectrum_grad(g, x, indices, 2.5), want)
    torch.testing.assert_close(dense_spectrum_grad(g, x, indices, 2.5), want)
    fg, fx = spectrum_columns(g, indices[0]), spectrum_columns(x, indices[1])
    conjugated = (fg * fx.conj()).real.sum(0) * 2.5 / (rows * cols)
    assert (conjugated - want).abs().max() > 1e-2 * want.abs().max(), "the conjugate must differ"


def test_spectrum_columns_cover_mirrored_frequencies():
    v = torch.randn(4, 9, dtype=torch.float64)
    frequencies = torch.arange(9)
    torch.testing.assert_close(spectrum_columns(v, frequencies), torch.fft.fft(v, dim=1))


@pytest.mark.parametrize("input_shape", [(13, 24), (2, 5, 24)])
def test_fourierft_sampled_route_equals_dense_route(input_shape):
    """OPTIONS.fourier_grad='sampled' (torch route on the CPU): same output and gradients."""
    results = {}
    for route in ("dense", "sampled"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(24, 18))
        mm_spectral.inject(model, dict(type="FourierFT", targets=["0"], n=40, alpha=30.0))
        model[0].bias.requires_grad_(True)
        randomize_adapter(model[0].adapter)
        x = torch.randn(input_shape, requires_grad=True)
        OPTIONS.fourier_grad = route
        try:
            y = model(x)
            params = [x, model[0].bias, model[0].adapter.coefficients]
            results[route] = (y, *torch.autograd.grad((y * torch.cos(y)).sum(), params))
        finally:
            OPTIONS.fourier_grad = "dense"
    for got, want in zip(results["sampled"], results["dense"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# --- batched ΔW builds (CPU) -----------------------------------------------------------------


def test_batched_spectra_equal_per_layer_builds():
    """Different n, entries and scales per layer: values and gradients as one at a time."""
    torch.manual_seed(0)
    shape = (7, 12)
    indices = [sample_entries(*shape, n, seed=s) for n, s in ((10, 1), (84, 2), (5, 3))]
    positions = [half_spectrum_positions(i, shape) for i in indices]
    coefficients = [torch.randn(i.shape[1], requires_grad=True) for i in indices]
    scales = [1.0, 2.5, -3.0]
    batched = batched_sparse_spectrum_to_real(coefficients, positions, shape, scales)
    single = torch.stack(
        [
            sparse_spectrum_to_real(c, p, shape, s)
            for c, p, s in zip(coefficients, positions, scales)
        ]
    )
    assert_same_values_and_gradients(batched, single, coefficients)


def _spectral_model(method: str) -> nn.Module:
    torch.manual_seed(0)
    # Layers 0 and 4 share a shape (batched together), layer 2 is alone (built by itself).
    model = nn.Sequential(
        nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 12)
    )
    cfg = dict(type="FourierFT", n=30, alpha=20.0) if method == "FourierFT" else None
    cfg = cfg or dict(type="FoRA", rank=4, n=20, scale=2.0)
    mm_spectral.inject(model, dict(cfg, targets=["0", "2", "4"]))
    for layer in (model[0], model[2], model[4]):
        randomize_adapter(layer.adapter)
    return model


@pytest.mark.parametrize("method", ["FourierFT", "FoRA"])
def test_batched_helpers_equal_adapter_builds(method):
    model = _spectral_model(method)
    adapters = [model[0].adapter, model[4].adapter]
    if method == "FourierFT":
        for got, adapter in zip(batched_fourierft_deltas(adapters), adapters):
            torch.testing.assert_close(got, adapter.delta())
    else:
        for got, adapter in zip(batched_fora_factors(adapters), adapters):
            want = adapter.low_rank_factors()
            torch.testing.assert_close(got[0], want[0])
            torch.testing.assert_close(got[1], want[1])
            assert got[2] == want[2]


@pytest.mark.parametrize("method", ["FourierFT", "FoRA"])
def test_enable_batched_spectra_changes_nothing_but_the_launches(method):
    model = _spectral_model(method)
    x = torch.randn(5, 16)
    params = [p for n, p in model.named_parameters() if ".adapter." in n]
    y_ref = model(x)
    ref = torch.autograd.grad(y_ref.square().sum(), params)
    handle = enable_batched_spectra(model)
    try:
        y = model(x)
        got = torch.autograd.grad(y.square().sum(), params)
        left = [
            k for m in model.modules() for k in vars(m) if k.startswith(("_prebuilt", "_stash"))
        ]
        assert not left, "stash or builder left over"
        # A merged layer is not built (and its stash could never be read).
        mm_spectral.merge(model)
        torch.testing.assert_close(model(x), y_ref, rtol=1e-5, atol=1e-6)
        assert not any("_prebuilt_stash" in vars(m) for m in model.modules())
    finally:
        handle.remove()
    torch.testing.assert_close(y, y_ref)
    for g, w in zip(got, ref):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("method", ["FourierFT", "FoRA"])
def test_batched_slots_are_computed_once_and_follow_replaced_positions(method, monkeypatch):
    from mm_spectral.adapters import batched_spectra

    model = _spectral_model(method)
    x = torch.randn(5, 16)
    calls = []
    compute = batched_spectra.batched_positions
    monkeypatch.setattr(
        batched_spectra, "batched_positions", lambda *a: calls.append(1) or compute(*a)
    )
    handle = enable_batched_spectra(model)
    try:
        for _ in range(3):
            model(x).sum().backward()
        assert len(calls) == (1 if method == "FourierFT" else 2)  # once per group (and factor)
        # Other entries in one member (as a state dict of another draw would give): the
        # kept slots must follow, or the batched build differs from the layer's own.
        other = model[4].adapter
        for name in ("indices",) if method == "FourierFT" else ("a_indices", "b_indices"):
            buffer = getattr(other, name)
            setattr(other, name, torch.roll(buffer, 1, dims=-1))
        other.refresh_buffers()
        y = model(x)
    finally:
        handle.remove()
    assert len(calls) == (2 if method == "FourierFT" else 4)
    torch.testing.assert_close(y, model(x))


from mm_spectral.adapters import batched_spectra  # noqa: E402


def _same_shape_fourier_chain(layers: int) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(layers)])
    mm_spectral.inject(model, dict(type="FourierFT", n=30, alpha=20.0, targets=[r"\d+"]))
    for layer in model:
        randomize_adapter(layer.adapter)
    return model


def test_batched_builds_run_in_chunks_when_their_first_layer_runs(monkeypatch):
    """Chunks of at most max_chunk_bytes, each built by its first layer to run (so no
    forward holds every layer's ΔW); values and gradients as the layers' own builds."""
    model = _same_shape_fourier_chain(5)
    x = torch.randn(3, 16)
    params = [p for n, p in model.named_parameters() if ".adapter." in n]
    reference = torch.autograd.grad(model(x).square().sum(), params)
    stashed = []
    for layer in model:
        layer.register_forward_hook(
            lambda *_: stashed.append(["_prebuilt_stash" in vars(m.adapter) for m in model])
        )
    calls = []
    build = batched_spectra.batched_fourierft_deltas
    monkeypatch.setattr(
        batched_spectra,
        "batched_fourierft_deltas",
        lambda a, c: calls.append(len(a)) or build(a, c),
    )
    handle = enable_batched_spectra(model, max_chunk_bytes=2 * 4 * 16 * 16)  # 2 layers' ΔW
    try:
        got = torch.autograd.grad(model(x).square().sum(), params)
    finally:
        handle.remove()
    # layer 0 alone, chunks [1, 2] and [3, 4] (the smallest at the end): after layer 1
    # runs, layer 2 holds its ΔW
    after = [[False] * 5, [False, False, True, False, False], [False] * 5,
             [False, False, False, False, True], [False] * 5]  # fmt: skip
    assert stashed == after
    assert calls == [2, 2]
    for g, w in zip(got, reference):
        torch.testing.assert_close(g, w)


def test_chunks_shrink_toward_the_end_of_the_forward():
    """A chunk lives from its first layer to its last: sizes double from the last layers
    back (from an eighth of the byte cap, at least 2) up to the cap, so near the
    activations' peak at the end of the forward only small chunks are alive; every layer in
    exactly one chunk, in order."""
    layers = [m.adapter for m in _same_shape_fourier_chain(24)]
    per_layer = 4 * 16 * 16
    cases = ((16, [10, 8, 4, 2]), (64, [16, 8]), (3, [1, *[3] * 7, 2]), (1, [1] * 24))
    for cap_layers, want in cases:
        got = batched_spectra.chunks(layers, cap_layers * per_layer)
        assert [len(c) for c in got] == want
        assert [a for c in got for a in c] == layers
    assert [len(c) for c in batched_spectra.chunks(layers[:7], 16 * per_layer)] == [5, 2]


def test_spectral_groups_follow_module_order_and_skip_merged_and_shared_layers():
    """The planning walk (run before every forward) finds each unmerged same-shape
    spectral adapter once, in module order, also through nested containers."""
    chain = _same_shape_fourier_chain(5)
    model = nn.Sequential(nn.Sequential(chain[0], chain[1]), nn.ModuleList([chain[2], chain[3]]))
    model.append(chain[4])
    model.append(chain[1])  # shared: the same layer twice in the tree
    chain[3].merge()
    ((kind, members),) = batched_spectra._groups(model)
    assert kind == "FourierFT"
    assert members == [chain[i].adapter for i in (0, 1, 2, 4)]


def test_a_chunk_is_freed_once_its_last_layer_has_run(monkeypatch):
    """No forward holds every layer's ΔW: a chunk's storage dies when its layers have run,
    before the forward ends (the peak), and its gradient still reaches every coefficient."""
    import weakref

    model = _same_shape_fourier_chain(4)
    built = []
    build = batched_spectra.batched_sparse_spectrum_to_real

    def recorded(*args, **kwargs):
        out = build(*args, **kwargs)
        built.append(weakref.ref(out))
        return out

    monkeypatch.setattr(batched_spectra, "batched_sparse_spectrum_to_real", recorded)
    alive_after = []
    for layer in model:
        layer.register_forward_hook(lambda *_: alive_after.append([r() is not None for r in built]))
    handle = enable_batched_spectra(model, max_chunk_bytes=2 * 4 * 16 * 16)  # chunks of 2
    try:
        model(torch.randn(3, 16)).square().sum().backward()
    finally:
        handle.remove()
    assert alive_after == [[True], [False], [False, True], [False, False]]
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if ".adapter." in n)  # fmt: skip


def test_a_stash_built_without_gradient_waits_for_a_build_with_it():
    """Under a reentrant checkpoint the first pass runs without gradient: the chunk its
    layer builds must not serve a later layer that runs with gradient."""
    from torch.utils.checkpoint import checkpoint

    model = _same_shape_fourier_chain(2)
    x = torch.randn(3, 16, requires_grad=True)
    params = [p for n, p in model.named_parameters() if ".adapter." in n]

    def grads() -> list[torch.Tensor]:  # a reentrant checkpoint works with backward() only
        model[1](checkpoint(model[0], x, use_reentrant=True)).square().sum().backward()
        out = [p.grad for p in params]
        model.zero_grad(set_to_none=True)
        return out

    reference = grads()
    assert batched_spectra.plan_batched_spectra(model) == 2  # what the model's pre-hook does
    got = grads()
    for g, w in zip(got, reference):
        torch.testing.assert_close(g, w)
    with torch.no_grad():
        stash(model[0].adapter, "no-grad build")
    assert take_stash(model[0].adapter) is None
    with torch.no_grad():
        stash(model[0].adapter, "no-grad build")
        assert take_stash(model[0].adapter) == "no-grad build"


def test_a_stale_stash_is_never_read():
    model = _spectral_model("FourierFT")
    adapter = model[0].adapter
    stash(adapter, torch.zeros(12, 16))
    with torch.no_grad():
        adapter.coefficients.add_(1.0)  # an optimizer step in between
    assert take_stash(adapter) is None
    stash(adapter, "prebuilt")
    assert take_stash(adapter) == "prebuilt"
    assert take_stash(adapter) is None, "a stash is taken once"


# --- dispatch and optional Triton -------------------------------------------------------------


def test_dispatch_modes():
    x, w, up = torch.randn(8, 64), torch.randn(64, 64), torch.randn(64, 4)
    assert fused_low_rank_mode() == "auto"
    assert not use_fused_low_rank(x, w, up), "CPU tensors never take the kernels in 'auto'"
    previous = set_fused_low_rank_mode("off")
    try:
        assert not use_fused_low_rank(x, w, up)
        set_fused_low_rank_mode("force")
        assert use_fused_low_rank(x, w, up) == HAS_TRITON
        set_fused_low_rank_mode("on")
        assert not use_fused_low_rank(x, w, up), "'on' still needs CUDA half-precision tensors"
        with pytest.raises(ValueError, match="one of"):
            set_fused_low_rank_mode("fast")
    finally:
        set_fused_low_rank_mode(previous)


def test_package_works_without_triton():
    """With triton unimportable, mm_spectral imports and 'force' falls back to torch."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, mm_spectral\n"
        "from mm_spectral.kernels import set_fused_low_rank_mode, triton_available\n"
        "from mm_spectral.adapters.functional import low_rank_linear\n"
        "assert not triton_available()\n"
        "set_fused_low_rank_mode('force')\n"
        "x = torch.randn(5, 8, requires_grad=True)\n"
        "a, b = torch.randn(2, 8, requires_grad=True), torch.randn(6, 2, requires_grad=True)\n"
        "low_rank_linear(x, torch.randn(6, 8), None, a, b, 1.0).sum().backward()\n"
        "assert a.grad is not None and x.grad is not None\n"
        "print('ok')\n"
    )
    assert run_python("-c", code, interpret=False).strip().endswith("ok")


# --- the benchmark ---------------------------------------------------------------------------


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="the interpreted smoke run is for machines without a GPU"
)
def test_benchmark_smoke_run():
    """tools/benchmark_kernels.py --device cpu --tiny runs every row (kernels interpreted)."""
    out = run_python("tools/benchmark_kernels.py", "--device", "cpu", "--tiny", interpret=True)
    assert "### step tiny" in out and "### FourierFT coefficient gradient" in out
    rows = [
        line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| case")
    ]
    names = {line.split("|")[1].strip().split(" (rel.")[0] for line in rows}
    expected = {FLOOR_ROW, "LoRA torch", "FourierFT dense", "FourierFT sampled",
                "dense: gᵀx GEMM + rfft2 + gather", "one batched irfft2"}  # fmt: skip
    if HAS_TRITON:
        expected |= {"LoRA fused, cuBLAS strategy", "sampled, fused kernel (TF32 DFT)"}
    assert expected <= names, names
    for line in rows:
        assert "failed" not in line, line
        value = float(line.split("|")[2])
        assert math.isfinite(value) and value > 0, line


FLOOR_ROW = "floor (frozen linear)"
