"""Print the trainable-parameter table of configs' models, built without weights if possible.

    python tools/count_params.py CONFIG [CONFIG ...] [--markdown] [--device meta|cpu]

The model is built on the meta device (no memory, instant even for 6B); where a model
cannot be built there it falls back to the CPU.
"""

from __future__ import annotations

import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from torch import nn  # noqa: E402

from mm_spectral import parameter_counts, trainable_report  # noqa: E402
from mm_spectral.openmmlab import build_model  # noqa: E402


def build(cfg: Config, device: str) -> tuple[nn.Module, str]:
    """(model, device it was built on)."""
    if device == "meta":
        try:
            with torch.device("meta"):
                return build_model(cfg), "meta"
        except Exception as err:  # noqa: BLE001  (any op that needs real data)
            print(f"  (cannot build on the meta device: {type(err).__name__}: {err}; using CPU)")
    return build_model(cfg), "cpu"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--device", choices=["meta", "cpu"], default="meta")
    parser.add_argument("--markdown", action="store_true", help="end with a markdown table")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction)
    args = parser.parse_args(argv)
    rows = []
    for path in args.configs:
        cfg = Config.fromfile(path)
        if args.cfg_options is not None:
            cfg.merge_from_dict(args.cfg_options)
        print(f"== {path}")
        model, device = build(cfg, args.device)
        row = dict(config=path, **parameter_counts(model))
        print(trainable_report(model))
        share = 100.0 * row["trainable"] / max(row["total"], 1)
        print(
            f"total {row['total']:,}  trainable {row['trainable']:,} ({share:.3f}%)  "
            f"adapter {row['adapter']:,}  [built on {device}]\n"
        )
        rows.append(row)
    if args.markdown:
        print("| config | adapter params | trainable (with neck/heads) | total |")
        print("|---|---:|---:|---:|")
        for row in rows:
            print(
                f"| `{osp.basename(row['config'])}` | {row['adapter']:,} | "
                f"{row['trainable']:,} | {row['total']:,} |"
            )
    return rows


if __name__ == "__main__":
    main()
