"""InternViT-6B full fine-tuning (the FLoRA paper's Table 2 "Full FT" baseline) sharded
with FSDP over the GPUs of one host: images/s and peak memory per GPU.

    torchrun --nproc_per_node 2 tools/benchmark_fsdp.py --preset internvit6b-full
    torchrun --nproc_per_node 2 tools/benchmark_fsdp.py --tiny --device cpu   # smoke (gloo)

Needs torch, timm and numpy only (no OpenMMLab): the backbone is mm_spectral's InternViT6B
(48 blocks, width 3200, QK-norm, layer scale, its 4-scale simple pyramid), loaded from its
source file; where mmengine is missing, its ``BaseModule`` and ``MODELS`` get minimal
stand-ins (an ``nn.Module`` that keeps ``init_cfg``, a registry that registers nothing).
The head is a per-level 1×1 classifier summed at the finest scale with cross-entropy on
random labels, not UperNet: the step is the backbone's, the head is a small part of it.

Every parameter trains (random init: no pretrained weights are needed to time a step).
FSDP: FULL_SHARD, ``use_orig_params=True``, one unit per ``InternBlock``
(``frozen_apart_wrap_policy``), bf16 compute and gradient reduction with fp32 master
weights (CUDA), activation checkpointing per block, AdamW. Timed: ``--steps`` steps after
``--warmup``, synchronised; images/s = world size × batch / median step time; peak memory
is ``torch.cuda.max_memory_allocated`` (and reserved) per rank after wrapping (on CPU: the
process's peak resident set size).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import resource
import runpy
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import MixedPrecision, ShardingStrategy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

from mm_spectral.distributed import frozen_apart_wrap_policy  # noqa: E402  (torch only)
from mm_spectral.distributed.process_exit import (  # noqa: E402
    finish_process_group,
    leave_process,
    report_crashes,
)

BACKBONES = ROOT / "mm_spectral" / "openmmlab" / "backbones"
MODEL_CONFIG = ROOT / "configs" / "_base_" / "models" / "upernet_internvit-6b.py"


def internvit6b_arch() -> dict:
    """The backbone settings of the project's InternViT-6B configs (a plain-Python file:
    read without MMEngine), less the pretrained checkpoint."""
    arch = dict(runpy.run_path(str(MODEL_CONFIG))["internvit_6b"])
    for key in ("type", "init_cfg"):
        arch.pop(key)
    return arch


PRESETS = {
    # ADE20K 512², 2 images per GPU, as configs/ade20k/upernet_internvit-6b-*_8xb2-*.
    "internvit6b-full": dict(arch=internvit6b_arch, size=512, batch=2, classes=150),
    "tiny": dict(
        arch=lambda: dict(
            embed_dim=64,
            depth=4,
            num_heads=4,
            patch_size=14,
            out_indices=(0, 1, 2, 3),
            drop_path_rate=0.1,
            with_cp=True,
        ),
        size=56,
        batch=2,
        classes=8,
    ),
}


def load_internvit6b() -> type[nn.Module]:
    """The InternViT6B class. Where the OpenMMLab stack is missing (the GPU machine), its
    file is imported without running ``mm_spectral.openmmlab/__init__`` (registration):
    the two packages above it become bare namespaces and mmengine's two names stand-ins;
    its own imports (the torch-only core, timm, ``pyramid.py``) resolve as usual."""
    try:
        import mmengine.model  # noqa: F401
        import mmengine.registry  # noqa: F401
    except ImportError:
        _install_mmengine_stand_ins()
        import mm_spectral

        for name, path in (
            ("mm_spectral.openmmlab", BACKBONES.parent),
            ("mm_spectral.openmmlab.backbones", BACKBONES),
        ):
            if name not in sys.modules:
                package = types.ModuleType(name)
                package.__path__ = [str(path)]
                sys.modules[name] = package
        mm_spectral.openmmlab = sys.modules["mm_spectral.openmmlab"]
    module = importlib.import_module("mm_spectral.openmmlab.backbones.internvit6b")
    return module.InternViT6B


def _install_mmengine_stand_ins() -> None:
    class BaseModule(nn.Module):
        """What InternViT6B uses of mmengine's BaseModule: an nn.Module with init_cfg."""

        def __init__(self, init_cfg=None) -> None:
            super().__init__()
            self.init_cfg = init_cfg

    class Registry:
        """A registry that leaves classes as they are (nothing is built from configs)."""

        def register_module(self, *args, **kwargs):
            return lambda cls: cls

    model = types.ModuleType("mmengine.model")
    model.BaseModule = BaseModule
    registry = types.ModuleType("mmengine.registry")
    registry.MODELS = Registry()
    root = types.ModuleType("mmengine")
    root.model, root.registry = model, registry
    sys.modules.update({"mmengine": root, "mmengine.model": model, "mmengine.registry": registry})


class Segmenter(nn.Module):
    """Backbone + per-level 1×1 classifiers, upsampled to the labels' size and summed."""

    def __init__(self, backbone: nn.Module, channels: int, classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifiers = nn.ModuleList(nn.Conv2d(channels, classes, 1) for _ in range(4))

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        maps = self.backbone(images)
        size = labels.shape[-2:]
        logits = sum(
            F.interpolate(head(m), size=size, mode="bilinear", align_corners=False)
            for head, m in zip(self.classifiers, maps)
        )
        return F.cross_entropy(logits.float(), labels)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["internvit6b-full"], default="internvit6b-full")
    parser.add_argument("--tiny", action="store_true", help="a small model (smoke runs)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--batch", type=int, help="images per GPU (default: the preset's)")
    parser.add_argument("--size", type=int, help="image side (default: the preset's)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--lr", type=float, default=1e-4)
    return parser.parse_args(argv)


def setup(device_kind: str) -> torch.device:
    """The process group from torchrun's environment: NCCL on GPUs, gloo on the CPU."""
    if device_kind == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def build(args: argparse.Namespace, preset: dict, device: torch.device) -> nn.Module:
    """The model on ``device``, identical on every rank (same seed), sharded by FSDP."""
    torch.manual_seed(0)
    internvit6b = load_internvit6b()
    with device:  # build where it runs: a 6B model initialises in seconds on a GPU
        backbone = internvit6b(**preset["arch"])
        model = Segmenter(backbone, preset["arch"]["embed_dim"], preset["classes"])
    cuda = device.type == "cuda"
    policy = functools.partial(
        frozen_apart_wrap_policy, module_classes=("InternBlock",), min_num_params=10**9
    )
    return FSDP(
        model,
        auto_wrap_policy=policy,
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        use_orig_params=True,
        device_id=device,
        mixed_precision=MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
        if cuda
        else None,  # bf16 matmuls on a CPU are emulated: the smoke run stays float32
        limit_all_gathers=True,
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """GiB: CUDA allocated and reserved peaks, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return dict(
            allocated=torch.cuda.max_memory_allocated(device) / 2**30,
            reserved=torch.cuda.max_memory_reserved(device) / 2**30,
        )
    return dict(rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # KiB → GiB


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    preset = dict(PRESETS["tiny" if args.tiny else args.preset])
    preset["arch"] = preset["arch"]()
    batch, size = args.batch or preset["batch"], args.size or preset["size"]
    device = setup(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(args, preset, device)
    params = sum(p.numel() for p in model.parameters())  # this rank's shard
    total = torch.tensor(params, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    fused = dict(fused=True) if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05, **fused)
    gen = torch.Generator(device=device).manual_seed(1 + rank)
    images = torch.randn(batch, 3, size, size, device=device, generator=gen)
    labels = torch.randint(0, preset["classes"], (batch, size // 4, size // 4), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    times, losses = [], []
    for step in range(args.warmup + args.steps):
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(images, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss.item())

    stats = dict(rank=rank, step_s=statistics.median(times), loss=losses, **peak_memory(device))
    gathered: list = [None] * world
    dist.all_gather_object(gathered, stats)
    result = None
    if rank == 0:
        slowest = max(s["step_s"] for s in gathered)  # the ranks wait for each other
        images_s = world * batch / slowest
        name = "tiny InternViT6B" if args.tiny else args.preset
        print(
            f"{name}: {int(total.item()):,} parameters, all trainable, FSDP FULL_SHARD on "
            f"{world} x {device.type}, batch {batch}/rank, {size}x{size}, {args.steps} steps"
        )
        print(f"images/s: {images_s:.2f} (median step {slowest * 1000:.1f} ms)")
        for s in gathered:
            memory = ", ".join(
                f"{k} {v:.2f} GiB" for k, v in s.items() if k in ("allocated", "reserved", "rss")
            )
            print(
                f"rank {s['rank']}: peak {memory}; loss {s['loss'][0]:.4f} -> {s['loss'][-1]:.4f}"
            )
        result = dict(images_s=images_s, ranks=gathered, parameters=int(total.item()))
    finish_process_group()  # a gloo group is left to leave_process (see process_exit)
    return result


if __name__ == "__main__":
    report_crashes()  # a rank killed by a signal prints its Python stacks
    main()
    if dist.is_initialized():
        leave_process()
