"""Training-step and inference benchmark of the adapters on real backbone sizes (GPU).

For each backbone: the floor (backbone frozen, gradients still flow through it to the
input), full fine-tuning, and each adapter at the papers' settings; bf16 autocast, AdamW,
median CUDA-synchronised step time after warm-up and peak memory. Then merged-model
inference against the base model, and a short fp16/bf16 AMP run per adapter checking that
nothing turns NaN/inf. Prints a markdown table (ratios to the floor of the same run).

    python tools/benchmark.py                       # ConvNeXt-V2-L 2x1024², ViT-L/16 4x512²
    python tools/benchmark.py --tiny --device cpu   # a seconds-long smoke run of the same code
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import timm
import torch
from torch import nn

import mm_spectral

CONVNEXT_TARGETS = [
    r"stem\.0",
    r"stages\.\d+\.downsample\.1",
    r"stages\.\d+\.blocks\.\d+\.(conv_dw|mlp\.fc1|mlp\.fc2)",
]
VIT_TARGETS = [r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"]

# The papers' settings (FLoRA Table 9 / FourierFT / FoRA), the same for both backbones.
ADAPTERS = {
    "LoRA r16": dict(type="LoRA", rank=16, alpha=16),
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


BACKBONES = [
    Backbone("ConvNeXt-V2-L", "convnextv2_large", 2, 1024, CONVNEXT_TARGETS, {}),
    Backbone(
        "ViT-L/16",
        "vit_large_patch16_224",
        4,
        512,
        VIT_TARGETS,
        dict(img_size=512, dynamic_img_size=True),
    ),
]
TINY = [
    Backbone("ConvNeXt-V2-atto", "convnextv2_atto", 2, 64, CONVNEXT_TARGETS, {}),
    Backbone(
        "ViT-tiny",
        "vit_tiny_patch16_224",
        2,
        64,
        VIT_TARGETS,
        dict(img_size=64, dynamic_img_size=True, depth=2),
    ),
]


@dataclass
class Result:
    backbone: str
    variant: str
    step_ms: float
    peak_gib: float
    trainable: int


def build(spec: Backbone, device: str) -> nn.Module:
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **spec.timm_kwargs)
    return model.to(device)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(step: Callable[[], None], device: str, warmup: int, iters: int) -> float:
    """Median wall time of one step in milliseconds, synchronised around each step."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def train_step_fn(
    model: nn.Module,
    x: torch.Tensor,
    dtype: torch.dtype,
    scaler: torch.amp.GradScaler | None = None,
) -> Callable[[], float]:
    params = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW: one kernel set for all tensors (foreach costs ms for hundreds of small ones)
    fused = x.device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=fused) if params else None
    device_type = x.device.type

    def step() -> float:
        with torch.autocast(device_type, dtype=dtype):
            loss = model.forward_features(x).float().square().mean()
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if optimizer is not None:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        x.grad = None
        return loss.item()

    return step


def measure(spec: Backbone, variant: str, model: nn.Module, args) -> Result:
    x = torch.randn(spec.batch, 3, spec.size, spec.size, device=args.device)
    # Floor and adapters: gradients must flow through the whole (frozen) backbone.
    x.requires_grad_(variant != "full FT")
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step = train_step_fn(model, x, torch.bfloat16)
    ms = time_steps(step, args.device, args.warmup, args.iters)
    if args.profile and any(key in variant for key in args.profile):
        profile(step, f"{spec.name} {variant}", args)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else 0.0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Result(spec.name, variant, ms, peak, trainable)


def profile(step: Callable[[], float], title: str, args) -> None:
    """Top operators by self device time over a few steps (torch.profiler)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    sort = "self_cpu_time_total"
    if args.device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        sort = "self_cuda_time_total"
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            step()
        synchronize(args.device)
    table = prof.key_averages().table(
        sort_by=sort, row_limit=args.profile_rows, max_name_column_width=60
    )
    print(f"\n#### profile: {title} (3 steps)\n{table}", flush=True)


def adapted(base: nn.Module, spec: Backbone, cfg: dict) -> nn.Module:
    model = copy.deepcopy(base)
    mm_spectral.inject(model, dict(cfg, targets=spec.targets))
    return model


def make_nonzero(model: nn.Module) -> None:
    """Give every adapter a non-zero ΔW of modest size, as after some training."""
    with torch.no_grad():
        for _, layer in mm_spectral.adapted_layers(model):
            for name, p in layer.adapter.named_parameters():
                if name in ("lora_B", "core", "b_coefficients"):
                    p.normal_(0, 1e-3)


def inference_check(spec: Backbone, base: nn.Module, args) -> list[str]:
    """Merged-model inference time vs the base model, and merged vs unmerged outputs."""
    x = torch.randn(spec.batch, 3, spec.size, spec.size, device=args.device)
    lines = []

    @torch.no_grad()
    def infer(model):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return model.forward_features(x)

    base.eval()
    warmup, iters = 2 * args.warmup, 3 * args.iters  # inference steps are short: more of them
    base_ms = time_steps(lambda: infer(base), args.device, warmup, iters)
    for name, cfg in args.adapters.items():
        model = adapted(base, spec, cfg).eval()
        make_nonzero(model)
        unmerged_out = infer(model).float()
        mm_spectral.merge(model)
        merged_out = infer(model).float()
        rel = ((merged_out - unmerged_out).norm() / unmerged_out.norm()).item()
        merged_ms = time_steps(lambda m=model: infer(m), args.device, warmup, iters)
        lines.append(
            f"| {spec.name} | {name} | {base_ms:.1f} | {merged_ms:.1f} | "
            f"{merged_ms / base_ms:.3f}x | {rel:.2e} |"
        )
        del model
    return lines


def amp_check(spec: Backbone, base: nn.Module, args) -> list[str]:
    """A few AMP steps per adapter with fp16 (GradScaler) and bf16: losses stay finite."""
    lines = []
    x = torch.randn(spec.batch, 3, spec.size, spec.size, device=args.device)
    for name, cfg in args.adapters.items():
        for dtype in (torch.float16, torch.bfloat16):
            if dtype == torch.float16 and not args.device.startswith("cuda"):
                continue
            model = adapted(base, spec, cfg).train()
            scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
            step = train_step_fn(model, x, dtype, scaler)
            losses = [step() for _ in range(args.amp_steps)]
            finite = all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)
            ok = finite and all(map(lambda v: v == v and abs(v) != float("inf"), losses))
            lines.append(
                f"| {spec.name} | {name} | {str(dtype).split('.')[-1]} | "
                f"{losses[0]:.4g} → {losses[-1]:.4g} | {'ok' if ok else 'NaN/inf'} |"
            )
            del model
    return lines


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
        "--profile",
        nargs="*",
        default=None,
        help="profile variants whose name contains one of these words",
    )
    parser.add_argument("--profile-rows", type=int, default=12)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    args.adapters = TINY_ADAPTERS if args.tiny else ADAPTERS

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device: {device_name}; torch {torch.__version__}; timm {timm.__version__}", flush=True)
    results: list[Result] = []
    inference_lines: list[str] = []
    amp_lines: list[str] = []
    for spec in TINY if args.tiny else BACKBONES:
        if args.only and args.only not in spec.name:
            continue
        torch.manual_seed(0)
        base = build(spec, args.device)
        full = base.train()
        results.append(measure(spec, "full FT", full, args))
        print(results[-1], flush=True)
        for p in base.parameters():
            p.requires_grad_(False)
        results.append(measure(spec, "floor (frozen)", base, args))
        print(results[-1], flush=True)
        for name, cfg in args.adapters.items():
            model = adapted(base, spec, cfg).train()
            results.append(measure(spec, name, model, args))
            print(results[-1], flush=True)
            del model
        if not args.skip_inference:
            inference_lines += inference_check(spec, base, args)
            amp_lines += amp_check(spec, base, args)
        del base, full

    print(f"\n### Training step, bf16 autocast, AdamW — {device_name}\n")
    print(
        "| backbone, batch | variant | trainable | step (ms) | × floor | × full FT | peak (GiB) | peak vs floor |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        floor = next(
            f for f in results if f.backbone == r.backbone and f.variant.startswith("floor")
        )
        full = next(f for f in results if f.backbone == r.backbone and f.variant == "full FT")
        spec = next(s for s in (TINY if args.tiny else BACKBONES) if s.name == r.backbone)
        mem = f"{100 * (r.peak_gib / floor.peak_gib - 1):+.1f}%" if floor.peak_gib else "-"
        print(
            f"| {r.backbone} {spec.batch}×{spec.size}² | {r.variant} | {r.trainable:,} | "
            f"{r.step_ms:.1f} | {r.step_ms / floor.step_ms:.3f} | {r.step_ms / full.step_ms:.3f} | "
            f"{r.peak_gib:.2f} | {mem} |"
        )
    if inference_lines:
        print(f"\n### Inference, merged vs base, bf16 — {device_name}\n")
        print(
            "| backbone | adapter | base (ms) | merged (ms) | ratio | rel. diff merged vs unmerged |"
        )
        print("|---|---|---|---|---|---|")
        print("\n".join(inference_lines))
        print(f"\n### AMP training, {args.amp_steps} steps — {device_name}\n")
        print("| backbone | adapter | dtype | loss first → last | finite |")
        print("|---|---|---|---|---|")
        print("\n".join(amp_lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)


if __name__ == "__main__":
    main()
