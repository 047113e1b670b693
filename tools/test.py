"""Evaluate a checkpoint with an mmdet, mmseg or mmrotate config.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--show-dir DIR] [--out FILE]
        [--allow-other-base]
    bash tools/dist_test.sh CONFIG CHECKPOINT NUM_GPUS [same options]

CHECKPOINT may be a full checkpoint (adapted or merged: give the matching config) or an
adapter-only one (``*_adapter.pth``: the base weights come from the pretrained init_cfg).
A checkpoint whose adapters were trained with other hyper-parameters than the config's,
a merged checkpoint under an adapted config, or an adapter-only file trained on another
base are refused (exit status 1, a message naming what differs).
"""

from __future__ import annotations

import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.model import is_model_wrapper  # noqa: E402
from mmengine.registry import RUNNERS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from mm_spectral.distributed.process_exit import report_crashes  # noqa: E402
from mm_spectral.openmmlab import init_toolbox  # noqa: E402  (registers; fixes torch.load)
from mm_spectral.openmmlab.checkpoint import (  # noqa: E402
    CheckpointMismatch,
    check_adapter_records,
    is_adapter_checkpoint,
    load_adapter_checkpoint,
    require_unmerged,
)
from mm_spectral.openmmlab.distributed import (  # noqa: E402
    configure_distributed,
    finish_distributed,
    leave_if_distributed,
)
from mm_spectral.state import adapted_layers, load_checkpoint_file  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Test a model (adapted, adapter-only or merged)")
    parser.add_argument("config", help="test config file path")
    parser.add_argument("checkpoint", nargs="?", help="checkpoint file")
    parser.add_argument("--checkpoint", dest="checkpoint_opt", help="same as the positional")
    parser.add_argument("--work-dir", help="where to save the evaluation metrics")
    parser.add_argument("--show-dir", help="save painted predictions into this directory")
    parser.add_argument("--out", help="dump the predictions to this pickle file")
    parser.add_argument(
        "--allow-other-base",
        action="store_true",
        help="apply an adapter-only checkpoint to base weights other than its own (warns)",
    )
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        action=DictAction,
        help="override config settings, key=value",
    )
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = parser.parse_args(argv)
    args.checkpoint = args.checkpoint or args.checkpoint_opt
    if args.checkpoint is None:
        parser.error("a checkpoint is required (positional or --checkpoint)")
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return args


def enable_visualization(cfg: Config, show_dir: str) -> None:
    """Let the toolbox's visualization hook paint test predictions into ``show_dir``."""
    hook = cfg.default_hooks.get("visualization") if "default_hooks" in cfg else None
    if hook is None:
        raise ValueError("--show-dir needs a 'visualization' hook in default_hooks")
    hook["draw"] = True
    if "Seg" in str(hook.get("type", "")):  # mmseg's hook paints into the visualizer's dir
        hook["interval"] = 1
        cfg.visualizer["save_dir"] = show_dir
    else:  # mmdet / mmrotate
        hook["test_out_dir"] = show_dir


def peek_checkpoint(path: str) -> dict | None:
    """The checkpoint, memory-mapped (None for a URL or another backend: MMEngine's
    loaders handle those)."""
    if not osp.isfile(path):
        return None
    ckpt = load_checkpoint_file(path, mmap=True)
    return ckpt if isinstance(ckpt, dict) else None


def build_cfg(args: argparse.Namespace) -> Config:
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(args.config))[0])
    cfg.load_from, cfg.resume = args.checkpoint, False
    if args.show_dir:
        enable_visualization(cfg, args.show_dir)
    if args.out:
        evaluators = cfg.test_evaluator
        evaluators = [evaluators] if isinstance(evaluators, dict) else list(evaluators)
        cfg.test_evaluator = [*evaluators, dict(type="DumpResults", out_file_path=args.out)]
    return cfg


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = build_cfg(args)
    init_toolbox(cfg.get("default_scope"))
    configure_distributed(cfg)  # gloo on CPU: MM_SPECTRAL_DIST_BACKEND=gloo
    ckpt = peek_checkpoint(args.checkpoint)
    adapter_only = ckpt is not None and is_adapter_checkpoint(ckpt)
    if adapter_only:
        cfg.load_from = None  # loaded below, over the pretrained base weights
    runner = Runner.from_cfg(cfg) if "runner_type" not in cfg else RUNNERS.build(cfg)
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    try:
        if adapter_only:
            load_adapter_checkpoint(model, ckpt, args.allow_other_base, args.checkpoint)
            runner.logger.info(
                f"adapter-only checkpoint loaded over the pretrained weights: {args.checkpoint}"
            )
        elif ckpt is not None and any(True for _ in adapted_layers(model)):
            require_unmerged(ckpt, args.checkpoint)
            check_adapter_records(model, ckpt.get("meta") or {}, args.checkpoint)
        metrics = runner.test()
    except CheckpointMismatch as err:
        raise SystemExit(f"error: {err}") from None
    finish_distributed()
    return metrics


if __name__ == "__main__":
    report_crashes()  # a rank killed by a signal prints its Python stacks
    main()
    leave_if_distributed()  # skips interpreter teardown once the group is closed
