"""Training-step and inference benchmark of the adapters on real backbone sizes (GPU).

For each backbone: the floor (backbone frozen, gradients still flow through it to the
input), full fine-tuning, and each adapter at the papers' settings; bf16 autocast, AdamW,
median CUDA-synchronised step time after warm-up and peak memory. Then merged-model
inference against the base model, and a short fp16/bf16 AMP run per adapter checking that
nothing turns NaN/inf. Prints a markdown table (ratios to the floor of the same run).

    python tools/benchmark.py                       # ConvNeXt-V2-L 2x1024², ViT-L/16 4x512²
    python tools/benchmark.py --tiny --device cpu   # a seconds-long smoke run of the same code
    python tools/benchmark.py --mode cuda-graph     # forward+backward replayed as a CUDA graph
    python tools/benchmark.py --profile floor LoRA  # + GPU-busy time and top kernels per step
    python tools/benchmark.py --phases              # + host ms per phase: host- or GPU-bound?
    python tools/benchmark.py --peers --skip-training --skip-inference   # ours vs HF peft
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import itertools
import json
import math
import os.path as osp
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout

import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import mm_spectral  # noqa: E402
from mm_spectral.adapters.batched_spectra import has_batched_spectra  # noqa: E402
from mm_spectral.compile import compile_modules  # noqa: E402
from mm_spectral.cuda_graph import enable_cuda_graph  # noqa: E402
from mm_spectral.kernels import (  # noqa: E402
    OPTIONS,
    fused_low_rank_mode,
    native_builds_mode,
    native_mode,
    native_status,
    set_native_builds_mode,
    set_native_mode,
)
from mm_spectral.kernels.dispatch import RANK_TERMS  # noqa: E402
from mm_spectral.state import atomic_write_text  # noqa: E402
from tools import peers  # noqa: E402

CONVNEXT_TARGETS = [
    r"stem\.0",
    r"stages\.\d+\.downsample\.1",
    r"stages\.\d+\.blocks\.\d+\.(conv_dw|mlp\.fc1|mlp\.fc2)",
]
VIT_TARGETS = [r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"]
CONVNEXT_BLOCKS = [r"stages\.\d+\.blocks\.\d+"]
VIT_BLOCKS = [r"blocks\.\d+"]

# The papers' settings (FLoRA Table 9 / FourierFT / FoRA), the same for both backbones.
ADAPTERS = {
    "LoRA r16": dict(type="LoRA", rank=16, alpha=16),
    "DoRA r16": dict(type="DoRA", rank=16, alpha=16),
    "FLoRA r16": dict(type="FLoRA", rank=16, kernel_rank=2, scale=4.0),
    "FourierFT n3000": dict(type="FourierFT", n=3000, alpha=150.0),
    "FoRA r64 n8000": dict(type="FoRA", rank=64, n=8000, scale=1.0),
}


# Tiny backbones have layers smaller than n=3000 entries: the smoke run scales n down.
TINY_ADAPTERS = {
    name: dict(cfg, n=cfg["n"] // 10) if "n" in cfg else cfg for name, cfg in ADAPTERS.items()
}


@dataclass
class Backbone:
    name: str
    timm_name: str
    batch: int
    size: int
    targets: list[str]
    timm_kwargs: dict
    blocks: list[str]  # the repeated blocks that --compile compiles


BACKBONES = [
    Backbone("ConvNeXt-V2-L", "convnextv2_large", 2, 1024, CONVNEXT_TARGETS, {}, CONVNEXT_BLOCKS),
    Backbone(
        "ViT-L/16",
        "vit_large_patch16_224",
        4,
        512,
        VIT_TARGETS,
        dict(img_size=512, dynamic_img_size=True),
        VIT_BLOCKS,
    ),
]
TINY = [
    Backbone("ConvNeXt-V2-atto", "convnextv2_atto", 2, 64, CONVNEXT_TARGETS, {}, CONVNEXT_BLOCKS),
    Backbone(
        "ViT-tiny",
        "vit_tiny_patch16_224",
        2,
        64,
        VIT_TARGETS,
        dict(img_size=64, dynamic_img_size=True, depth=2),
        VIT_BLOCKS,
    ),
]


@dataclass
class Result:
    backbone: str
    variant: str
    step_ms: float
    peak_gib: float
    trainable: int
    mode: str = "eager"
    graphs: int = 0  # compile modes: graphs dynamo made, and its graph breaks
    graph_breaks: int = 0
    phases: tuple[float, ...] | None = None  # --phases: host ms per PHASES entry


def build(spec: Backbone) -> nn.Module:
    """The template on the CPU: each variant copies it, so the device holds one model only
    while that variant is measured (peak memory is the variant's alone)."""
    return timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **spec.timm_kwargs)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(
    steps: list[Callable[[], object]], device: str, warmup: int, iters: int, rounds: int = 5
) -> list[float]:
    """Median step time of each callable, timed in alternating rounds so that drift of
    the host's or GPU's speed during the run hits every callable alike."""
    times: list[list[float]] = [[] for _ in steps]
    for step in steps:
        for _ in range(warmup):
            step()
    per_round = max(1, iters // rounds)
    for _ in range(rounds):
        for step, seen in zip(steps, times):
            for _ in range(per_round):
                synchronize(device)
                start = time.perf_counter()
                step()
                synchronize(device)
                seen.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(seen) for seen in times]


def time_steps(step: Callable[[], None], device: str, warmup: int, iters: int) -> float:
    """Median wall time of one step in milliseconds, synchronised around each step."""
    return time_interleaved([step], device, warmup, iters, rounds=1)[0]


class Features(nn.Module):
    """``model.forward_features`` as a module (the part a CUDA graph captures)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def train_step_fn(
    model: nn.Module,
    x: torch.Tensor,
    dtype: torch.dtype,
    scaler: torch.amp.GradScaler | None = None,
    mode: str = "eager",
    target: torch.Tensor | None = None,
    batched_spectra: bool = False,
    optimizer_kind: str = "fused",
) -> Callable[[], float]:
    """One training step (forward, backward, AdamW) as a closure; the loss is the features'
    mean square, or their mean squared error to ``target`` when given.

    ``mode``: 'eager'; 'compile-blocks' (the caller compiled the blocks); 'compile-model'
    (torch.compile of the whole forward_features); 'cuda-graph' replays forward+backward
    as a CUDA graph captured at the first step
    (:func:`mm_spectral.cuda_graph.enable_cuda_graph`), which removes the host's per-op
    dispatch and so shows what the GPU itself spends. ``batched_spectra`` builds all
    same-shape FourierFT/FoRA spectra with one FFT per step
    (:func:`mm_spectral.enable_batched_spectra`). ``optimizer_kind``: see
    :func:`make_optimizer`.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, optimizer_kind, x.device.type)
    device_type = x.device.type

    features: Callable[[torch.Tensor], torch.Tensor] = model.forward_features
    # As AdaptedBackbone: only where a group of same-shape layers is there to batch (FLoRA
    # on ViT adapts linears alone, and the plan before each forward costs host time).
    batched_spectra = batched_spectra and has_batched_spectra(model)
    if batched_spectra or mode in ("cuda-graph", "compile-model"):
        features = Features(model)  # a module call: its pre-hooks run, compile applies
    if mode == "compile-model":  # what AdaptedBackbone(compile=True) does for a backbone
        compile_modules(features, None, dynamic=False)
    if batched_spectra:
        mm_spectral.enable_batched_spectra(features)
    if mode == "cuda-graph":  # what AdaptedBackbone(cuda_graph=True) does for a backbone
        features = enable_cuda_graph(features)

    def step(marks: list[float] | None = None) -> float:
        """One step; ``marks``, where given, gets the host's clock (perf_counter) as the
        forward, the backward, the optimizer and the final wait for the loss return."""
        with torch.autocast(device_type, dtype=dtype):
            out = features(x).float()
            loss = (out if target is None else out - target).square().mean()
        if marks is not None:
            marks.append(time.perf_counter())
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if marks is not None:
            marks.append(time.perf_counter())
        if optimizer is not None:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        x.grad = None
        if marks is not None:
            marks.append(time.perf_counter())
        value = loss.item()
        if marks is not None:
            marks.append(time.perf_counter())
        return value

    return step


def make_optimizer(
    params: list[nn.Parameter], kind: str, device_type: str, **kwargs: float
) -> torch.optim.Optimizer | None:
    """AdamW over ``params`` (lr 1e-4 unless given): 'fused' is torch's fused AdamW (one
    kernel set for all tensors; on CUDA only, as the CPU's loop takes longer there),
    'foreach' torch's default (what MMEngine builds from ``type='AdamW'``; it costs ms for
    hundreds of small tensors), 'flat' :class:`mm_spectral.FlatAdamW` (the fused arithmetic,
    one launch per flat buffer), as this project's configs train."""
    if not params:
        return None
    kwargs.setdefault("lr", 1e-4)
    if kind == "flat":
        return mm_spectral.FlatAdamW(params, **kwargs)
    if kind == "foreach":
        return torch.optim.AdamW(params, foreach=True, **kwargs)
    return torch.optim.AdamW(params, fused=device_type == "cuda", **kwargs)


def optimizer_kind(label: str, options: dict[str, str] | None) -> str:
    """The optimizer a variant steps with: its ``--optimizer`` option, else FlatAdamW for
    adapters (as the configs train them) and torch's fused AdamW for the plain model."""
    if options and "optimizer" in options:
        return options["optimizer"]
    return "fused" if label.startswith(("full FT", "floor")) else "flat"


PHASES = ("forward", "backward", "optimizer", "wait")


def host_phases(step: Callable[..., float], device: str, iters: int) -> tuple[float, ...]:
    """Median host milliseconds of each of a step's ``PHASES``: issuing the forward, the
    backward (``backward()`` returns once autograd has issued every op), the optimizer,
    then waiting for the GPU to finish (the loss's ``item()``). Each step starts on an idle
    device. A wait near zero means the host set the pace: the GPU idled while ops were
    issued, and only fewer or cheaper host-side ops make the step faster."""
    spans: list[list[float]] = [[] for _ in PHASES]
    for _ in range(iters):
        synchronize(device)
        marks = [time.perf_counter()]
        step(marks)
        for seen, start, end in zip(spans, marks, marks[1:]):
            seen.append((end - start) * 1e3)
    return tuple(statistics.median(seen) for seen in spans)


@dataclass
class Prepared:
    """One variant ready to step: its model, step closure and what it reports."""

    label: str
    model: nn.Module
    step: Callable[[], float]
    batched: bool


LOW_RANK = ("LoRA", "DoRA", "FLoRA", "FoRA")  # the methods OPTIONS.rank_term applies to
NATIVE = ("LoRA", "DoRA", "FLoRA", "FourierFT", "FoRA")  # methods with C++ nodes
# methods whose ΔW builds can be batched (LoRA / DoRA: on grouped convs, e.g. ConvNeXt's)
SPECTRAL = ("FourierFT", "FoRA", "FLoRA", "LoRA", "DoRA")
# variant keys that set how it runs, not the adapter
RUN_OPTIONS = ("rank_term", "native", "batched_spectra", "batched_linears", "optimizer")
# methods whose linears can take their whole ΔW from a batched build (OPTIONS.batched_linears)
WHOLE_DELTA = ("LoRA", "DoRA", "FLoRA", "FoRA")
BATCHED_TAGS = {"on": "batched", "off": "per-layer spectra"}
# methods that --optimizer runs once per optimizer (the plain model keeps torch's fused AdamW)
OPTIMIZED = ("LoRA", "DoRA", "FLoRA", "FourierFT", "FoRA", "BitFit")


def path_variants(
    adapters: dict[str, dict],
    terms: list[str] | None,
    natives: list[str] | None = None,
    batched: list[str] | None = None,
    whole: list[str] | None = None,
    optimizers: list[str] | None = None,
) -> dict[str, dict]:
    """Each low-rank adapter once per rank-term form (``OPTIONS.rank_term``), each adapter
    with C++ nodes once per native mode (:mod:`mm_spectral.kernels.native`) and each
    spectral one once per batched-spectra setting asked for, and each additive low-rank one
    once per batched-linears setting (``OPTIONS.batched_linears``), and every adapter once
    per optimizer (:func:`make_optimizer`), labelled with them."""
    axes = (("rank_term", terms, LOW_RANK), ("native", natives, NATIVE),
            ("batched_spectra", batched, SPECTRAL), ("batched_linears", whole, WHOLE_DELTA),
            ("optimizer", optimizers, OPTIMIZED))  # fmt: skip
    if not any(values for _, values, _ in axes):
        return adapters
    expanded = {}
    for name, cfg in adapters.items():
        choices = [[(key, v) for v in values] if values and cfg["type"] in methods else [None]
                   for key, values, methods in axes]  # fmt: skip
        for picked in itertools.product(*choices):
            options = dict(p for p in picked if p is not None)
            tags = [
                {
                    "rank_term": v,
                    "native": f"native {v}",
                    "batched_spectra": BATCHED_TAGS.get(v),
                    "batched_linears": f"linear ΔW batched {v}",
                    "optimizer": f"{v} AdamW",
                }[k]  # fmt: skip
                for k, v in options.items()
            ]
            label = ", ".join(tags)
            expanded[f"{name} [{label}]" if label else name] = dict(cfg, **options)
    return expanded


def require_native_nodes() -> str:
    """The C++ nodes' status for a benchmark's header. Exits where they are not off but did
    not build: the rows would then time the Python functions under the nodes' labels."""
    status = native_status()
    if status.startswith("did not build"):
        raise SystemExit(
            f"mm_spectral: the C++ nodes {status}\nThe timings would be the Python "
            "functions'. Fix the build, or set MM_SPECTRAL_NATIVE=off to time those."
        )
    return status


def add_run_option_arguments(parser: argparse.ArgumentParser) -> None:
    """``--rank-term``, ``--native`` and ``--batched-spectra``, shared by the benchmark
    scripts (see :func:`path_variants`)."""
    parser.add_argument(
        "--rank-term",
        nargs="+",
        default=None,
        choices=list(RANK_TERMS),
        help="run each LoRA/DoRA/FLoRA/FoRA variant once per form given: how the plain "
        "path takes the rank-r term (OPTIONS.rank_term: into the output, the weight, the "
        "weight with gradients from a dense dW, or auto)",
    )
    parser.add_argument(
        "--native",
        nargs="+",
        default=None,
        choices=["auto", "off", "python-builds"],
        help="run each LoRA/DoRA/FLoRA/FourierFT/FoRA variant once per native mode given: 'off' "
        "steps adapted linears through the Python autograd function instead of the C++ node; "
        "'python-builds' keeps the C++ nodes but the batched linear builds' Python functions "
        "(MM_SPECTRAL_NATIVE_BUILDS=off)",
    )
    parser.add_argument(
        "--batched-spectra",
        nargs="*",
        default=None,
        choices=["on", "off"],
        help="FourierFT/FoRA variants build all same-shape spectra with one FFT per step "
        "('on'; alone: on in every mode) or one per layer ('off'); both: each variant both "
        "ways. Default: as AdaptedBackbone (on in eager steps)",
    )
    parser.add_argument(
        "--batched-linears",
        nargs="+",
        default=None,
        choices=["on", "off"],
        help="run each LoRA/DoRA/FLoRA/FoRA variant once per setting given: 'on' (default) "
        "builds the linears' whole ΔW in one batch per same-shape chunk and steps them as "
        "W0 + ΔW (OPTIONS.batched_linears, where the rank term is dense and the tokens "
        "few), 'off' per layer",
    )

    parser.add_argument(
        "--optimizer",
        nargs="+",
        default=None,
        choices=["fused", "flat", "foreach"],
        help="run each adapter variant once per optimizer given: 'flat' (default for "
        "adapters) mm_spectral.FlatAdamW, one fused launch per flat buffer of tensors, as the "
        "configs train; 'fused' torch's fused AdamW, one launch over every tensor (full FT "
        "always steps with it); 'foreach' torch's default AdamW (what MMEngine builds from "
        "type='AdamW')",
    )


def run_options(cfg: dict | None) -> dict[str, str]:
    """The run options (``RUN_OPTIONS``) a variant's config carries."""
    return {k: cfg[k] for k in RUN_OPTIONS if cfg and k in cfg}


@contextlib.contextmanager
def applied(options: dict[str, str]) -> Iterator[None]:
    """``OPTIONS.rank_term``, ``OPTIONS.batched_linears`` and the native mode set as
    ``options`` say while inside (the variant's build too: whether a model plans batched
    builds before each forward depends on them)."""
    term, native, whole = OPTIONS.rank_term, native_mode(), OPTIONS.batched_linears
    builds = native_builds_mode()
    OPTIONS.rank_term = options.get("rank_term", term)
    OPTIONS.batched_linears = options.get("batched_linears", whole)
    mode = options.get("native", native)
    python_builds = mode == "python-builds"
    set_native_mode("auto" if python_builds else mode)
    set_native_builds_mode("off" if python_builds else builds)
    try:
        yield
    finally:
        OPTIONS.rank_term = term
        OPTIONS.batched_linears = whole
        set_native_mode(native)
        set_native_builds_mode(builds)


def with_run_options(step: Callable[[], float], options: dict[str, str]) -> Callable[[], float]:
    """``step`` run with the options ``options`` sets (:func:`applied`; read as each op
    is issued, so interleaved variants each keep their own)."""
    if not options:
        return step

    def run(*args: object) -> float:
        with applied(options):
            return step(*args)

    return run


def batched_spectra_for(label: str, args, option: str | None) -> bool:
    """Whether a variant builds its spectra batched: as its ``--batched-spectra`` option
    says, else as ``AdaptedBackbone`` does by default (eager, where a group to batch is)."""
    if option is not None:
        return option == "on"
    spectral = any(m in label for m in SPECTRAL)
    return spectral and (args.batched_spectra == [] or args.mode == "eager")


def prepare(
    spec: Backbone, label: str, model: nn.Module, args, options: dict[str, str] | None = None
) -> Prepared:
    """The training step of ``model`` (already on the device) on a fixed random batch,
    run with ``options`` (:func:`with_run_options`)."""
    if args.mode.startswith("compile"):
        # A fresh cache per variant: each adds guards to the same code objects, and past
        # dynamo's recompile limit a model would silently run eagerly.
        torch._dynamo.reset()
        counters.clear()
    if args.mode == "compile-blocks":
        compile_modules(model, spec.blocks, dynamic=False)
    x = torch.randn(spec.batch, 3, spec.size, spec.size, device=args.device)
    # Floor and adapters: gradients must flow through the whole (frozen) backbone.
    x.requires_grad_(label != "full FT")
    batched = batched_spectra_for(label, args, (options or {}).get("batched_spectra"))
    dtype = getattr(torch, args.dtype)
    # float16 steps scale the loss, as OpenMMLab's AmpOptimWrapper does (mmdet's AMP).
    scaler = torch.amp.GradScaler(x.device.type) if dtype == torch.float16 else None
    with applied(options or {}):
        step = train_step_fn(
            model, x, dtype, scaler, mode=args.mode, batched_spectra=batched,
            optimizer_kind=optimizer_kind(label, options),
        )  # fmt: skip
    return Prepared(label, model, with_run_options(step, options or {}), batched)


def peak_gib(args) -> float:
    """Peak device memory since the last reset (reserved for CUDA graphs, whose activations
    live in their pool), in GiB; 0 off CUDA."""
    if not args.device.startswith("cuda"):
        return 0.0
    peak = (
        torch.cuda.max_memory_reserved()
        if args.mode == "cuda-graph"
        else torch.cuda.max_memory_allocated()
    )
    return peak / 2**30


def result(spec: Backbone, run: Prepared, ms: float, peak: float, args) -> Result:
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    graphs = counters["stats"].get("unique_graphs", 0)
    breaks = sum(counters["graph_break"].values())
    # Tagged where `--batched-spectra` was given alone; its values tag the variants' names.
    label = run.label + (" batched" if run.batched and args.batched_spectra == [] else "")
    phases = host_phases(run.step, args.device, args.iters) if args.phases else None
    return Result(spec.name, label, ms, peak, trainable, args.mode, graphs, breaks, phases)


def measure(
    spec: Backbone, label: str, model: nn.Module, args, options: dict[str, str] | None = None
) -> Result:
    """Times ``model`` (already on the device, the only model there) and records its peak."""
    if args.device.startswith("cuda"):
        gc.collect()  # a graphed previous variant is a reference cycle
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    run = prepare(spec, label, model, args, options)
    ms = time_steps(run.step, args.device, args.warmup, args.iters)
    if args.profile and any(key in label for key in args.profile):
        profile(run.step, f"{spec.name} {label}", args)
    return result(spec, run, ms, peak_gib(args), args)


def profile(step: Callable[[], float], title: str, args) -> None:
    """GPU-busy time per step and the top operators by self device time (torch.profiler)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    sort = "self_cpu_time_total"
    if args.device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        sort = "self_cuda_time_total"
    synchronize(args.device)
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            step()
        synchronize(args.device)
    wall_ms = (time.perf_counter() - start) * 1e3 / 3
    # device-side events (kernels, memcpy/memset) only: operator rows repeat their time
    device_events = [e for e in prof.events() if e.device_type != torch.autograd.DeviceType.CPU]
    busy_ms = sum(e.time_range.elapsed_us() for e in device_events) / 1e3 / 3
    kernels = len(device_events) / 3
    print(
        f"\n#### profile: {title}: GPU busy {busy_ms:.1f} ms per step, {kernels:.0f} device ops "
        f"per step, wall {wall_ms:.1f} ms per step under the profiler",
        flush=True,
    )
    host = "self_cpu_time_total"
    sorts = {"device": [sort], "host": [host], "both": [sort, host]}[args.profile_sort]
    for key in dict.fromkeys(sorts):  # on a CPU run both orders are the host's: one table
        table = prof.key_averages().table(
            sort_by=key, row_limit=args.profile_rows, max_name_column_width=60
        )
        print(f"\n#### profile: {title} (3 steps, by {key})\n{table}", flush=True)


def variant(
    base: nn.Module, spec: Backbone, cfg: dict | None, device: str, frozen_dtype: str | None = None
) -> nn.Module:
    """A device copy of the CPU template: adapted with ``cfg`` (backbone frozen), or, for
    ``cfg`` None, the plain model whose trainability the template has. ``frozen_dtype``
    stores its frozen parameters in that dtype, as ``AdaptedBackbone(frozen_dtype=...)``."""
    model = copy.deepcopy(base)
    if cfg is not None:
        cfg = {k: v for k, v in cfg.items() if k not in RUN_OPTIONS}
        mm_spectral.inject(model, dict(cfg, targets=spec.targets))
    if frozen_dtype is not None:
        mm_spectral.cast_frozen(model, getattr(torch, frozen_dtype))
    return model.to(device)


def release(device: str) -> None:
    gc.collect()  # a graphed variant is a reference cycle (module ↔ its forward)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def make_nonzero(model: nn.Module) -> None:
    """Give every adapter a non-zero ΔW of modest size, as after some training."""
    with torch.no_grad():
        for _, layer in mm_spectral.adapted_layers(model):
            for name, p in layer.adapter.named_parameters():
                if name in ("lora_B", "core", "b_coefficients"):
                    p.normal_(0, 1e-3)


def replayable(step: Callable[[], object], device: str) -> Callable[[], object]:
    """``step`` captured once as a CUDA graph whose replay runs the same kernels without the
    host's per-op dispatch, so a timing shows GPU time alone; ``step`` itself off CUDA."""
    if not device.startswith("cuda"):
        return step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # lazy initialisation (cuBLAS handles, workspaces) before capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def inference_check(spec: Backbone, base: nn.Module, args) -> list[str]:
    """Merged-model inference time vs the base model, eager and (on CUDA) replayed as a CUDA
    graph, which removes the host noise from the comparison; merged vs unmerged outputs."""
    x = torch.randn(spec.batch, 3, spec.size, spec.size, device=args.device)
    lines = []

    @torch.no_grad()
    def infer(model):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, cache_enabled=False):
            return model.forward_features(x)

    plain = variant(base, spec, None, args.device).eval()
    plain_replay = replayable(lambda: infer(plain), args.device)
    warmup, iters = 2 * args.warmup, 3 * args.iters  # inference steps are short: more of them
    for name, cfg in args.adapters.items():
        model = variant(base, spec, cfg, args.device).eval()
        make_nonzero(model)
        unmerged_out = infer(model).float()
        # Merge, then back to the plain layer classes: the model merge_adapters.py exports.
        mm_spectral.remove_adapters(model)
        merged_out = infer(model).float()
        rel = ((merged_out - unmerged_out).norm() / unmerged_out.norm()).item()
        base_ms, merged_ms = time_interleaved(
            [lambda: infer(plain), lambda m=model: infer(m)], args.device, warmup, iters
        )
        merged_replay = replayable(lambda m=model: infer(m), args.device)
        base_gpu, merged_gpu = time_interleaved(
            [plain_replay, merged_replay], args.device, warmup, iters
        )
        lines.append(
            f"| {spec.name} | {name} | {base_ms:.1f} | {merged_ms:.1f} | "
            f"{merged_ms / base_ms:.3f}x | {base_gpu:.2f} | {merged_gpu:.2f} | "
            f"{merged_gpu / base_gpu:.3f}x | {rel:.2e} |"
        )
        del model, merged_replay
        release(args.device)
    return lines


def amp_check(spec: Backbone, base: nn.Module, args) -> list[str]:
    """A few AMP steps per adapter with fp16 (GradScaler) and bf16: losses and adapters stay
    finite and the adapters move. The loss regresses the features onto a fixed random target:
    a ViT's features end in a LayerNorm, whose mean square is 1 whatever the weights."""
    lines = []
    x = torch.randn(spec.batch, 3, spec.size, spec.size, device=args.device)
    for name, cfg in args.adapters.items():
        for dtype in (torch.float16, torch.bfloat16):
            if dtype == torch.float16 and not args.device.startswith("cuda"):
                continue
            model = variant(base, spec, cfg, args.device).train()
            with torch.no_grad():
                target = torch.randn_like(model.forward_features(x).float())
            before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
            step = with_run_options(
                train_step_fn(model, x, dtype, scaler, target=target), run_options(cfg)
            )
            losses = [step() for _ in range(args.amp_steps)]
            trained = {n: p for n, p in model.named_parameters() if n in before}
            finite = all(torch.isfinite(p).all() for p in trained.values())
            moved = sum(not torch.equal(p, before[n]) for n, p in trained.items())
            ok = finite and all(map(math.isfinite, losses)) and moved > 0
            lines.append(
                f"| {spec.name} | {name} | {str(dtype).split('.')[-1]} | "
                f"{losses[0]:.5g} → {losses[-1]:.5g} | {moved}/{len(trained)} | "
                f"{'ok' if ok else 'FAILED'} |"
            )
            del model
    return lines


def measure_training(spec: Backbone, base: nn.Module, args) -> list[Result]:
    """Full FT, the floor and every adapter, one model on the device at a time (or, with
    ``--interleave``, all at once)."""

    def on_device(cfg: dict | None) -> nn.Module:
        return variant(base, spec, cfg, args.device, args.frozen_dtype)

    if args.interleave:
        return measure_interleaved(spec, base, args)

    results = [measure(spec, "full FT", on_device(None), args)]
    print(results[-1], flush=True)
    release(args.device)
    for p in base.parameters():
        p.requires_grad_(False)
    results.append(measure(spec, "floor (frozen)", on_device(None), args))
    print(results[-1], flush=True)
    release(args.device)
    for name, cfg in args.adapters.items():
        results.append(measure(spec, name, on_device(cfg), args, run_options(cfg)))
        print(results[-1], flush=True)
        release(args.device)
    return results


def measure_interleaved(spec: Backbone, base: nn.Module, args) -> list[Result]:
    """Every variant resident at once, timed in alternating rounds (``time_interleaved``):
    a drift of the host's speed during the run, which on a shared host moves an eager step
    by tens of percent between runs, hits all of them alike, so their ratios hold. Peak
    memory is each variant's own: its peak during warm-up above what was resident before."""
    runs, peaks = [], []
    labels = [("full FT", None), ("floor (frozen)", None), *args.adapters.items()]
    for index, (label, cfg) in enumerate(labels):
        if index and args.mode == "cuda-graph" and args.device.startswith("cuda"):
            check_graph_room(torch.cuda.mem_get_info()[0], peaks, labels[index:])
        base.requires_grad_(label == "full FT")  # the plain variants take the template's
        resident = torch.cuda.memory_allocated() if args.device.startswith("cuda") else 0
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        model = variant(base, spec, cfg, args.device, args.frozen_dtype)
        run = prepare(spec, label, model, args, run_options(cfg))
        for _ in range(args.warmup):
            run.step()
        synchronize(args.device)
        peaks.append(max(0.0, peak_gib(args) - resident / 2**30))
        runs.append(run)
    times = time_interleaved([run.step for run in runs], args.device, 0, args.iters)
    results = [result(spec, run, ms, peak, args) for run, ms, peak in zip(runs, times, peaks)]
    for r in results:
        print(r, flush=True)
    del runs
    release(args.device)
    return results


def check_graph_room(free_bytes: int, peaks_gib: list[float], left: list) -> None:
    """Interleaved CUDA graphs keep every variant's private memory pool: stop with a clear
    message, before capturing, where the variants left would not fit in what is free
    (past that, captures have ended in an illegal memory access rather than an OOM)."""
    need = max(peaks_gib) * len(left) * 2**30
    if free_bytes < need:
        names = ", ".join(label for label, _ in left)
        raise SystemExit(
            f"--interleave --mode cuda-graph: {len(left)} more graph pools ({names}) need "
            f"about {need / 2**30:.1f} GiB, {free_bytes / 2**30:.1f} GiB are free. Time fewer "
            "variants at once (--variants), or without --interleave."
        )


def measure_peers(spec: Backbone, base: nn.Module, args) -> list[str]:
    """Ours vs HF peft on the same model, targets, rank / n and scale (see tools/peers.py)."""
    for p in base.parameters():
        p.requires_grad_(False)
    lines = []

    def frozen_cast(model: nn.Module) -> nn.Module:  # both sides alike
        if args.frozen_dtype is not None:
            mm_spectral.cast_frozen(model, getattr(torch, args.frozen_dtype))
        return model

    for pair in peers.peer_pairs(spec.name, base, args.tiny):
        mine = measure(spec, pair.label, frozen_cast(peers.ours(base, pair, args.device)), args)
        release(args.device)
        try:
            theirs = frozen_cast(peers.theirs(base, pair, args.device))
            other = measure(spec, pair.label, theirs, args)
            cells = (
                f"{other.step_ms:.1f}",
                f"{other.step_ms / mine.step_ms:.2f}x",
                f"{other.peak_gib:.2f}",
            )
        except RuntimeError as err:  # e.g. peft's FourierFT copies host tensors: no graph
            cells = (f"fails: {str(err).splitlines()[0][:60]}", "-", "-")
        release(args.device)
        lines.append(
            f"| {spec.name} {spec.batch}×{spec.size}² | {pair.label} | {mine.trainable:,} | "
            f"{mine.step_ms:.1f} | {cells[0]} | {cells[1]} | {mine.peak_gib:.2f} | {cells[2]} |"
        )
        print(lines[-1], flush=True)
    return lines


def print_training_table(results: list[Result], args, mode: str, device_name: str) -> None:
    """The rows of one mode; ratios to that mode's floor and full FT, and (for other modes
    than eager, when it ran) to eager full FT, the way OpenMMLab trains by default."""
    rows = [r for r in results if r.mode == mode]
    eager = [r for r in results if r.mode == "eager" and r.variant == "full FT"]
    extra = " | × eager full FT" if eager and mode != "eager" else ""
    frozen = f", frozen weights {args.frozen_dtype}" if args.frozen_dtype else ""
    print(
        f"\n### Training step, {args.dtype} autocast, AdamW (adapters: FlatAdamW unless labelled){frozen}, {mode} — {device_name}\n"
    )
    memory = "peak reserved (GiB)" if mode == "cuda-graph" else "peak (GiB)"
    print(
        f"| backbone, batch | variant | trainable | step (ms) | × floor | × full FT{extra} "
        f"| {memory} | vs floor |"
    )
    print("|---|---|---|---|---|---|---|---|" + ("---|" if extra else ""))
    for r in rows:
        floor = next(f for f in rows if f.backbone == r.backbone and f.variant.startswith("floor"))
        full = next(f for f in rows if f.backbone == r.backbone and f.variant == "full FT")
        spec = next(s for s in (TINY if args.tiny else BACKBONES) if s.name == r.backbone)
        mem = f"{100 * (r.peak_gib / floor.peak_gib - 1):+.1f}%" if floor.peak_gib else "-"
        vs_eager = ""
        if extra:
            eager_full = next(f for f in eager if f.backbone == r.backbone)
            vs_eager = f" | {r.step_ms / eager_full.step_ms:.3f}"
        print(
            f"| {r.backbone} {spec.batch}×{spec.size}² | {r.variant} | {r.trainable:,} | "
            f"{r.step_ms:.1f} | {r.step_ms / floor.step_ms:.3f} | {r.step_ms / full.step_ms:.3f}"
            f"{vs_eager} | {r.peak_gib:.2f} | {mem} |"
        )
    if mode.startswith("compile"):
        traced = ", ".join(f"{r.variant} {r.graphs}/{r.graph_breaks}" for r in rows)
        print(f"\ngraphs / graph breaks per variant: {traced}")
    if any(r.phases for r in rows):
        print_phases_table(rows, args)


def print_phases_table(rows: list[Result], args) -> None:
    """``--phases``: where each variant's step spends the host's time (:func:`host_phases`)."""
    print(
        f"\n#### Host time per phase, ms (median of {args.iters} steps, each variant in turn; "
        "a wait near 0 means the host set the pace)\n"
    )
    print("| backbone | variant | " + " | ".join(PHASES) + " | sum |")
    print("|---|---|" + "---|" * (len(PHASES) + 1))
    for r in rows:
        if r.phases:
            cells = " | ".join(f"{ms:.1f}" for ms in r.phases)
            print(f"| {r.backbone} | {r.variant} | {cells} | {sum(r.phases):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny backbones for a smoke run")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--amp-steps", type=int, default=5)
    parser.add_argument("--only", default=None, help="run only backbones whose name contains this")
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument(
        "--skip-training", action="store_true", help="only the inference and AMP checks"
    )
    parser.add_argument(
        "--profile",
        nargs="*",
        default=None,
        help="profile variants whose name contains one of these words",
    )
    parser.add_argument("--profile-rows", type=int, default=12)
    parser.add_argument(
        "--profile-sort",
        default="device",
        choices=["device", "host", "both"],
        help="order the profile's operators by self device time, by self host (CPU) time "
        "(what a host-bound eager step pays per op), or print both tables",
    )
    parser.add_argument(
        "--frozen-dtype",
        default=None,
        choices=["bfloat16", "float16"],
        help="store frozen parameters (floor, adapters) in this dtype, as "
        "AdaptedBackbone(frozen_dtype=...); full FT keeps float32 masters",
    )
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16"],
        help="autocast dtype of the training steps (float16 with a GradScaler, as mmdet's AMP)",
    )
    parser.add_argument(
        "--phases",
        action="store_true",
        help="also print the host's time per phase of each variant's step (forward, backward, "
        "optimizer, then the wait for the GPU): whether the host or the GPU sets the pace",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--peers", action="store_true", help="also time HF peft's LoRA and FourierFT (needs peft)"
    )
    parser.add_argument(
        "--mode",
        nargs="+",
        default=["eager"],
        choices=["eager", "compile-blocks", "compile-model", "cuda-graph"],
        help="how every variant (floor and full FT too) runs its forward and backward; "
        "several modes run one after the other in one table each (the peers: the first)",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="keep every variant on the device and time them in alternating rounds (ratios "
        "robust to the host's drift; eager and cuda-graph modes)",
    )
    parser.add_argument(
        "--variants",
        nargs="*",
        default=None,
        help="time only these adapters (names starting with one of the words, e.g. LoRA, "
        "'FLoRA r16'; floor and full FT always run)",
    )
    add_run_option_arguments(parser)
    args = parser.parse_args()
    modes = args.mode
    if args.interleave and any(m.startswith("compile") for m in modes):
        parser.error(
            "--interleave times eager and cuda-graph modes (compiled variants each "
            "reset dynamo's cache, so they cannot take turns)"
        )
    args.adapters = TINY_ADAPTERS if args.tiny else ADAPTERS
    if args.variants:
        args.adapters = {
            name: cfg
            for name, cfg in args.adapters.items()
            if any(name.startswith(w) for w in args.variants)
        }
    args.adapters = path_variants(
        args.adapters, args.rank_term, args.native, args.batched_spectra or None,
        args.batched_linears, args.optimizer,
    )  # fmt: skip

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    asked = args.batched_spectra
    batched = "eager mode" if asked is None else "per variant" if asked else "on"
    print(
        f"device: {device_name}; torch {torch.__version__}; timm {timm.__version__}; "
        f"rank term: {OPTIONS.rank_term}; fused low-rank kernels: {fused_low_rank_mode()}; "
        f"native nodes: {native_mode()}, {require_native_nodes()}; batched spectra: {batched}",
        flush=True,
    )
    results: list[Result] = []
    inference_lines: list[str] = []
    amp_lines: list[str] = []
    peer_lines: list[str] = []
    for spec in TINY if args.tiny else BACKBONES:
        if args.only and args.only not in spec.name:
            continue
        torch.manual_seed(0)
        base = build(spec).train()
        for mode in modes if not args.skip_training else []:
            args.mode = mode
            base.requires_grad_(True)  # full FT first, from a trainable template
            results += measure_training(spec, base, args)
        args.mode = modes[0]
        if not args.skip_inference:
            inference_lines += inference_check(spec, base, args)
            amp_lines += amp_check(spec, base, args)
        if args.peers:
            peer_lines += measure_peers(spec, base, args)
        del base

    for mode in modes if results else []:
        print_training_table(results, args, mode, device_name)
    if inference_lines:
        print(f"\n### Inference, merged vs base, bf16 — {device_name}\n")
        print(
            "| backbone | adapter | base (ms) | merged (ms) | ratio "
            "| base, graph (ms) | merged, graph (ms) | ratio | rel. diff merged vs unmerged |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        print("\n".join(inference_lines))
        print(f"\n### AMP training, {args.amp_steps} steps — {device_name}\n")
        print("| backbone | adapter | dtype | loss first → last | tensors updated | status |")
        print("|---|---|---|---|---|---|")
        print("\n".join(amp_lines))
    if peer_lines:
        memory = "peak reserved" if args.mode == "cuda-graph" else "peak"
        print(f"\n### Ours vs HF peft, training step, bf16, {args.mode} — {device_name}\n")
        print(
            f"| backbone, batch | adapter | trainable | ours (ms) | peft (ms) | peft / ours "
            f"| ours {memory} (GiB) | peft {memory} (GiB) |"
        )
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(peer_lines))
    if args.json:
        atomic_write_text(json.dumps([asdict(r) for r in results], indent=1), args.json)


if __name__ == "__main__":
    main()
