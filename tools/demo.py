"""The end-to-end demo (`make demo`), on this CPU in about ten minutes.

No pretrained weights can be downloaded here, so the demo makes its own:
1. pretrain: trains the plain ConvNeXt-V2-atto Mask R-CNN fully on one generated set of
   shapes (COCO format, boxes and masks);
2. adapt: starts from that detector, freezes the backbone, injects FLoRA and trains only
   adapters, output norms, neck and heads on a new generated set;
3. evaluates it, merges the adapters into a plain checkpoint + adapter-free config, and
   evaluates that with stock mmdet; prints both results side by side.
It exits non-zero if the two disagree or the detector is not well above chance (mAP ~0).
"""

from __future__ import annotations

import argparse
import os
import os.path as osp
import sys
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from mm_spectral.openmmlab import plain_config  # noqa: E402
from mm_spectral.openmmlab.checkpoint import merge_to_files  # noqa: E402
from tools.data.synthetic_shapes import make_shapes_coco  # noqa: E402

DEMO_CONFIG = "configs/demo/mask-rcnn_r18-flora_fpn_1xb8-shapes.py"
METRICS = ("coco/bbox_mAP", "coco/bbox_mAP_50", "coco/segm_mAP", "coco/segm_mAP_50")


def point_to_data(cfg: Config, data_root: str, workers: int) -> None:
    """Use the generated data under ``data_root`` in every loader and evaluator."""
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[loader].dataset.data_root = data_root
        cfg[loader].num_workers = workers
        cfg[loader].persistent_workers = workers > 0
    for evaluator in ("val_evaluator", "test_evaluator"):
        cfg[evaluator].ann_file = osp.join(data_root, "annotations/instances_val.json")


def set_epochs(cfg: Config, epochs: int) -> None:
    cfg.train_cfg.max_epochs = epochs
    if "val_interval" in cfg.train_cfg:
        cfg.train_cfg.val_interval = epochs
    cfg.default_hooks.checkpoint.interval = epochs
    for scheduler in cfg.param_scheduler:  # keep the LR steps inside the shorter schedule
        if scheduler.type == "MultiStepLR":
            scheduler.milestones = [max(1, epochs - 2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEMO_CONFIG)
    parser.add_argument("--work-dir", default="demo_work_dir")
    parser.add_argument("--num-train", type=int, default=128)
    parser.add_argument("--num-val", type=int, default=32)
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4, help="FLoRA fine-tuning epochs")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--min-map", type=float, default=0.3, help="fail below this bbox mAP (chance is ~0)"
    )
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.time()

    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    roots = {}
    for stage, seed in (("pretrain", 1), ("adapt", 0)):
        roots[stage] = osp.join(args.work_dir, "data", f"shapes_coco_{stage}")
        if not osp.exists(osp.join(roots[stage], "annotations", "instances_val.json")):
            make_shapes_coco(
                roots[stage], num_train=args.num_train, num_val=args.num_val, seed=seed
            )
    print(f"[demo] data: {args.num_train} train / {args.num_val} val images per stage")

    # 1. pretrain: the plain model (the adapter-free config), every parameter trains
    cfg = Config.fromfile(args.config)
    plain = plain_config(cfg)
    point_to_data(plain, roots["pretrain"], args.workers)
    plain.work_dir, plain.experiment_name = osp.join(args.work_dir, "pretrain"), "pretrain"
    set_epochs(plain, args.pretrain_epochs)
    plain.val_cfg = plain.val_dataloader = plain.val_evaluator = None
    if "norm_eval" in plain.model.backbone:  # pretraining from scratch updates BN statistics
        plain.model.backbone.norm_eval = False
    plain.train_cfg.pop("val_interval", None)
    print("[demo] stage 1/2: pretraining the plain detector (stands in for downloaded weights)")
    Runner.from_cfg(plain).train()
    pretrained = osp.join(plain.work_dir, f"epoch_{args.pretrain_epochs}.pth")

    # 2. adapt: FLoRA on new data, backbone frozen, starting from the pretrained detector
    point_to_data(cfg, roots["adapt"], args.workers)
    cfg.work_dir, cfg.experiment_name = osp.join(args.work_dir, "adapted"), "adapted"
    cfg.load_from = pretrained
    set_epochs(cfg, args.epochs)
    print("[demo] stage 2/2: FLoRA fine-tuning (only adapters, output norms, neck, heads)")
    runner = Runner.from_cfg(cfg)
    runner.train()
    adapted = runner.test()
    checkpoint = osp.join(cfg.work_dir, f"epoch_{cfg.train_cfg.max_epochs}.pth")

    merged_dir = osp.join(args.work_dir, "merged")
    merged_ckpt = osp.join(merged_dir, "merged.pth")
    _, plain_cfg = merge_to_files(
        cfg,
        checkpoint,
        merged_ckpt,
        osp.join(merged_dir, "merged_config.py"),
        merged_from=checkpoint,
    )
    plain_cfg.work_dir, plain_cfg.experiment_name = merged_dir, "merged"
    plain_cfg.load_from, plain_cfg.resume = merged_ckpt, False
    merged = Runner.from_cfg(plain_cfg).test()

    print(f"\n[demo] {'metric':<18} {'adapted':>9} {'merged':>9}")
    for key in METRICS:
        print(f"[demo] {key:<18} {adapted[key]:>9.3f} {merged[key]:>9.3f}")
    print(f"[demo] merged checkpoint: {merged_ckpt} (plain keys; adapter-free config beside it)")
    print(f"[demo] total time {time.time() - start:.0f} s")
    gap = max(abs(adapted[k] - merged[k]) for k in METRICS)
    if gap > 0.01:
        raise SystemExit(f"[demo] FAILED: merged and adapted results differ by {gap:.3f}")
    if adapted["coco/bbox_mAP"] < args.min_map:
        raise SystemExit(f"[demo] FAILED: bbox mAP {adapted['coco/bbox_mAP']:.3f} < {args.min_map}")
    print("[demo] OK: the merged model reproduces the adapted one")


if __name__ == "__main__":
    main()
