"""Fold trained adapters into the weights: a plain checkpoint + an adapter-free config.

    python tools/merge_adapters.py CONFIG CHECKPOINT --out-dir DIR

CHECKPOINT is a full training checkpoint (epoch_12.pth), an adapter-only one
(epoch_12_adapter.pth: the base weights then come from the config's pretrained init_cfg),
or a sharded one (an FSDP run's iter_N.pth/ directory of rank{i}.pth files).
Writes DIR/merged.pth (MMEngine format; its meta['cfg'] is the adapter-free config, so an
inferencer given only the weights builds the plain model) and DIR/<config>_merged.py,
which stock OpenMMLab inference (mmdet DetInferencer, mmseg MMSegInferencer,
tools/test.py) runs at no extra cost, without mm_spectral when the config uses nothing of it.

Writes nothing and exits with status 1 when there is nothing to merge (a config without
adapters, a merged checkpoint) or the checkpoint does not fit the config (adapter
hyper-parameters, or an adapter-only file trained on another base: --allow-other-base).
"""

from __future__ import annotations

import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.config import Config, DictAction  # noqa: E402

from mm_spectral.distributed import is_sharded_checkpoint  # noqa: E402
from mm_spectral.openmmlab.checkpoint import CheckpointMismatch, merge_to_files  # noqa: E402
from mm_spectral.state import load_checkpoint_file  # noqa: E402

INFERENCERS = {
    "mmdet": "from mmdet.apis import DetInferencer\n"
    "  DetInferencer(model='{cfg}', weights='{ckpt}', device='cuda')('demo.jpg', out_dir='out')",
    "mmseg": "from mmseg.apis import MMSegInferencer\n"
    "  MMSegInferencer(model='{cfg}', weights='{ckpt}', device='cuda')('demo.jpg', out_dir='out')",
    "mmrotate": "from mmdet.apis import init_detector, inference_detector\n"
    "  inference_detector(init_detector('{cfg}', '{ckpt}', device='cuda'), 'demo.png')",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="the adapted training config")
    parser.add_argument("checkpoint", help="full or adapter-only checkpoint")
    parser.add_argument("--out-dir", required=True, help="where merged.pth and the config go")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction)
    parser.add_argument(
        "--allow-other-base",
        action="store_true",
        help="merge an adapter-only checkpoint onto base weights other than its own (warns)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> tuple[str, str]:
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    ckpt_path = osp.join(args.out_dir, "merged.pth")
    name = osp.splitext(osp.basename(args.config))[0]
    cfg_path = osp.join(args.out_dir, f"{name}_merged.py")
    try:
        if is_sharded_checkpoint(args.checkpoint):  # read once the model gives the shapes
            ckpt = args.checkpoint
        else:
            ckpt = load_checkpoint_file(args.checkpoint, mmap=True)
        state, _ = merge_to_files(
            cfg,
            ckpt,
            ckpt_path,
            cfg_path,
            allow_other_base=args.allow_other_base,
            source=args.checkpoint,
            merged_from=osp.abspath(args.checkpoint),
            adapter_config=osp.abspath(args.config),
        )
    except CheckpointMismatch as err:
        raise SystemExit(f"error: {err} (nothing written)") from None
    print(f"merged checkpoint ({len(state)} tensors, plain keys): {ckpt_path}")
    print(f"adapter-free config: {cfg_path}")
    print("stock inference, no adapter code in the loop:")
    print(f"  python tools/test.py {cfg_path} {ckpt_path}")
    scope = cfg.get("default_scope")
    if scope in INFERENCERS:
        print("  " + INFERENCERS[scope].format(cfg=cfg_path, ckpt=ckpt_path))
    return ckpt_path, cfg_path


if __name__ == "__main__":
    main()
