"""Host cost of issuing work: microseconds per op and per adapted-layer step (GPU).

Where a training step is host-bound (eager ViT-L with an adapter on every linear), its
time is the sum of what each op costs the host to issue, not the GPU's arithmetic. This
measures that cost directly: every tensor is tiny, so the GPU finishes each op before the
host issues the next, and the time per call is the host's. Two tables:

- single ops: casts, elementwise, each GEMM form, a Triton launch;
- one adapted linear's forward + backward under bf16 autocast above a frozen linear's:
  full fine-tuning, LoRA, DoRA, FLoRA (each through the C++ autograd node and through
  the Python function), LoRA with the fused kernels forced on for eager steps,
  and LoRA with the frozen weights stored in bf16 (no cast per step).

    python tools/benchmark_dispatch.py
    python tools/benchmark_dispatch.py --device cpu --calls 50   # smoke run (tested)
"""

from __future__ import annotations

import argparse
import os.path as osp
import sys
import time
from collections.abc import Callable

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import mm_spectral  # noqa: E402
from mm_spectral.kernels import (  # noqa: E402
    native_mode,
    set_fused_low_rank_mode,
    set_native_mode,
    triton_available,
)
from tools.benchmark import require_native_nodes, synchronize  # noqa: E402


def per_call_us(
    fn: Callable[[], object], device: str, calls: int, rounds: int = 3, warmup: int | None = None
) -> float:
    """Best of ``rounds`` averages of ``calls`` back-to-back calls, in µs (no sync between
    calls: with tiny tensors the host, not the GPU, sets the pace), after ``warmup`` calls
    (default: a tenth of ``calls``, at least 5)."""
    for _ in range(max(5, calls // 10) if warmup is None else warmup):
        fn()
    best = float("inf")
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def op_table(device: str, calls: int, width: int) -> list[tuple[str, float]]:
    """(op, µs per call) for the ops an adapted layer issues."""
    half = torch.bfloat16
    a = torch.randn(width, width, device=device, dtype=half)
    b = torch.randn(width, width, device=device, dtype=half)
    bias = torch.randn(width, device=device, dtype=half)
    master = torch.randn(width, width, device=device)
    thin = torch.randn(width, 16, device=device, dtype=half)
    out = torch.empty(width, width, device=device, dtype=half)
    ops: list[tuple[str, Callable[[], object]]] = [
        ("empty (allocator)", lambda: torch.empty(width, width, device=device, dtype=half)),
        ("cast float32 → bf16", lambda: master.to(half)),
        ("add", lambda: a + b),
        ("sum over rows", lambda: a.sum(0)),
        ("mm", lambda: torch.mm(a, b)),
        ("mm, thin (× 16 columns)", lambda: torch.mm(a, thin)),
        ("addmm (bias)", lambda: torch.addmm(bias, a, b)),
        ("addmm_ (in place)", lambda: out.addmm_(a, b)),
        ("F.linear (bias)", lambda: F.linear(a, b, bias)),
    ]
    if device.startswith("cuda"):
        ops.append(("mm, float32 out", lambda: torch.mm(a, b, torch.float32)))
        if triton_available():
            ops.append(("Triton kernel launch", triton_launch(a, out)))
    return [(name, per_call_us(fn, device, calls)) for name, fn in ops]


def triton_launch(a: torch.Tensor, out: torch.Tensor) -> Callable[[], object]:
    """A one-program Triton copy kernel, launched through its JIT wrapper (what every
    Triton launch pays on top of the GPU's work)."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy_kernel(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)

    return lambda: copy_kernel[(1,)](a, out, 64, BLOCK=64)


LORA = dict(type="LoRA", rank=16, alpha=16)
FLORA = dict(type="FLoRA", rank=16, kernel_rank=2, scale=4.0)
DORA = dict(type="DoRA", rank=16, alpha=16)
LAYER_VARIANTS: dict[str, tuple[dict | None, str | None, str | None]] = {
    # name: (adapter config or None for full fine-tuning, fused low-rank mode to force,
    # native mode to force: "off" = the Python autograd function instead of the C++ node)
    "full fine-tuning": (None, None, None),
    "LoRA r16": (LORA, None, None),
    "LoRA r16, Python autograd function": (LORA, None, "off"),
    "LoRA r16, fused kernels forced on": (LORA, "on", None),
    "DoRA r16": (DORA, None, None),
    "DoRA r16, Python autograd function": (DORA, None, "off"),
    "FLoRA r16": (FLORA, None, None),
    "FLoRA r16, Python autograd function": (FLORA, None, "off"),
}


def layer_stack(
    depth: int, width: int, cfg: dict | None, trainable: bool, device: str, frozen_dtype=None
) -> nn.Module:
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(depth)))
    model.requires_grad_(trainable)
    if cfg is not None:
        mm_spectral.inject(model, dict(cfg, targets=[r"\d+"]))
    if frozen_dtype is not None:
        mm_spectral.cast_frozen(model, frozen_dtype)
    return model.to(device)


def stack_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of the stack under bf16 autocast (parameter gradients
    dropped each step, as zero_grad(set_to_none=True) does)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            y = model(x)
        y.float().sum().backward()
        for p in params:
            p.grad = None
        x.grad = None

    return step


def interleaved_best_us(
    fns: list[Callable[[], object]], device: str, calls: int, rounds: int = 5
) -> list[float]:
    """:func:`per_call_us` of each callable with their rounds alternating, so that a busy
    spell of the host hits all alike instead of one of them (the per-layer differences
    below subtract two such timings)."""
    for fn in fns:
        for _ in range(max(5, calls // 10)):
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], per_call_us(fn, device, calls, rounds=1, warmup=0))
    return best


def layer_table(device: str, calls: int, width: int, tokens: int) -> list[tuple[str, float]]:
    """(variant, µs per layer): the difference between stacks of 16 and 8 layers (what the
    loss and the backward call cost cancels out), for the frozen linear itself and, for
    the others, above it (above the bf16-stored frozen linear for the bf16 row)."""
    x = torch.randn(tokens, width, device=device, requires_grad=True)

    def per_layer(cfg: dict | None, trainable: bool, frozen_dtype=None) -> float:
        deep, shallow = (
            stack_step(layer_stack(d, width, cfg, trainable, device, frozen_dtype), x)
            for d in (16, 8)
        )
        deep_us, shallow_us = interleaved_best_us([deep, shallow], device, calls)
        return (deep_us - shallow_us) / 8

    frozen = per_layer(None, False)
    frozen_half = per_layer(None, False, torch.bfloat16)
    rows = [
        ("frozen linear (absolute)", frozen),
        ("frozen linear, weights stored bf16 (absolute)", frozen_half),
    ]
    for name, (cfg, fused, native) in LAYER_VARIANTS.items():
        if fused and not (device.startswith("cuda") and triton_available()):
            continue
        previous_fused = set_fused_low_rank_mode(fused) if fused else None
        previous_native = set_native_mode(native) if native else None
        try:
            rows.append((name, per_layer(cfg, cfg is None) - frozen))
        finally:
            if previous_fused is not None:
                set_fused_low_rank_mode(previous_fused)
            if previous_native is not None:
                set_native_mode(previous_native)
    rows.append(
        ("LoRA r16, frozen weights bf16", per_layer(LORA, False, torch.bfloat16) - frozen_half)
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--calls", type=int, default=400, help="calls per timing round")
    parser.add_argument("--width", type=int, default=64, help="features (tiny: host-bound)")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    native = f"{native_mode()}, {require_native_nodes()}"
    ops = op_table(args.device, args.calls, args.width)
    layers = layer_table(args.device, max(1, args.calls // 8), args.width, args.tokens)
    print(f"native nodes: {native}")
    print(f"\n### Host µs per op ({args.width}×{args.width} bf16) — {name}\n")
    print("| op | µs |\n|---|---|")
    for op, us in ops:
        print(f"| {op} | {us:.1f} |")
    print(
        f"\n### Host µs per adapted linear, forward + backward ({args.tokens} tokens × "
        f"{args.width}, bf16 autocast; rows below the first two: above a frozen linear) — {name}\n"
    )
    print("| variant | µs |\n|---|---|")
    for variant, us in layers:
        print(f"| {variant} | {us:.1f} |")


if __name__ == "__main__":
    main()
