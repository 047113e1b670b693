"""One optimizer step over an adapted backbone's trainable tensors: host time and time until
the device is idle, for torch's fused and foreach AdamW and mm_spectral's FlatAdamW (GPU).

An eager step of a host-bound backbone (ViT-L with an adapter on every linear) pays the
optimizer's host time in full; MMEngine builds torch's foreach AdamW from
``type='AdamW'``. The tensors are the real ones (each adapter at the papers' settings on
the backbones of ``tools/benchmark.py``), with fixed random gradients.

    python tools/benchmark_optimizer.py                          # ConvNeXt-V2-L and ViT-L
    python tools/benchmark_optimizer.py --only ViT --variants LoRA DoRA
    python tools/benchmark_optimizer.py --tiny --device cpu      # smoke run
"""

from __future__ import annotations

import argparse
import os.path as osp
import statistics
import sys
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402

from tools.benchmark import (  # noqa: E402
    ADAPTERS,
    BACKBONES,
    TINY,
    TINY_ADAPTERS,
    build,
    make_optimizer,
    synchronize,
    variant,
)

KINDS = ("fused", "foreach", "flat")


def time_optimizer(
    params: list[torch.nn.Parameter], kind: str, device: str, warmup: int, iters: int
) -> tuple[float, float, float]:
    """Median ms of (``step()`` on the host, ``zero_grad()`` on the host, step until idle)."""
    optimizer = make_optimizer(params, kind, device.split(":")[0])
    gen = torch.Generator(device=device).manual_seed(0)
    grads = [torch.randn(p.shape, device=device, dtype=p.dtype, generator=gen) for p in params]
    host, zero, idle = [], [], []
    for i in range(warmup + iters):
        for p, g in zip(params, grads):
            p.grad = g
        synchronize(device)
        start = time.perf_counter()
        optimizer.step()
        stepped = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        zeroed = time.perf_counter()
        synchronize(device)
        done = time.perf_counter()
        if i >= warmup:
            host.append(stepped - start)
            zero.append(zeroed - stepped)
            idle.append(done - start - (zeroed - stepped))
    return tuple(1e3 * statistics.median(t) for t in (host, zero, idle))  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny backbones for a smoke run")
    parser.add_argument("--only", default=None, help="backbones whose name contains this")
    parser.add_argument("--variants", nargs="*", default=None, help="adapters by name prefix")
    parser.add_argument("--optimizers", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args(argv)
    adapters = TINY_ADAPTERS if args.tiny else ADAPTERS
    if args.variants:
        adapters = {
            n: c for n, c in adapters.items() if any(n.startswith(v) for v in args.variants)
        }
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    rows = []
    for spec in TINY if args.tiny else BACKBONES:
        if args.only and args.only not in spec.name:
            continue
        torch.manual_seed(0)
        base = build(spec).train()
        for name, cfg in adapters.items():
            model = variant(base, spec, cfg, args.device)
            params = [p for p in model.parameters() if p.requires_grad]
            for kind in args.optimizers:
                for p in params:  # each optimizer from the same starting point
                    p.grad = None
                times = time_optimizer(params, kind, args.device, args.warmup, args.iters)
                rows.append((spec.name, name, len(params), kind, *times))
                print(rows[-1], flush=True)
            del model, params
    print(
        f"\n### One AdamW step over the trainable tensors — {device_name}, torch {torch.__version__}\n"
    )
    print(
        "| backbone | adapter | tensors | optimizer | step, host (ms) | zero_grad, host (ms) | step until idle (ms) |"
    )
    print("|---|---|---|---|---|---|---|")
    for backbone, name, count, kind, host, zero, idle in rows:
        label = {"flat": "FlatAdamW", "fused": "AdamW fused", "foreach": "AdamW foreach"}[kind]
        print(f"| {backbone} | {name} | {count} | {label} | {host:.3f} | {zero:.3f} | {idle:.3f} |")


if __name__ == "__main__":
    main()
