"""Train a detector / segmentor / rotated detector from an mmdet, mmseg or mmrotate config.

python tools/train.py CONFIG [--work-dir DIR] [--amp] [--resume [CHECKPOINT]]
    [--allow-other-base] [--cfg-options key=value ...] [--launcher pytorch]
bash tools/dist_train.sh CONFIG NUM_GPUS [same options]

Checkpoints are never overwritten: a fresh run refuses a work dir that holds some, and a
resume refuses one that holds checkpoints after its starting point. ``--resume`` alone
resumes from ``last_checkpoint``, else from the newest checkpoint in the work dir (full,
else adapter-only). Random generator states are saved and restored (RandomStateHook).
"""

from __future__ import annotations

import argparse
import os
import os.path as osp
import re
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout

from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.logging import print_log  # noqa: E402
from mmengine.registry import RUNNERS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from mm_spectral.distributed import is_sharded_checkpoint  # noqa: E402
from mm_spectral.distributed.process_exit import report_crashes  # noqa: E402
from mm_spectral.openmmlab import init_toolbox  # noqa: E402  (registers; fixes torch.load)
from mm_spectral.openmmlab.checkpoint import CheckpointMismatch, checkpoint_kind  # noqa: E402
from mm_spectral.openmmlab.distributed import (  # noqa: E402
    configure_distributed,
    finish_distributed,
    leave_if_distributed,
)
from mm_spectral.state import load_checkpoint_file  # noqa: E402

CHECKPOINT_NAME = re.compile(r"^(epoch|iter)_(\d+)(_adapter)?\.pth$")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a model with mm_spectral adapters")
    parser.add_argument("config", help="train config file path")
    parser.add_argument("--work-dir", help="where to save logs and checkpoints")
    parser.add_argument(
        "--resume",
        nargs="?",
        type=str,
        const="auto",
        help="resume from CHECKPOINT (full or *_adapter.pth), or from the latest checkpoint "
        "in the work dir if none is given",
    )
    parser.add_argument(
        "--allow-other-base",
        action="store_true",
        help="load adapter-only checkpoints onto base weights other than their own (warns)",
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
    if args.allow_other_base:
        for hook in cfg.get("custom_hooks") or []:
            if hook.get("type") == "AdapterHook":
                hook["allow_other_base"] = True
    return cfg


def checkpoints_in(work_dir: str) -> list[str]:
    """Checkpoints CheckpointHook names (``epoch_N.pth``, ``iter_N.pth`` and their
    ``*_adapter.pth``) in ``work_dir``, oldest first (by step, then time)."""
    if not osp.isdir(work_dir):
        return []
    found = [osp.join(work_dir, n) for n in os.listdir(work_dir) if CHECKPOINT_NAME.match(n)]
    return sorted(found, key=lambda p: (_step(p), osp.getmtime(p)))


def _step(path: str) -> int:
    match = CHECKPOINT_NAME.match(osp.basename(path))
    return int(match.group(2)) if match else -1


def resolve_resume(cfg: Config) -> str | None:
    """The checkpoint to resume from (set in ``cfg.load_from``), or None for a fresh run;
    raises SystemExit rather than overwrite a checkpoint of the work dir."""
    existing = checkpoints_in(cfg.work_dir)
    if not cfg.get("resume"):
        if existing:
            names = ", ".join(osp.basename(p) for p in existing[-5:])
            raise SystemExit(
                f"{cfg.work_dir} already holds checkpoints ({names}); a fresh run would "
                "overwrite them. Resume with --resume, or choose another --work-dir."
            )
        return None
    start = cfg.get("load_from") or _latest(cfg.work_dir, existing)
    if start is None:
        print_log(f"--resume: no checkpoint in {cfg.work_dir}; starting at iteration 0", "current")
        cfg.resume = False
        return None
    if not osp.exists(start):  # a file, or a sharded (FSDP) checkpoint's directory
        raise SystemExit(f"--resume: {start} does not exist")
    later = _later_than(start, existing)
    if later:
        names = ", ".join(osp.basename(p) for p in later)
        raise SystemExit(
            f"resuming from {start} would overwrite later checkpoints of {cfg.work_dir} "
            f"({names}); move them away or resume into another --work-dir"
        )
    # A sharded (FSDP) checkpoint is a full one; adapter-only files are single files.
    sharded = is_sharded_checkpoint(start)
    kind = "full" if sharded else checkpoint_kind(load_checkpoint_file(start, mmap=True))
    hooks = [h.get("type") for h in cfg.get("custom_hooks") or []]
    if kind == "adapter-only" and "AdapterHook" not in hooks:
        raise SystemExit(
            f"resuming from the adapter-only {start} needs AdapterHook in custom_hooks"
        )
    cfg.load_from = start
    return start


def _latest(work_dir: str, existing: list[str]) -> str | None:
    """``last_checkpoint``'s file if it exists, else the newest full checkpoint, else the
    newest adapter-only one."""
    record = osp.join(work_dir, "last_checkpoint")
    if osp.isfile(record):
        with open(record) as handle:
            named = handle.read().strip()
        if named and osp.exists(named):
            return named
        print_log(
            f"{record} names a missing file ({named!r}); using the newest checkpoint", "current"
        )
    full = [p for p in existing if not CHECKPOINT_NAME.match(osp.basename(p)).group(3)]
    return (full or existing or [None])[-1]


def _later_than(start: str, existing: list[str]) -> list[str]:
    """Checkpoints of the work dir a run resumed from ``start`` would write again."""
    match = CHECKPOINT_NAME.match(osp.basename(start))
    if match is None:
        return []
    return [
        p
        for p in existing
        if CHECKPOINT_NAME.match(osp.basename(p)).group(1) == match.group(1)
        and _step(p) > int(match.group(2))
    ]


def main(argv: list[str] | None = None) -> Runner:
    args = parse_args(argv)
    cfg = build_cfg(args)
    init_toolbox(cfg.get("default_scope"))
    resolve_resume(cfg)
    configure_distributed(cfg)  # gloo on CPU: MM_SPECTRAL_DIST_BACKEND=gloo
    runner = Runner.from_cfg(cfg) if "runner_type" not in cfg else RUNNERS.build(cfg)
    if not any(type(h).__name__ == "RandomStateHook" for h in runner.hooks):
        runner.register_hook(dict(type="RandomStateHook"))
    try:
        runner.train()
    except CheckpointMismatch as err:
        raise SystemExit(f"error: {err}") from None
    finish_distributed()
    return runner


if __name__ == "__main__":
    report_crashes()  # a rank killed by a signal prints its Python stacks
    main()
    leave_if_distributed()  # skips interpreter teardown once the group is closed
