"""Train a detector / segmentor / rotated detector from an mmdet, mmseg or mmrotate config.

python tools/train.py CONFIG [--work-dir DIR] [--amp] [--resume [CHECKPOINT]]
    [--cfg-options key=value ...] [--launcher pytorch]
bash tools/dist_train.sh CONFIG NUM_GPUS [same options]
"""

from __future__ import annotations

import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout

from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.logging import print_log  # noqa: E402
from mmengine.registry import RUNNERS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from mm_spectral.openmmlab import init_toolbox  # noqa: E402  (registers; fixes torch.load)
from mm_spectral.openmmlab.distributed import configure_distributed  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a model with mm_spectral adapters")
    parser.add_argument("config", help="train config file path")
    parser.add_argument("--work-dir", help="where to save logs and checkpoints")
    parser.add_argument(
        "--resume",
        nargs="?",
        type=str,
        const="auto",
        help="resume from CHECKPOINT, or from the latest checkpoint in the work dir if none is given",
    )
    parser.add_argument("--amp", action="store_true", help="automatic mixed precision training")
    parser.add_argument(
        "--auto-scale-lr",
        action="store_true",
        help="scale the learning rate by the actual batch size / auto_scale_lr.base_batch_size",
    )
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        action=DictAction,
        help="override config settings, key=value (e.g. train_dataloader.batch_size=2)",
    )
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    # torch.distributed.launch passes --local_rank or --local-rank; torchrun sets LOCAL_RANK.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = parser.parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return args


def build_cfg(args: argparse.Namespace) -> Config:
    """The config with the command line applied."""
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(args.config))[0])
    if args.amp:
        if cfg.optim_wrapper.get("type", "OptimWrapper") == "AmpOptimWrapper":
            print_log("AMP training is already enabled in the config", logger="current")
        else:
            cfg.optim_wrapper.type = "AmpOptimWrapper"
            cfg.optim_wrapper.loss_scale = "dynamic"
    if args.auto_scale_lr:
        if "auto_scale_lr" not in cfg or "base_batch_size" not in cfg.auto_scale_lr:
            raise ValueError("--auto-scale-lr needs auto_scale_lr.base_batch_size in the config")
        cfg.auto_scale_lr.enable = True
    if args.resume == "auto":
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    return cfg


def main(argv: list[str] | None = None) -> Runner:
    args = parse_args(argv)
    cfg = build_cfg(args)
    init_toolbox(cfg.get("default_scope"))
    configure_distributed(cfg)  # gloo on CPU: MM_SPECTRAL_DIST_BACKEND=gloo
    runner = Runner.from_cfg(cfg) if "runner_type" not in cfg else RUNNERS.build(cfg)
    runner.train()
    return runner


if __name__ == "__main__":
    main()
