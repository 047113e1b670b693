"""Checks of the Triton kernels against the plain-torch path, run as a script.

``TRITON_INTERPRET`` is read when ``triton.jit`` decorates a kernel, so these checks run in
a subprocess started with ``TRITON_INTERPRET=1`` (see tests/test_kernels.py) and leave the
rest of the suite unaffected; on a GPU the same script runs the compiled kernels. The
interpreter runs dots in numpy, which has no bfloat16: on the CPU the kernels are checked
in float32 (compiled for the dtype passed, so the same code paths run).

    TRITON_INTERPRET=1 python tests/kernel_checks.py forward backward linear spectral
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from mm_spectral.adapters.functional import low_rank_linear
from mm_spectral.kernels import set_fused_low_rank_mode
from mm_spectral.kernels.dispatch import OPTIONS

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
        (True, False, True, True),
        (False, False, True, True),
        (True, False, False, False),
        (False, True, False, True),
        (False, False, False, True),
        (False, False, True, False),
    ]
    for kind, g in grads.items():
        gh = g @ up
        want = (g @ w + SCALE * gh @ down, g.sum(0), SCALE * gh.t() @ x, SCALE * g.t() @ h)
        for fuse_gh in (False, True):
            for flags in flag_sets:
                got = low_rank_backward(g, x, w, down, up, h, SCALE, *flags, fuse_gh=fuse_gh)
                names = ("dx", "d_bias", "d_down", "d_up")
                for name, value, ref, flag in zip(names, got, want, flags):
                    what = f"backward {name} ({kind} grad, fuse_gh={fuse_gh}, needs={flags})"
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
    # (leading shape, bias, trainable weight, fuse_down, fuse_gh): 2-D and 3-D inputs
    # (3·13 = 39 tokens), each option on and off at least once.
    cases = [
        ((M,), True, False, False, False),
        ((M,), False, True, True, True),
        ((M,), False, False, True, False),
        ((3, 13), True, True, True, True),
        ((3, 13), False, False, False, False),
        ((3, 13), True, False, False, True),
    ]
    for shape, with_bias, train_weight, fuse_down, fuse_gh in cases:
        OPTIONS.fuse_down, OPTIONS.fuse_gh = fuse_down, fuse_gh
        x = randn(*shape, K).requires_grad_()
        w = randn(N, K).requires_grad_(train_weight)
        b = randn(N).requires_grad_() if with_bias else None
        down, up = randn(R, K).requires_grad_(), randn(N, R).requires_grad_()
        # A non-contiguous gradient of the output.
        grad_out = randn(*shape[:-1], N, shape[-1]).transpose(-1, -2)
        y, grads = _linear_grads(x, w, b, down, up, grad_out, "force")
        y_ref, grads_ref = _linear_grads(x, w, b, down, up, grad_out, "off")
        what = f"linear {shape + (K,)} bias={with_bias} train_w={train_weight}"
        what += f" fuse_down={fuse_down} fuse_gh={fuse_gh}"
        assert y.shape == y_ref.shape, what
        close(y, y_ref, what + " y")
        assert len(grads) == len(grads_ref) == 3 + with_bias + train_weight
        for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
            assert g.shape == g_ref.shape, f"{what} grad {i}"
            close(g, g_ref, f"{what} grad {i}")
    OPTIONS.fuse_down = OPTIONS.fuse_gh = False


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


def main(names: list[str]) -> None:
    torch.manual_seed(0)
    for name in names or list(CHECKS):
        CHECKS[name]()
        print(f"ok {name}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
