"""Whole-model training-step benchmark from the project's configs (GPU).

``--preset maskrcnn``: Mask R-CNN ConvNeXt-V2-L, every variant (Base = the floor, full FT,
each adapter), 2 x 1024², boxes and masks. ``--preset vit-upernet``: UperNet ViT-L/16 with
LoRA, FourierFT and FoRA at 512². ``--preset internvit6b``: InternViT-6B + FLoRA r16 UperNet
at 512², activation checkpointing. UperNet presets keep frozen backbone weights in bf16;
images/s and peak memory (with ``--cuda-graph``: peak reserved, where a graph's pool lives). Each model is built through its toolbox's registry and fed a fixed
synthetic batch; forward + losses + backward + AdamW (FlatAdamW for adapters) under bf16
autocast, median of CUDA-synchronised steps after warm-up.

    python tools/benchmark_model.py --preset maskrcnn
    python tools/benchmark_model.py --preset vit-upernet [--cuda-graph]
    python tools/benchmark_model.py --preset internvit6b --batch 4
    python tools/benchmark_model.py --preset maskrcnn --cuda-graph   # backbone as a CUDA graph
    python tools/benchmark_model.py --preset maskrcnn --shapes 800x1216 800x1088   # varying sizes
    python tools/benchmark_model.py --preset maskrcnn --interleave   # all resident, in turns
    python tools/benchmark_model.py --preset vit-upernet --compile   # compile=True
    python tools/benchmark_model.py --preset maskrcnn --device cpu --tiny   # smoke run
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os.path as osp
import sys
from collections.abc import Callable

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402
from mmengine.config import Config, ConfigDict  # noqa: E402

import mm_spectral.openmmlab  # noqa: E402,F401  (registers the project's classes)
from mm_spectral.compile import compile_modules  # noqa: E402
from mm_spectral.cuda_graph import enable_cuda_graph  # noqa: E402
from tools.benchmark import (  # noqa: E402
    add_run_option_arguments,
    applied,
    make_optimizer,
    optimizer_kind,
    path_variants,
    require_native_nodes,
    run_options,
    time_interleaved,
    with_run_options,
)

VARIANTS = {
    "floor (Base, frozen)": "configs/coco/mask-rcnn_convnextv2-l-base_fpn_8xb4-1x_coco.py",
    "full FT": "configs/coco/mask-rcnn_convnextv2-l-full_fpn_8xb4-1x_coco.py",
    "LoRA r16": "configs/coco/mask-rcnn_convnextv2-l-lora-r16_fpn_8xb4-1x_coco.py",
    "DoRA r16 (loralib convs)": "configs/coco/mask-rcnn_convnextv2-l-dora-loralib-r16_fpn_8xb4-1x_coco.py",
    "FLoRA r16": "configs/coco/mask-rcnn_convnextv2-l-flora-r16_fpn_8xb4-1x_coco.py",
    "FourierFT n3000": "configs/coco/mask-rcnn_convnextv2-l-fourierft-n3000_fpn_8xb4-1x_coco.py",
    "FoRA r64 n8000": "configs/coco/mask-rcnn_convnextv2-l-fora-r64-n8000_fpn_8xb4-1x_coco.py",
}


VIT_UPERNET = {
    "LoRA r16": "configs/ade20k/upernet_vit-l-lora-r16_8xb2-160k_ade20k-512x512.py",
    "FourierFT n3000": "configs/ade20k/upernet_vit-l-fourierft-n3000_8xb2-160k_ade20k-512x512.py",
    "FoRA r64 n8000": "configs/ade20k/upernet_vit-l-fora-r64-n8000_8xb2-160k_ade20k-512x512.py",
}

INTERNVIT_6B = {
    "InternViT-6B FLoRA r16 (bf16 frozen, with_cp)": "configs/ade20k/upernet_internvit-6b-flora-r16_8xb2-160k_ade20k-504x504.py",
}


def synthetic_seg_batch(batch: int, size: int, num_classes: int, seed: int = 0):
    """A packed segmentation batch: images and dense labels."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    gen = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for _ in range(batch):
        inputs.append(torch.randint(0, 256, (3, size, size), generator=gen, dtype=torch.uint8))
        sample = SegDataSample(
            metainfo=dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size))
        )
        labels = torch.randint(0, num_classes, (1, size, size), generator=gen)
        sample.gt_sem_seg = PixelData(data=labels)
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def synthetic_batch(
    batch: int, size: int | tuple[int, int], num_classes: int, device: str, seed: int = 0
):
    """A packed batch as the data loader would give it: images (``size`` square or (h, w))
    plus boxes, labels, masks."""
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    height, width = (size, size) if isinstance(size, int) else size
    extent = torch.tensor([width, height], dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for _ in range(batch):
        inputs.append(torch.randint(0, 256, (3, height, width), generator=gen, dtype=torch.uint8))
        n = 8
        xy = torch.rand(n, 2, generator=gen) * extent * 0.7
        wh = torch.rand(n, 2, generator=gen) * extent * 0.25 + 16
        boxes = torch.minimum(torch.cat([xy, xy + wh], 1), extent.repeat(2) - 1)
        masks = torch.zeros(n, height, width, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        sample = DetDataSample(
            metainfo=dict(
                img_shape=(height, width),
                ori_shape=(height, width),
                pad_shape=(height, width),
                scale_factor=(1.0, 1.0),
            )
        )
        sample.gt_instances = InstanceData(
            bboxes=boxes,
            labels=torch.randint(0, num_classes, (n,), generator=gen),
            masks=BitmapMasks(masks.numpy(), height, width),
        )
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def set_batched_spectra(cfg: Config, option: str | None, asked: list[str] | None) -> None:
    """``AdaptedBackbone(batched_spectra=...)`` as the variant's ``--batched-spectra`` option
    says ('on' / 'off'; the flag alone: on), else the config's own setting."""
    if cfg.model.backbone.type != "AdaptedBackbone":
        return
    if option is not None:
        cfg.model.backbone.batched_spectra = option == "on"
    elif asked == []:
        cfg.model.backbone.batched_spectra = True


def shrink_detection_heads(model: ConfigDict, channels: int) -> None:
    """Mask R-CNN's FPN, RPN and RoI heads at ``channels`` wide (256 and 1024 in the
    paper's config: 20M parameters, most of a CPU smoke step's time)."""
    model.neck.out_channels = channels
    model.rpn_head.update(in_channels=channels, feat_channels=channels)
    roi = model.roi_head
    roi.bbox_roi_extractor.out_channels = roi.mask_roi_extractor.out_channels = channels
    roi.bbox_head.update(in_channels=channels, fc_out_channels=2 * channels)
    roi.mask_head.update(in_channels=channels, conv_out_channels=channels)


# The first variant's neck and heads, by their layout (one entry per invocation's preset).
_SHARED_HEADS: dict[tuple, dict[str, torch.Tensor]] = {}


def share_heads(model: torch.nn.Module, store: dict[tuple, dict[str, torch.Tensor]]) -> None:
    """Give ``model`` the neck and heads of the first variant built with the same layout.

    A detector's step costs what its data-dependent parts (proposals, sampled RoIs, mask
    targets) make it cost, which follows the heads' weights: with each variant's own
    random heads, variants differ by more than their backbones. With the same heads, the same frozen backbone (seeded) and each step's sampling
    seeded by its index, the variants differ only in their backbones' adapters (which
    start at ΔW = 0)."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    layout = tuple((k, tuple(v.shape), v.dtype) for k, v in state.items())
    if layout not in store:
        store[layout] = {k: v.detach().clone() for k, v in state.items()}
    model.load_state_dict(store[layout], strict=False)


def prepare_config(
    path: str, args, options: dict[str, str] | None = None
) -> tuple[Callable[[], None], int]:
    """(one training step of the config's model on a fixed synthetic batch, its trainable
    parameter count), built on the device and warmed up; run with ``options``
    (``OPTIONS.rank_term``, the native mode: ``benchmark.with_run_options``)."""
    from mm_spectral.openmmlab import build_model

    cfg = Config.fromfile(path)
    inner = cfg.model.backbone.get("backbone", cfg.model.backbone)
    inner.pop("init_cfg", None)  # timing only: no pretrained weights needed
    segmentation = cfg.default_scope == "mmseg"
    if segmentation:
        cfg.model.backbone.frozen_dtype = "bfloat16"
        cfg.model.data_preprocessor.size = (args.size, args.size)
    if args.tiny:  # small backbones for a CPU smoke run of the same code
        if inner.type == "InternViT6B":
            inner.update(embed_dim=48, depth=4, num_heads=3, out_indices=(0, 1, 2, 3))
            cfg.model.decode_head.in_channels = [48] * 4
            cfg.model.auxiliary_head.in_channels = 48
        elif inner.type == "TimmViT":
            inner.update(arch="vit_tiny_patch16_224", out_indices=(2, 5, 8, 11))
            cfg.model.decode_head.in_channels = [192] * 4
            cfg.model.auxiliary_head.in_channels = 192
        else:
            inner.arch = "atto"
            cfg.model.neck.in_channels = [40, 80, 160, 320]
            shrink_detection_heads(cfg.model, channels=32)
        if segmentation:  # UperNet's 512-channel heads alone take a minute per CPU step
            cfg.model.decode_head.channels = 32
            cfg.model.auxiliary_head.channels = 16
        adapter = cfg.model.backbone.get("adapter")
        if adapter and "n" in adapter:  # tiny layers hold fewer entries than n
            adapter.n //= 10
    set_batched_spectra(cfg, (options or {}).get("batched_spectra"), args.batched_spectra)
    if args.cuda_graph and cfg.model.backbone.type == "AdaptedBackbone":
        cfg.model.backbone.cuda_graph = True  # the user-facing switch
    if args.compile:
        torch._dynamo.reset()  # a fresh cache per variant (recompile limits, old guards)
        if cfg.model.backbone.type == "AdaptedBackbone":
            cfg.model.backbone.compile = True  # the user-facing switch
    torch.manual_seed(0)  # the same frozen backbone weights in every variant
    # Built under the variant's options: whether it plans batched builds depends on them.
    with torch.device(args.device), applied(options or {}):  # on the device (6B: seconds)
        model = build_model(cfg).train()
    model.to(args.device)  # also tells the data preprocessor which device it is on
    share_heads(model, _SHARED_HEADS)
    if args.cuda_graph and not getattr(model.backbone, "with_cp", False):
        enable_cuda_graph(model.backbone)  # every variant alike (AdaptedBackbone: set in cfg)
    if args.compile and cfg.model.backbone.type != "AdaptedBackbone":
        compile_modules(model.backbone)  # full FT: the same compile of the plain backbone
    if segmentation:
        batches = [synthetic_seg_batch(args.batch, args.size, cfg.model.decode_head.num_classes)]
    else:  # one batch per --shapes entry, used in turn (detection's varying sizes)
        batches = [synthetic_batch(args.batch, hw, 80, args.device) for hw in args.shapes]
    inputs = [model.data_preprocessor(batch, training=True) for batch in batches]
    turn = itertools.count()
    params = [p for p in model.parameters() if p.requires_grad]
    kind = (options or {}).get("optimizer", "fused")
    optimizer = make_optimizer(params, kind, args.device.split(":")[0], weight_decay=0.05)

    dtype = getattr(torch, args.dtype)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    def step() -> None:
        index = next(turn)
        data = inputs[index % len(inputs)]
        # Each variant's k-th step samples the same proposals and RoIs (see share_heads).
        torch.manual_seed(index)
        with torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            losses = model(**data, mode="loss")
        loss, _ = model.parse_losses(losses)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)

    step = with_run_options(step, options or {})
    # Past every shape at least twice: compiling meets each shape (and recompiles with
    # dynamic shapes at the second) during warm-up.
    for _ in range(max(args.warmup, 2 * len(inputs) + 1 if args.compile else 0)):
        step()
    return step, sum(p.numel() for p in params)


def peak_gib(args) -> float:
    """Peak device memory since the last reset, GiB (reserved with CUDA graphs, whose
    activations live in their pool); 0 off CUDA."""
    if not args.device.startswith("cuda"):
        return 0.0
    cuda = torch.cuda
    return (cuda.max_memory_reserved() if args.cuda_graph else cuda.max_memory_allocated()) / 2**30


def time_config(path: str, args, options: dict[str, str] | None = None) -> tuple[float, float, int]:
    """(median step ms, peak GiB, trainable parameters) of one config, alone on the device."""
    gc.collect()  # the previous variant (a graphed backbone holds a reference cycle)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    step, trainable = prepare_config(path, args, options)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ms = time_interleaved([step], args.device, 0, args.iters, rounds=1)[0]
    return ms, peak_gib(args), trainable


def time_configs_interleaved(
    runs: list[tuple[str, dict[str, str]]], args
) -> list[tuple[float, float, int]]:
    """Every (config, run options) model resident at once, timed in alternating rounds, so
    that a drift of the host's speed hits all alike; peaks are each model's own (above what
    was resident before it was built, over its warm-up)."""
    steps, peaks, counts = [], [], []
    for path, options in runs:
        resident = torch.cuda.memory_allocated() if args.device.startswith("cuda") else 0
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        step, trainable = prepare_config(path, args, options)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        peaks.append(max(0.0, peak_gib(args) - resident / 2**30))
        steps.append(step)
        counts.append(trainable)
    times = time_interleaved(steps, args.device, 0, args.iters)
    return list(zip(times, peaks, counts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", choices=["maskrcnn", "vit-upernet", "internvit6b"], default="maskrcnn"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batch", type=int, default=None, help="default 2 (maskrcnn), 4 (6B)")
    parser.add_argument("--size", type=int, default=None, help="default 1024 (maskrcnn), 512")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float16", "bfloat16", "float32"],
        help="autocast dtype; default float16 for Mask R-CNN (mmcv's NMS has "
        "no bf16 kernel; mmdet's AMP is fp16; float32 on a CPU), bfloat16 for UperNet",
    )
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument(
        "--only", nargs="*", default=None, help="run only variants whose name contains one of these"
    )
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay each backbone's forward+backward as a CUDA graph (AdaptedBackbone's "
        "cuda_graph=True); the rest of the model stays eager",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each backbone (AdaptedBackbone's compile=True; full FT's plain "
        "backbone alike); the rest of the model stays eager; warm-up covers the compiles",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="keep every variant's model on the device and time them in alternating rounds "
        "(ratios robust to the host's drift; not with --compile)",
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        help="Mask R-CNN: input sizes HxW used in turn, one batch each (e.g. 800x1216 "
        "800x1088 736x1344: keep-ratio resizes padded to 32, as COCO's pipeline gives); "
        "default: one square --size",
    )
    add_run_option_arguments(parser)
    args = parser.parse_args()
    if args.compile and args.cuda_graph:
        parser.error("use one of --compile and --cuda-graph")
    if args.compile and args.interleave:
        parser.error(
            "--interleave cannot take turns between compiled variants (each resets dynamo's cache)"
        )
    maskrcnn = args.preset == "maskrcnn"
    on_cpu = not args.device.startswith("cuda")
    # mmcv's CPU NMS takes float32 only: a CPU smoke run of Mask R-CNN stays in float32.
    args.dtype = args.dtype or (("float32" if on_cpu else "float16") if maskrcnn else "bfloat16")
    args.batch = args.batch or (2 if maskrcnn else 4)
    args.size = args.size or (1024 if maskrcnn else 512)
    if args.tiny:
        args.size = min(args.size, 256 if maskrcnn else 112)
    if args.shapes and not maskrcnn:
        parser.error("--shapes is for --preset maskrcnn (UperNet trains on fixed crops)")
    args.shapes = [tuple(int(v) for v in hw.split("x")) for hw in args.shapes or []] or [
        (args.size, args.size)
    ]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"native nodes: {require_native_nodes()}", flush=True)
    presets = {"maskrcnn": VARIANTS, "vit-upernet": VIT_UPERNET, "internvit6b": INTERNVIT_6B}
    chosen = {
        name: path
        for name, path in presets[args.preset].items()
        if not args.only or any(word in name for word in args.only)
    }
    # Low-rank variants once per asked-for rank-term form and native mode.
    methods = {name: name.split()[0] for name in chosen}
    expanded = path_variants(
        {name: dict(type=methods[name], path=path) for name, path in chosen.items()},
        args.rank_term,
        args.native,
        args.batched_spectra or None,
        args.batched_linears,
        args.optimizer,
    )
    runs = [
        (label, cfg["path"], dict(run_options(cfg), optimizer=optimizer_kind(label, cfg)))
        for label, cfg in expanded.items()
    ]
    chosen = {label: path for label, path, _ in runs}
    if args.interleave:
        measured = time_configs_interleaved([(path, opts) for _, path, opts in runs], args)
    else:
        measured = (time_config(path, args, opts) for _, path, opts in runs)
    rows = []
    for name, (ms, peak, trainable) in zip(chosen, measured):
        rows.append((name, ms, peak, trainable))
        print(f"{name}: {ms:.1f} ms, {peak:.2f} GiB, {trainable:,} trainable", flush=True)
    graph = ", backbone as CUDA graph" if args.cuda_graph else ""
    graph += ", backbone compiled" if args.compile else ""
    graph += ", interleaved" if args.interleave else ""
    memory = "peak reserved (GiB)" if args.cuda_graph else "peak (GiB)"
    if not maskrcnn:
        model = "ViT-L/16" if args.preset == "vit-upernet" else "InternViT-6B"
        print(
            f"\n### {model} UperNet training step, {args.batch}×{args.size}², frozen weights "
            f"bf16, {args.dtype} autocast, AdamW (adapters: FlatAdamW unless labelled){graph} — {device_name}\n"
        )
        print(f"| variant | trainable | step (ms) | images/s | {memory} |\n|---|---|---|---|---|")
        for name, ms, peak, trainable in rows:
            print(
                f"| {name} | {trainable:,} | {ms:.1f} | {1000 * args.batch / ms:.2f} | {peak:.2f} |"
            )
        return
    measured = {name: (ms, peak) for name, ms, peak, _ in rows}
    floor_ms, floor_peak = measured.get("floor (Base, frozen)", (None, None))
    full_ms, _ = measured.get("full FT", (None, None))
    sizes = ", ".join(f"{h}×{w}" for h, w in args.shapes)
    print(
        f"\n### Mask R-CNN ConvNeXt-V2-L training step, {args.batch}× ({sizes}), "
        f"{args.dtype} autocast, AdamW (adapters: FlatAdamW unless labelled){graph} — {device_name}\n"
    )
    print(f"| variant | trainable | step (ms) | × floor | × full FT | {memory} | vs floor |")
    print("|---|---|---|---|---|---|---|")
    for name, ms, peak, trainable in rows:  # ratios only where --only kept the reference
        x_floor = f"{ms / floor_ms:.3f}" if floor_ms else "-"
        x_full = f"{ms / full_ms:.3f}" if full_ms else "-"
        mem = f"{100 * (peak / floor_peak - 1):+.1f}%" if floor_peak else "-"
        print(f"| {name} | {trainable:,} | {ms:.1f} | {x_floor} | {x_full} | {peak:.2f} | {mem} |")


if __name__ == "__main__":
    main()
