"""Microbenchmark of one adapted linear's training step: the Triton kernels against torch.

For ViT-L/16 shapes (4 images × 1025 tokens, width 1024, MLP 4096, LoRA rank 16, bf16) it
times forward + backward of one linear layer (gradients to the input and to whatever
trains) for:

- floor: the frozen base linear (gradient to the input only);
- full: full fine-tuning of that linear (weight and bias gradients too);
- LoRA torch: today's ``LowRankLinear`` path (cuBLAS GEMMs plus thin GEMMs and addmm);
- LoRA fused: the Triton kernels (``mm_spectral.kernels``), each variant of
  ``FusedOptions`` (fuse_down: h = x Aᵀ inside the forward GEMM; fuse_gh: one backward kernel);
- FourierFT dense: today's path (ΔW by an inverse real FFT, one GEMM with W + ΔW, the
  coefficients' gradient through gᵀx and a 2-D FFT);
- FourierFT sampled: the coefficients' gradient from the row spectra (the fused kernel
  on a GPU, the torch route elsewhere);

then the FourierFT coefficient gradient alone by each route (with its error against a
float64 reference), and kernel-level comparisons with cuBLAS. Times are medians of
CUDA-graph replays (no host overhead: the setting of the issue's targets) and of eager
steps (host-synchronised wall time). Markdown tables; ``--json`` also writes the numbers.

    python tools/benchmark_kernels.py                       # GPU, ViT-L shapes
    python tools/benchmark_kernels.py --profile             # + top GPU kernels per case
    python tools/benchmark_kernels.py --device cpu --tiny   # smoke run (seconds)

On the CPU (smoke mode) the kernels run only where Triton can run there, i.e. under
``TRITON_INTERPRET=1``, in float32; otherwise their rows are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mm_spectral.adapters.base import LayerSpec  # noqa: E402
from mm_spectral.adapters.fourierft import FourierFT  # noqa: E402
from mm_spectral.adapters.functional import low_rank_linear  # noqa: E402
from mm_spectral.adapters.spectral import sparse_spectrum_to_real  # noqa: E402
from mm_spectral.kernels import OPTIONS, set_fused_low_rank_mode, triton_available  # noqa: E402
from mm_spectral.kernels.spectral_grad import sampled_spectrum_grad  # noqa: E402

VARIANTS = {  # name: (fuse_down, fuse_gh)
    "LoRA fused": (False, False),
    "LoRA fused, h in GEMM": (True, False),
    "LoRA fused, 1-kernel bwd": (False, True),
    "LoRA fused, both": (True, True),
}


@dataclass
class Shapes:
    tokens: int
    layers: dict[str, tuple[int, int]]  # name: (in, out)
    rank: int
    n: int  # FourierFT coefficients
    dtype: torch.dtype


VIT_L = Shapes(4 * 1025, {"fc1 1024→4096": (1024, 4096), "fc2 4096→1024": (4096, 1024)}, 16,
               3000, torch.bfloat16)  # fmt: skip
TINY = Shapes(37, {"tiny 48→64": (48, 64)}, 4, 40, torch.float32)


@dataclass
class Timer:
    device: str
    graphs: bool
    iters: int
    results: dict[str, dict[str, float]] = field(default_factory=dict)

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def eager(self, step: Callable[[], object]) -> float:
        times = []
        for _ in range(self.iters):
            self.sync()
            start = time.perf_counter()
            step()
            self.sync()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def graph(self, step: Callable[[], object]) -> float | None:
        """Median per-step GPU time of a CUDA graph of ``step``, replayed back to back."""
        if not (self.graphs and self.device == "cuda"):
            return None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        reps, times = 20, []
        for _ in range(max(3, self.iters // reps)):
            start.record()
            for _ in range(reps):
                graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / reps)
        return statistics.median(times)

    def run(self, table: str, name: str, step: Callable[[], object]) -> None:
        for _ in range(3 if self.iters > 2 else 1):  # warm-up: autotuning, cuFFT plans
            step()
        self.sync()
        row = {"eager_ms": self.eager(step)}
        graph_ms = self.graph(step)
        if graph_ms is not None:
            row["graph_ms"] = graph_ms
        self.results.setdefault(table, {})[name] = row
        print(f"  {table} | {name}: {row}", flush=True)


def grads(y: torch.Tensor, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> object:
    return torch.autograd.grad(y, inputs, grad_out)


def with_options(fn: Callable[[], object], **options: object) -> Callable[[], object]:
    """``fn`` run with kernel options/mode set (read when the ops are issued)."""
    mode = options.pop("mode", None)

    def step() -> object:
        saved = {k: getattr(OPTIONS, k) for k in options}
        previous = set_fused_low_rank_mode(mode) if mode else None
        for k, v in options.items():
            setattr(OPTIONS, k, v)
        try:
            return fn()
        finally:
            for k, v in saved.items():
                setattr(OPTIONS, k, v)
            if previous:
                set_fused_low_rank_mode(previous)

    return step


def layer_steps(shapes: Shapes, k: int, n: int, device: str, kernels: bool, fused_mode: str):
    """name → step closure for one layer shape (in-features k, out-features n)."""
    dt = shapes.dtype
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dt)

    x = rand(shapes.tokens, k).requires_grad_()
    weight, bias = rand(n, k, scale=k**-0.5), rand(n, scale=0.1)
    weight_t, bias_t = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    down = rand(shapes.rank, k, scale=k**-0.5).float().requires_grad_()
    up = rand(n, shapes.rank, scale=0.1).float().requires_grad_()
    grad_out = rand(shapes.tokens, n)
    layer = torch.nn.Linear(k, n, device=device, dtype=dt).requires_grad_(False)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    fourier = FourierFT(LayerSpec("bench", "linear", (n, k)), n=shapes.n, alpha=150.0)
    fourier = fourier.to(device)
    fourier.weight_dtype = dt
    ctx = torch.autocast(device, dtype=dt) if dt != torch.float32 else _null()

    def lora() -> object:
        with ctx:
            y = low_rank_linear(x, weight, bias, down, up, 1.0)
        return grads(y, [x, down, up], grad_out)

    def fourier_step() -> object:
        with ctx:
            y = fourier(x, layer)
        return grads(y, [x, fourier.coefficients], grad_out)

    steps = {
        "floor (frozen linear)": lambda: grads(F.linear(x, weight, bias), [x], grad_out),
        "full fine-tuning": lambda: grads(
            F.linear(x, weight_t, bias_t), [x, weight_t, bias_t], grad_out
        ),
        "LoRA torch": with_options(lora, mode="off"),
    }
    if kernels:
        for name, (fuse_down, fuse_gh) in VARIANTS.items():
            steps[name] = with_options(lora, mode=fused_mode, fuse_down=fuse_down, fuse_gh=fuse_gh)
    steps["FourierFT dense"] = with_options(fourier_step, fourier_grad="dense")
    if kernels:
        steps["FourierFT sampled"] = with_options(fourier_step, fourier_grad="sampled")
    return steps


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None


def gradient_steps(shapes: Shapes, k: int, n: int, device: str, kernels: bool):
    """FourierFT's coefficient gradient alone, given g and x: name → (step, result getter)."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(shapes.tokens, k, generator=gen).to(device, shapes.dtype)
    g = (torch.randn(shapes.tokens, n, generator=gen) * 1e-3).to(device, shapes.dtype)
    fourier = FourierFT(LayerSpec("bench", "linear", (n, k)), n=shapes.n, alpha=150.0).to(device)
    coefficients, positions, indices = fourier.coefficients, fourier.positions, fourier.indices
    reference = sampled_spectrum_grad(g.double(), x.double(), indices, 150.0)

    def dense() -> torch.Tensor:  # today's backward: gᵀx, then the FFT and gather
        delta = sparse_spectrum_to_real(coefficients, positions, (n, k), 150.0)
        return torch.autograd.grad(delta, coefficients, torch.mm(g.t(), x))[0]

    steps = {
        "dense gᵀx + rfft2": dense,
        "sampled, torch FFTs (spectra in memory)": lambda: sampled_spectrum_grad(g, x, indices, 150.0),
    }
    if kernels:
        from mm_spectral.kernels.spectral_grad_kernel import fused_spectrum_grad, fused_supported

        if fused_supported(n, k):
            bf16_ok = device == "cuda"  # the interpreter has no bf16 dots
            if bf16_ok:
                steps["sampled, fused kernel (bf16 DFT)"] = lambda: fused_spectrum_grad(
                    g, x, indices, 150.0, bf16=True
                )
            steps["sampled, fused kernel (TF32 DFT)"] = lambda: fused_spectrum_grad(
                g, x, indices, 150.0, bf16=False
            )
    errors = {}
    for name, step in steps.items():
        got = step().double()
        errors[name] = ((got - reference).norm() / reference.norm()).item()
    return steps, errors


def kernel_steps(shapes: Shapes, k: int, n: int, device: str):
    """cuBLAS against the fused kernels, forward and backward separately (GPU only)."""
    from mm_spectral.kernels.low_rank_backward import low_rank_backward
    from mm_spectral.kernels.low_rank_forward import low_rank_forward

    dt = shapes.dtype
    x = torch.randn(shapes.tokens, k, device=device, dtype=dt)
    w = torch.randn(n, k, device=device, dtype=dt) * k**-0.5
    b = torch.randn(n, device=device, dtype=dt)
    down = torch.randn(shapes.rank, k, device=device, dtype=dt) * k**-0.5
    up = torch.randn(n, shapes.rank, device=device, dtype=dt)
    g = torch.randn(shapes.tokens, n, device=device, dtype=dt)
    h = x @ down.t()
    return {
        "fwd cuBLAS x Wᵀ + b": lambda: F.linear(x, w, b),
        "fwd fused": lambda: low_rank_forward(x, w, b, down, up, 1.0),
        "fwd fused, h in GEMM": lambda: low_rank_forward(x, w, b, down, up, 1.0, fuse_down=True),
        "bwd cuBLAS g W": lambda: torch.mm(g, w),
        "bwd fused (2 kernels)": lambda: low_rank_backward(
            g, x, w, down, up, h, 1.0, True, False, True, True
        ),
        "bwd fused (1 kernel)": lambda: low_rank_backward(
            g, x, w, down, up, h, 1.0, True, False, True, True, fuse_gh=True
        ),
    }


def profile(step: Callable[[], object], top: int = 8) -> list[tuple[str, float]]:
    """Top GPU kernels of one eager step: (name, µs per step)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    reps = 5
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        device_time = getattr(event, "device_time_total", None)
        if device_time is None:
            device_time = getattr(event, "cuda_time_total", 0.0)
        if device_time > 0:
            totals[event.key] = device_time / reps
    return sorted(totals.items(), key=lambda kv: -kv[1])[:top]


def table(title: str, rows: dict[str, dict[str, float]], floor: str | None) -> str:
    has_graph = any("graph_ms" in r for r in rows.values())
    key = "graph_ms" if has_graph else "eager_ms"
    base = rows[floor][key] if floor in rows else None
    head = "| case | " + ("graph ms | " if has_graph else "") + "eager ms |"
    head += " × floor |" if base else ""
    lines = [f"### {title}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in rows.items():
        cells = [name] + ([f"{r['graph_ms']:.4f}"] if has_graph else []) + [f"{r['eager_ms']:.4f}"]
        if base:
            cells.append(f"{r[key] / base:.2f}")
        extra = r.get("rel_error")
        if extra is not None:
            cells[0] += f" (rel. err {extra:.1e})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke run")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--no-graphs", action="store_true", help="eager timings only")
    parser.add_argument("--profile", action="store_true", help="top GPU kernels per case")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()
    device = args.device
    shapes = TINY if args.tiny else VIT_L
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    # The kernels run compiled on a GPU, or in Triton's interpreter on the CPU (float32).
    kernels = triton_available() and (device == "cuda" or interpret)
    fused_mode = "auto" if device == "cuda" else "force"
    timer = Timer(device, not args.no_graphs, args.iters or (1 if args.tiny else 100))
    if device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", end="")
        if triton_available():
            import triton

            print(f", triton {triton.__version__}", end="")
        print(f", tokens {shapes.tokens}, rank {shapes.rank}, {shapes.dtype}", flush=True)
    out = []
    profiles: dict[str, list[tuple[str, float]]] = {}
    for layer, (k, n) in shapes.layers.items():
        steps = layer_steps(shapes, k, n, device, kernels, fused_mode)
        for name, step in steps.items():
            timer.run(f"step {layer}", name, step)
            if args.profile and device == "cuda":
                profiles[f"{layer} | {name}"] = profile(step)
        grad_steps, errors = gradient_steps(shapes, k, n, device, kernels)
        for name, step in grad_steps.items():
            timer.run(f"FourierFT coefficient gradient {layer}", name, step)
            timer.results[f"FourierFT coefficient gradient {layer}"][name]["rel_error"] = errors[
                name
            ]
        if kernels and device == "cuda":
            for name, step in kernel_steps(shapes, k, n, device).items():
                timer.run(f"kernels {layer}", name, step)
    for title, rows in timer.results.items():
        floor = "floor (frozen linear)" if title.startswith("step") else None
        out.append(table(title, rows, floor))
    if profiles:
        out.append("### GPU kernels per eager step (µs)\n")
        for case, kernels_top in profiles.items():
            out.append(f"- {case}: " + "; ".join(f"{k[:60]} {v:.1f}" for k, v in kernels_top))
    print("\n" + "\n".join(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": timer.results, "profiles": profiles}, f, indent=1)


if __name__ == "__main__":
    main()
