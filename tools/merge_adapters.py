"""Fold trained adapters into the weights: a plain checkpoint + an adapter-free config.

    python tools/merge_adapters.py CONFIG CHECKPOINT --out-dir DIR

CHECKPOINT is a full training checkpoint (epoch_12.pth), an adapter-only one
(epoch_12_adapter.pth: the base weights then come from the config's pretrained init_cfg),
or a sharded one (an FSDP run's iter_N.pth/ directory of rank{i}.pth files).
Writes DIR/merged.pth (MMEngine format) and DIR/<config>_merged.py, which stock OpenMMLab
inference (mmdet DetInferencer, mmseg MMSegInferencer, tools/test.py) runs at no extra cost.
"""

from __future__ import annotations

import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.config import Config, DictAction  # noqa: E402

from mm_spectral.distributed import is_sharded_checkpoint, sharded_checkpoint_meta  # noqa: E402
from mm_spectral.openmmlab.checkpoint import merge_checkpoint  # noqa: E402
from mm_spectral.state import atomic_save, atomic_write_text, load_checkpoint_file  # noqa: E402

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
    parser.add_argument("checkpoint", help="full, adapter-only or sharded (directory) checkpoint")
    parser.add_argument("--out-dir", required=True, help="where merged.pth and the config go")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> tuple[str, str]:
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if is_sharded_checkpoint(args.checkpoint):  # read once the model gives the shapes
        ckpt, meta = args.checkpoint, sharded_checkpoint_meta(args.checkpoint)
    else:
        ckpt = load_checkpoint_file(args.checkpoint, mmap=True)
        meta = ckpt.get("meta", {})
    state, plain_cfg = merge_checkpoint(cfg, ckpt)
    meta = {k: v for k, v in meta.items() if k != "adapter_only"}
    meta.update(merged_from=osp.abspath(args.checkpoint), adapter_config=osp.abspath(args.config))
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt_path = osp.join(args.out_dir, "merged.pth")
    atomic_save(dict(state_dict=state, meta=meta), ckpt_path)
    name = osp.splitext(osp.basename(args.config))[0]
    cfg_path = osp.join(args.out_dir, f"{name}_merged.py")
    atomic_write_text(plain_cfg.pretty_text, cfg_path)
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
