"""Microbenchmark of one adapted linear's training step: the kernels against torch.

For ViT-L/16 shapes (4 images × 1025 tokens, width 1024, MLP 4096, LoRA rank 16) it
times forward + backward of one linear layer as a ViT training step runs it — float32
master weights, bf16 autocast, gradients to the input and to whatever trains — for:

- floor: the frozen base linear (gradient to the input only);
- full: full fine-tuning of that linear (weight and bias gradients too);
- LoRA torch: today's ``LowRankLinear`` path (cuBLAS GEMMs plus thin GEMMs and addmm);
- LoRA fused: ``mm_spectral.kernels`` — the cuBLAS strategy (the rank term folded into
  cuBLAS GEMMs over concatenated operands, thin products in Triton passes) and the Triton
  strategy (Triton GEMMs with the rank term in their reduction; two of its variants);
- FourierFT dense: today's path (ΔW by an inverse real FFT, one GEMM with W + ΔW, the
  coefficients' gradient through gᵀx and a 2-D FFT);
- FourierFT sampled: the coefficients' gradient from the row spectra (the fused kernel
  on a GPU, the torch route elsewhere);

then kernel-level times (cuBLAS GEMMs, each pass), the FourierFT coefficient gradient
alone by each route (with its error against a float64 reference, and the fused kernel's
parts timed separately), and 24 same-shape FourierFT ΔW builds one by one against one
batched build. Times are medians of CUDA-graph replays (no host overhead: the setting of
the issue's targets) and of eager steps (host-synchronised wall time).

    python tools/benchmark_kernels.py                       # GPU, ViT-L shapes
    python tools/benchmark_kernels.py --only lora --profile # + top GPU kernels per case
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
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mm_spectral.adapters.base import LayerSpec  # noqa: E402
from mm_spectral.adapters.fourierft import FourierFT  # noqa: E402
from mm_spectral.adapters.functional import low_rank_linear  # noqa: E402
from mm_spectral.kernels import OPTIONS, set_fused_low_rank_mode, triton_available  # noqa: E402
from mm_spectral.kernels.spectral_grad import sampled_spectrum_grad  # noqa: E402

VARIANTS = {  # name: kernel options
    "LoRA fused, cuBLAS strategy": dict(strategy="cublas"),
    "LoRA fused, Triton GEMMs": dict(strategy="triton", fuse_down=False),
    "LoRA fused, Triton GEMMs, h in GEMM": dict(strategy="triton", fuse_down=True),
}
FLOOR = "floor (frozen linear)"


@dataclass
class Shapes:
    tokens: int
    layers: dict[str, tuple[int, int]]  # name: (in, out)
    rank: int
    n: int  # FourierFT coefficients
    dtype: torch.dtype  # compute dtype (autocast when not float32)
    batched_layers: int


VIT_L = Shapes(
    4 * 1025, {"fc1 1024→4096": (1024, 4096), "fc2 4096→1024": (4096, 1024)}, 16, 3000,
    torch.bfloat16, 24,
)  # fmt: skip
TINY = Shapes(37, {"tiny 48→64": (48, 64)}, 4, 40, torch.float32, 3)


@dataclass
class Timer:
    device: str
    graphs: bool
    iters: int
    results: dict[str, dict[str, dict]] = field(default_factory=dict)
    keep: list = field(default_factory=list)  # graphs stay alive: their pools are not reused

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
        self.keep.append(graph)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        reps, times = 20, []
        for _ in range(5):
            start.record()
            for _ in range(reps):
                graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / reps)
        return statistics.median(times)

    def run(self, table: str, name: str, step: Callable[[], object], **extra: object) -> None:
        try:
            for _ in range(3 if self.iters > 2 else 1):  # warm-up: autotuning, FFT plans
                step()
            self.sync()
            row: dict = {"eager_ms": self.eager(step)}
            graph_ms = self.graph(step)
            if graph_ms is not None:
                row["graph_ms"] = graph_ms
        except Exception as error:  # a failing case is reported, the others still run
            traceback.print_exc()
            row = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}
        row.update(extra)
        self.results.setdefault(table, {})[name] = row
        print(f"  {table} | {name}: {row}", flush=True)


def grads(y: torch.Tensor, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> object:
    return torch.autograd.grad(y, inputs, grad_out)


def with_options(fn: Callable[[], object], mode: str | None = None, **options: object):
    """``fn`` run with the kernel mode and options set (they are read when ops are issued)."""

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


def make_rand(device: str, seed: int) -> Callable[..., torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0, dtype: torch.dtype = torch.float32):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    return rand


def layer_steps(shapes: Shapes, k: int, n: int, device: str, kernels: bool, fused_mode: str):
    """name → step closure for one layer (in-features k, out-features n)."""
    dt = shapes.dtype
    rand = make_rand(device, 0)
    x = rand(shapes.tokens, k, dtype=dt).requires_grad_()  # activations in the compute dtype
    weight, bias = rand(n, k, scale=k**-0.5), rand(n, scale=0.1)  # float32 master weights
    weight_t, bias_t = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    down = rand(shapes.rank, k, scale=k**-0.5).requires_grad_()
    up = rand(n, shapes.rank, scale=0.1).requires_grad_()
    grad_out = rand(shapes.tokens, n, dtype=dt)
    layer = torch.nn.Linear(k, n, device=device).requires_grad_(False)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    fourier = FourierFT(LayerSpec("bench", "linear", (n, k)), n=shapes.n, alpha=150.0).to(device)

    def ctx():
        return torch.autocast(device, dtype=dt) if dt != torch.float32 else nullcontext()

    def floor() -> object:
        with ctx():
            return grads(F.linear(x, weight, bias), [x], grad_out)

    def full() -> object:
        with ctx():
            return grads(F.linear(x, weight_t, bias_t), [x, weight_t, bias_t], grad_out)

    def lora() -> object:
        with ctx():
            y = low_rank_linear(x, weight, bias, down, up, 1.0)
        return grads(y, [x, down, up], grad_out)

    def fourier_step() -> object:
        with ctx():
            y = fourier(x, layer)
        return grads(y, [x, fourier.coefficients], grad_out)

    steps = {FLOOR: floor, "full fine-tuning": full, "LoRA torch": with_options(lora, "off")}
    if kernels:
        variants = list(VARIANTS.items())
        for name, options in variants[:2] if shapes is TINY else variants:
            steps[name] = with_options(lora, fused_mode, **options)
    steps["FourierFT dense"] = with_options(fourier_step, fourier_grad="dense")
    steps["FourierFT sampled"] = with_options(fourier_step, fourier_grad="sampled")
    return steps


def step_errors(steps: dict[str, Callable[[], object]]) -> dict[str, float | str]:
    """Relative error of each fused variant's gradients against its torch path (LoRA fused
    against LoRA torch, FourierFT sampled against FourierFT dense): the largest over inputs."""
    references = {"LoRA fused": "LoRA torch", "FourierFT sampled": "FourierFT dense"}
    errors: dict[str, float | str] = {}
    for prefix, base in references.items():
        reference = [t.double() for t in steps[base]()]
        for name, step in steps.items():
            if not name.startswith(prefix):
                continue
            try:
                got = [t.double() for t in step()]
                errors[name] = max(
                    ((a - b).norm() / b.norm()).item() for a, b in zip(got, reference)
                )
            except Exception as error:
                errors[name] = type(error).__name__
    return errors


def kernel_steps(shapes: Shapes, k: int, n: int, device: str):
    """cuBLAS GEMMs, the passes, and the Triton GEMMs one by one (GPU only)."""
    from mm_spectral.kernels.low_rank_backward import low_rank_backward
    from mm_spectral.kernels.low_rank_forward import low_rank_forward
    from mm_spectral.kernels.low_rank_passes import down_grad, down_projection, grad_out_pass

    dt, r = shapes.dtype, shapes.rank
    rand = make_rand(device, 2)
    x, w, b = rand(shapes.tokens, k, dtype=dt), rand(n, k, dtype=dt), rand(n, dtype=dt)
    down, up = rand(r, k, dtype=dt), rand(n, r, dtype=dt)
    g = rand(shapes.tokens, n, dtype=dt)
    h = x @ down.t()
    gh = (g @ up).float()
    x_cat = torch.empty(shapes.tokens, k + r, device=device, dtype=dt)
    g_cat = torch.empty(shapes.tokens, n + r, device=device, dtype=dt)
    return {
        "cuBLAS y = x Wᵀ + b": lambda: F.linear(x, w, b),
        "cuBLAS dx = g W": lambda: torch.mm(g, w),
        "pass: h = x downᵀ": lambda: down_projection(x, down),
        "pass: h and [x | h]": lambda: down_projection(x, down, cat_out=x_cat),
        "pass: gh, d_up over g": lambda: grad_out_pass(g, up, h, 1.0, True, True, False),
        "pass: gh, d_up and [g | s·gh]": lambda: grad_out_pass(
            g, up, h, 1.0, True, True, False, cat_out=g_cat
        ),
        "pass: d_down = ghᵀ x": lambda: down_grad(gh, x, 1.0),
        "Triton GEMM fwd (rank term in it)": lambda: low_rank_forward(x, w, b, down, up, 1.0),
        "Triton GEMM bwd (dx, d_down, + pass)": lambda: low_rank_backward(
            g, x, w, down, up, h, 1.0, True, False, True, True
        ),
    }


def gradient_steps(shapes: Shapes, k: int, n: int, device: str, kernels: bool):
    """FourierFT's coefficient gradient alone, given g and x: name → (step, rel. error)."""
    rand = make_rand(device, 1)
    x = rand(shapes.tokens, k, dtype=shapes.dtype)
    g = rand(shapes.tokens, n, scale=1e-3, dtype=shapes.dtype)
    fourier = FourierFT(LayerSpec("bench", "linear", (n, k)), n=shapes.n, alpha=150.0).to(device)
    positions, indices = fourier.positions, fourier.indices
    inside = positions[2 * shapes.n :]  # where each entry's real part sits in rfft2's output

    def dense() -> torch.Tensor:
        """Today's backward as plain ops (what DeltaLinear + _SparseSpectrumToReal run):
        gᵀx, then the 2-D FFT of it and the gather."""
        spectrum = torch.view_as_real(torch.fft.rfft2(torch.mm(g.t(), x).float()))
        return torch.take(spectrum, inside).mul_(150.0 / (n * k))

    steps = {
        "dense: gᵀx GEMM + rfft2 + gather": dense,
        "sampled, torch FFTs (spectra in memory)": lambda: sampled_spectrum_grad(
            g, x, indices, 150.0
        ),
    }
    profile_only = set()
    if kernels:
        from mm_spectral.kernels.spectral_grad_kernel import fused_spectrum_grad, fused_supported

        if fused_supported(n, k):

            def fused(**kw: object) -> Callable[[], torch.Tensor]:
                return lambda: fused_spectrum_grad(g, x, indices, 150.0, **kw)

            gpu = device == "cuda"  # the interpreter has no bf16 dots
            if gpu:
                steps["sampled, fused kernel (bf16 DFT)"] = fused(bf16=True)
                steps["  part: its DFTs alone"] = fused(bf16=True, profile="dft")
                steps["  part: its loads + sampled product alone"] = fused(
                    bf16=True, profile="sample"
                )
                profile_only = {
                    "  part: its DFTs alone",
                    "  part: its loads + sampled product alone",
                }
            steps["sampled, fused kernel (TF32 DFT)"] = fused(bf16=False)
    reference = sampled_spectrum_grad(g.double(), x.double(), indices, 150.0)
    errors = {}
    for name, step in steps.items():
        if name in profile_only:
            continue
        try:
            got = step().double()
            errors[name] = ((got - reference).norm() / reference.norm()).item()
        except Exception as error:
            errors[name] = f"{type(error).__name__}"
    return steps, errors


def batched_steps(shapes: Shapes, device: str):
    """``layers`` FourierFT ΔW of one shape (fc1's), built and backpropagated one by one
    and as one batch."""
    from mm_spectral.adapters.batched_spectra import batched_fourierft_deltas

    k, n = next(iter(shapes.layers.values()))
    adapters = [
        FourierFT(LayerSpec(f"l{i}", "linear", (n, k)), n=shapes.n, alpha=150.0).to(device)
        for i in range(shapes.batched_layers)
    ]
    params = [a.coefficients for a in adapters]
    probe = make_rand(device, 3)(n, k)

    def one_by_one() -> object:
        deltas = [a.delta() for a in adapters]
        return torch.autograd.grad(sum((d * probe).sum() for d in deltas), params)

    def batched() -> object:
        deltas = batched_fourierft_deltas(adapters)
        return torch.autograd.grad(sum((d * probe).sum() for d in deltas), params)

    return {"one irfft2 per layer": one_by_one, "one batched irfft2": batched}


def wanted(name: str, sections: list[str]) -> bool:
    """Whether a step case belongs to the sections run (floor and full FT always do)."""
    if name in (FLOOR, "full fine-tuning"):
        return True
    return ("fourier" if "FourierFT" in name else "lora") in sections


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


def table(title: str, rows: dict[str, dict], floor: str | None) -> str:
    has_graph = any("graph_ms" in r for r in rows.values())
    key = "graph_ms" if has_graph else "eager_ms"
    base = rows.get(floor, {}).get(key) if floor else None
    head = "| case | " + ("graph ms | " if has_graph else "") + "eager ms |"
    head += " × floor |" if base else ""
    lines = [f"### {title}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in rows.items():
        label = name.strip()
        if isinstance(r.get("rel_error"), float):
            label += f" (rel. err {r['rel_error']:.1e})"
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error']} |")
            continue
        cells = [label] + ([f"{r['graph_ms']:.4f}"] if has_graph else []) + [f"{r['eager_ms']:.4f}"]
        if base:
            cells.append(f"{r[key] / base:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke run")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--no-graphs", action="store_true", help="eager timings only")
    parser.add_argument("--profile", action="store_true", help="top GPU kernels per step case")
    parser.add_argument(
        "--only", nargs="*", default=["lora", "fourier", "batched"],
        choices=["lora", "fourier", "batched"], help="sections to run",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()
    device = args.device
    shapes = TINY if args.tiny else VIT_L
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    # The kernels run compiled on a GPU, or in Triton's interpreter on the CPU (float32).
    kernels = triton_available() and (device == "cuda" or interpret)
    fused_mode = "on" if device == "cuda" else "force"  # eager rows too, not only graphs
    timer = Timer(device, not args.no_graphs, args.iters or (1 if args.tiny else 30))
    if device == "cuda":
        import triton

        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
              f"{triton.__version__}, tokens {shapes.tokens}, rank {shapes.rank}, "
              f"{shapes.dtype} autocast, float32 weights", flush=True)  # fmt: skip
    profiles: dict[str, list[tuple[str, float]]] = {}

    def flush(titles: list[str]) -> None:
        for title in titles:
            floor = FLOOR if title.startswith("step") else None
            print("\n" + table(title, timer.results.get(title, {}), floor), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"results": timer.results, "profiles": profiles}, f, indent=1)

    for layer, (k, n) in shapes.layers.items():
        if "lora" in args.only or "fourier" in args.only:
            title = f"step {layer}"
            steps = layer_steps(shapes, k, n, device, kernels, fused_mode)
            errors = step_errors(steps)
            for name, step in steps.items():
                if not wanted(name, args.only):
                    continue
                timer.run(title, name, step, rel_error=errors.get(name))
                if args.profile and device == "cuda" and "error" not in timer.results[title][name]:
                    profiles[f"{layer} | {name}"] = profile(step)
            flush([title])
        if "lora" in args.only and kernels and device == "cuda":
            title = f"kernels {layer}"
            for name, step in kernel_steps(shapes, k, n, device).items():
                timer.run(title, name, step)
            flush([title])
        if "fourier" in args.only:
            title = f"FourierFT coefficient gradient {layer}"
            grad_steps, errors = gradient_steps(shapes, k, n, device, kernels)
            for name, step in grad_steps.items():
                timer.run(title, name, step, rel_error=errors.get(name))
            flush([title])
    if "batched" in args.only:
        title = f"{shapes.batched_layers} FourierFT ΔW builds (fwd + bwd)"
        for name, step in batched_steps(shapes, device).items():
            timer.run(title, name, step)
        flush([title])
    if profiles:
        print("### GPU kernels per eager step (µs)\n")
        for case, top in profiles.items():
            print(f"- {case}: " + "; ".join(f"{name[:70]} {us:.1f}" for name, us in top))
        flush([])


if __name__ == "__main__":
    main()
