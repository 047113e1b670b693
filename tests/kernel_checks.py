"""Checks of the Triton kernels against the plain-torch path, run as a script.

``TRITON_INTERPRET`` is read when ``triton.jit`` decorates a kernel, so these checks run in
a subprocess started with ``TRITON_INTERPRET=1`` (see tests/test_kernels.py) and leave the
rest of the suite unaffected; on a GPU the same script runs the compiled kernels. The
interpreter runs dots in numpy, which has no bfloat16: on the CPU the kernels are checked
in float32 (compiled for the dtype passed, so the same code paths run).

    TRITON_INTERPRET=1 python tests/kernel_checks.py forward backward passes cublas linear spectral
"""

from __future__ import annotations

import os.path as osp
import sys
import traceback
from collections.abc import Callable

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # the repository

import torch  # noqa: E402

from mm_spectral.adapters.functional import (  # noqa: E402
    low_rank_linear,
    rescaled_low_rank_linear,
)
from mm_spectral.kernels import set_fused_low_rank_mode  # noqa: E402
from mm_spectral.kernels.dispatch import OPTIONS  # noqa: E402

# Tiny and ragged: every dimension spans several 16-wide interpreter tiles plus a remainder.
M, K, N, R = 37, 48, 40, 4
SCALE = 0.7
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32
TOL = dict(rtol=1e-4, atol=1e-4)

CHECKS: dict[str, Callable[[], None]] = {}


def check(fn: Callable[[], None]) -> Callable[[], None]:
    CHECKS[fn.__name__.removeprefix("check_")] = fn
    return fn


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE)


def close(got: torch.Tensor | None, want: torch.Tensor, what: str) -> None:
    assert got is not None, f"{what}: no result"
    assert want.abs().max() > 0, f"{what}: the reference is zero, the check would prove nothing"
    torch.testing.assert_close(got.to(want.dtype), want, **TOL, msg=lambda m: f"{what}: {m}")


@check
def check_forward() -> None:
    from mm_spectral.kernels.low_rank_forward import low_rank_forward

    x_wide = randn(M, 2 * K)
    x = x_wide[:, ::2]  # non-contiguous input
    w, b, down, up = randn(N, K), randn(N), randn(R, K), randn(N, R)
    h_ref = x @ down.t()
    for fuse_down in (False, True):
        for bias in (b, None):
            y, h = low_rank_forward(x, w, bias, down, up, SCALE, fuse_down=fuse_down)
            want = x @ w.t() + SCALE * h_ref @ up.t() + (0 if bias is None else bias)
            what = f"forward fuse_down={fuse_down} bias={bias is not None}"
            close(y, want, what)
            close(h, h_ref, what + " h")


@check
def check_backward() -> None:
    from mm_spectral.kernels.low_rank_backward import low_rank_backward

    x, w, down, up = randn(M, K), randn(N, K), randn(R, K), randn(N, R)
    h = x @ down.t()
    grads = {
        "non-contiguous": randn(N, M).t(),
        "expanded (stride 0)": randn(1, N).expand(M, N),
    }
    flag_sets = [
        (True, True, True, True),
        (False, False, True, True),
        (True, False, False, False),
        (False, True, False, True),
    ]
    for kind, g in grads.items():
        gh = g @ up
        want = (g @ w + SCALE * gh @ down, g.sum(0), SCALE * gh.t() @ x, SCALE * g.t() @ h)
        for flags in flag_sets:
            got = low_rank_backward(g, x, w, down, up, h, SCALE, *flags)
            names = ("dx", "d_bias", "d_down", "d_up")
            for name, value, ref, flag in zip(names, got, want, flags):
                what = f"backward {name} ({kind} grad, needs={flags})"
                if flag:
                    close(value, ref, what)
                else:
                    assert value is None, what


@check
def check_passes() -> None:
    """The memory-bound passes: h (and [x | h]), gh / d_up / d_bias (and [g | s·gh]), d_down."""
    from mm_spectral.kernels.low_rank_passes import down_grad, down_projection, grad_out_pass

    x = randn(M, 2 * K)[:, ::2]  # non-contiguous
    down, up = randn(R, K), randn(N, R)
    h_ref = x @ down.t()
    close(down_projection(x, down), h_ref, "h")
    cat = torch.full((M, K + R), float("nan"), device=DEVICE, dtype=DTYPE)
    h = down_projection(x, down, cat_out=cat)
    close(h, h_ref, "h into [x | h]")
    assert h.data_ptr() == cat[:, K:].data_ptr()
    close(cat[:, :K], x, "x copied into [x | h]")
    g = randn(N, M).t()
    gh_ref = g @ up
    wants = {"gh": gh_ref, "d_up": SCALE * g.t() @ h_ref, "d_bias": g.sum(0)}
    pass_flags = [
        (True, True, True), (True, False, False), (False, True, False), (False, False, True)
    ]  # fmt: skip
    for flags in pass_flags:
        got = grad_out_pass(g, up, h_ref, SCALE, *flags)
        for (name, want), flag, value in zip(wants.items(), flags, got):
            if flag:
                close(value, want, f"grad_out_pass {name} (needs {flags})")
            else:
                assert value is None
    g_cat = torch.full((M, N + R), float("nan"), device=DEVICE, dtype=DTYPE)
    gh, d_up, d_bias = grad_out_pass(g, up, h_ref, SCALE, True, True, True, cat_out=g_cat)
    close(gh, SCALE * gh_ref, "s·gh into [g | s·gh]")
    close(g_cat[:, :N], g, "g copied into [g | s·gh]")
    close(d_up, wants["d_up"], "d_up (cat)")
    close(d_bias, wants["d_bias"], "d_bias (cat)")
    close(down_grad(gh_ref, x, SCALE), SCALE * gh_ref.t() @ x, "d_down")


@check
def check_cublas() -> None:
    """cuBLAS strategy: both layouts of the forward (k ≤ n, k > n) and of the backward."""
    from mm_spectral.kernels.low_rank_cublas import cublas_backward, cublas_forward

    for k, n in ((K, N), (N, K)):  # 48 → 40 and 40 → 48
        x, w32, b = randn(M, k), randn(n, k).double(), randn(n)
        down, up = randn(R, k), randn(n, R)
        w = w32.to(DTYPE)
        h_ref = x @ down.t()
        y, x_saved, w_saved, h = cublas_forward(x, w32, b, down, up, SCALE)
        close(y, x @ w.t() + b + SCALE * h_ref @ up.t(), f"cublas y {k}->{n}")
        close(h, h_ref, f"cublas h {k}->{n}")
        close(x_saved, x, f"cublas saved x {k}->{n}")
        assert w_saved.dtype == DTYPE
        g = randn(n, M).t()
        gh = g @ up
        want = (g @ w + SCALE * gh @ down, g.sum(0), SCALE * gh.t() @ x, SCALE * g.t() @ h_ref)
        flag_sets = [
            (True, True, True, True), (False, False, True, True), (True, False, False, True)
        ]  # fmt: skip
        for flags in flag_sets:
            got = cublas_backward(g, x_saved, w_saved, down, up, h, SCALE, *flags)
            for name, value, ref, flag in zip(("dx", "d_bias", "d_down", "d_up"), got, want, flags):
                what = f"cublas backward {name} {k}->{n} needs={flags}"
                if flag:
                    close(value, ref, what)
                else:
                    assert value is None, what


def _linear_grads(x, w, b, down, up, grad_out, mode: str):
    previous = set_fused_low_rank_mode(mode)
    try:
        inputs = [
            None if t is None else t.detach().clone().requires_grad_(t.requires_grad)
            for t in (x, w, b, down, up)
        ]
        y = low_rank_linear(*inputs, SCALE)
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        grads = torch.autograd.grad(y, wanted, grad_out)
        return y.detach(), grads
    finally:
        set_fused_low_rank_mode(previous)


@check
def check_linear() -> None:
    """LowRankLinear through the kernels ('force') equals its torch path ('off')."""
    # (leading shape, bias, trainable weight, strategy, fuse_down): 2-D and 3-D inputs
    # (3·13 = 39 tokens), each option on and off at least once.
    cases = [
        ((M,), True, False, "triton", False),
        ((M,), False, True, "triton", True),
        ((3, 13), True, True, "triton", True),
        ((3, 13), False, False, "triton", False),
        ((M,), True, True, "cublas", False),
        ((3, 13), False, False, "cublas", False),
    ]
    for shape, with_bias, train_weight, strategy, fuse_down in cases:
        OPTIONS.strategy, OPTIONS.fuse_down = strategy, fuse_down
        for k, n in ((K, N), (N, K)) if strategy == "cublas" else ((K, N),):
            x = randn(*shape, k).requires_grad_()
            w = randn(n, k).requires_grad_(train_weight)
            b = randn(n).requires_grad_() if with_bias else None
            down, up = randn(R, k).requires_grad_(), randn(n, R).requires_grad_()
            # A non-contiguous gradient of the output.
            grad_out = randn(*shape[:-1], n, shape[-1]).transpose(-1, -2)
            y, grads = _linear_grads(x, w, b, down, up, grad_out, "force")
            y_ref, grads_ref = _linear_grads(x, w, b, down, up, grad_out, "off")
            what = f"linear {shape + (k,)}->{n} bias={with_bias} train_w={train_weight}"
            what += f" {strategy} fuse_down={fuse_down}"
            assert y.shape == y_ref.shape, what
            close(y, y_ref, what + " y")
            assert len(grads) == len(grads_ref) == 3 + with_bias + train_weight
            for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
                assert g.shape == g_ref.shape, f"{what} grad {i}"
                close(g, g_ref, f"{what} grad {i}")
    OPTIONS.strategy, OPTIONS.fuse_down = "cublas", False


@check
def check_spectral() -> None:
    """The fused sampled-spectrum gradient equals the float64 torch route."""
    from mm_spectral.adapters.spectral import sample_entries
    from mm_spectral.kernels.spectral_grad import sampled_spectrum_grad
    from mm_spectral.kernels.spectral_grad_kernel import fused_spectrum_grad

    # (tokens, out, in, n): a padded first step (48 = 3·16), a one-row first step (64),
    # a non-power-of-two width (80 = 5·16).
    for t, o, i, n in ((7, 48, 32, 30), (5, 64, 80, 200)):
        indices = sample_entries(o, i, n, seed=o + i).to(DEVICE)
        g = randn(o, t).t()  # non-contiguous
        x = randn(t, i)
        want = sampled_spectrum_grad(g.double(), x.double(), indices, 2.5)
        modes = (False, True) if DEVICE == "cuda" else (False,)  # bf16 dots: GPU only
        for bf16 in modes:
            got = fused_spectrum_grad(g, x, indices, 2.5, bf16=bf16)
            # TF32 on a GPU (10-bit mantissa), exact float32 in the interpreter, bf16 loose.
            tol = 3e-2 if bf16 else (3e-3 if DEVICE == "cuda" else 1e-5)
            err = (got.double() - want).abs().max() / want.abs().max()
            assert err < tol, f"spectral grad {(t, o, i, n)} bf16={bf16}: rel. error {err:.2e}"


def _dora_reference(x, w, b, down, up, magnitude, scale):
    """DoRA's linear composed in plain torch: W' = m ⊙ (W + sBA) / ‖W + sBA‖_c (detached)."""
    direction = w + scale * up @ down
    channel = magnitude / direction.detach().norm(dim=1)
    return torch.nn.functional.linear(x, direction * channel[:, None], b)


def _dora_inputs(shape, k, n, with_bias, train_weight):
    x = randn(*shape, k).requires_grad_()
    w = randn(n, k).requires_grad_(train_weight)
    b = randn(n).requires_grad_() if with_bias else None
    down, up = randn(R, k).requires_grad_(), randn(n, R).requires_grad_()
    magnitude = (randn(n).abs() + 0.5).requires_grad_()
    return x, w, b, down, up, magnitude


def _dora_grads(inputs, grad_out, mode: str | None):
    """Output and input gradients of the DoRA node (``mode``: fused-kernel mode) or, for
    None, of the composed reference."""
    inputs = [
        None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in inputs
    ]
    x, w, b, down, up, magnitude = inputs
    if mode is None:
        y = _dora_reference(x, w, b, down, up, magnitude, SCALE)
    else:
        previous = set_fused_low_rank_mode(mode)
        try:
            direction = (w + SCALE * up @ down).detach()
            inv_norm = 1 / direction.float().norm(dim=1)
            y = rescaled_low_rank_linear(x, w, b, down, up, SCALE, magnitude, inv_norm)
        finally:
            set_fused_low_rank_mode(previous)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return y.detach(), torch.autograd.grad(y, wanted, grad_out)


@check
def check_rescaled() -> None:
    """DoRA's one-node linear: fused kernels ('force') and torch path ('off') both equal
    the composed reference (values and every gradient, magnitude included)."""
    cases = [
        ((M,), True, False, "triton"),
        ((3, 13), False, True, "cublas"),
        ((M,), True, True, "cublas"),
    ]
    for shape, with_bias, train_weight, strategy in cases:
        OPTIONS.strategy = strategy
        inputs = _dora_inputs(shape, K, N, with_bias, train_weight)
        grad_out = randn(*shape, N)
        y_ref, grads_ref = _dora_grads(inputs, grad_out, None)
        for mode in ("force", "off"):
            y, grads = _dora_grads(inputs, grad_out, mode)
            what = f"DoRA {shape} bias={with_bias} train_w={train_weight} {strategy} {mode}"
            close(y, y_ref, what + " y")
            assert len(grads) == len(grads_ref) == 4 + with_bias + train_weight, what
            for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
                close(g, g_ref, f"{what} grad {i}")
    OPTIONS.strategy = "cublas"


@check
def check_autocast() -> None:
    """LoRA and DoRA linears under bf16 autocast (the torch path, and on a GPU the fused
    kernels too): float32 gradients for the float32 factors, equal to the float32
    reference to bf16 precision."""
    global DTYPE
    k, n, tokens = 128, 192, 256
    modes = ("off", "on") if DEVICE == "cuda" else ("off",)
    DTYPE = torch.float32
    inputs = _dora_inputs((tokens,), k, n, True, False)
    grad_out = randn(tokens, n)
    x, w, b, down, up, magnitude = inputs
    for method in ("LoRA", "DoRA"):
        if method == "LoRA":
            ref_in = [
                t.detach().clone().requires_grad_(t.requires_grad) for t in (x, w, b, down, up)
            ]
            y_ref = torch.nn.functional.linear(
                ref_in[0], ref_in[1] + SCALE * ref_in[4] @ ref_in[3], ref_in[2]
            )
            grads_ref = torch.autograd.grad(
                y_ref, [ref_in[0], ref_in[2], ref_in[3], ref_in[4]], grad_out
            )
        else:
            _, grads_ref = _dora_grads(inputs, grad_out, None)
        for mode in modes:
            previous = set_fused_low_rank_mode(mode)
            try:
                run = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
                with torch.autocast(DEVICE, dtype=torch.bfloat16):
                    if method == "LoRA":
                        y = low_rank_linear(*run[:5], SCALE)
                    else:
                        direction = (run[1] + SCALE * run[4] @ run[3]).detach()
                        inv_norm = 1 / direction.norm(dim=1)
                        y = rescaled_low_rank_linear(*run[:5], SCALE, run[5], inv_norm)
                used = run[:5] if method == "LoRA" else run
                wanted = [t for t in used if t.requires_grad]
                grads = torch.autograd.grad(y, wanted, grad_out.to(y.dtype))
            finally:
                set_fused_low_rank_mode(previous)
            assert y.dtype == torch.bfloat16
            for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
                what = f"{method} autocast {mode} grad {i}"
                assert g.dtype == wanted[i].dtype, f"{what}: {g.dtype}"
                scale = g_ref.abs().max().item()
                torch.testing.assert_close(
                    g.float(),
                    g_ref,
                    rtol=3e-2,
                    atol=3e-2 * scale,
                    msg=lambda m, w=what: f"{w}: {m}",
                )


def main(names: list[str]) -> int:
    """Run the checks named (all by default); print 'ok NAME' or 'FAIL NAME' for each."""
    failed = 0
    for name in names or list(CHECKS):
        torch.manual_seed(0)
        try:
            CHECKS[name]()
        except Exception:
            failed += 1
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
        else:
            print(f"ok {name}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
