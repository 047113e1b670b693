"""Write a generated shapes dataset in COCO, ADE20K or DOTA layout.

Examples:
    python tools/data/generate_shapes.py --task coco --out data/shapes_coco
    python tools/data/generate_shapes.py --task ade --out data/shapes_ade --size 128 128
    python tools/data/generate_shapes.py --task dota --out data/shapes_dota --num-train 200
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from tools.data.synthetic_shapes import (  # noqa: E402
    make_shapes_ade,
    make_shapes_coco,
    make_shapes_dota,
)

MAKERS = {"coco": make_shapes_coco, "ade": make_shapes_ade, "dota": make_shapes_dota}
DEFAULT_SIZE = {"coco": (128, 128), "ade": (128, 128), "dota": (256, 256)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(MAKERS), required=True)
    parser.add_argument("--out", required=True, help="dataset root, e.g. data/shapes_coco")
    parser.add_argument("--num-train", type=int, default=64)
    parser.add_argument("--num-val", type=int, default=16)
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("W", "H"),
        default=None,
        help="image width and height (default 128 128; 256 256 for dota)",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    size = tuple(args.size) if args.size else DEFAULT_SIZE[args.task]
    out = MAKERS[args.task](
        Path(args.out), args.num_train, args.num_val, img_size=size, seed=args.seed
    )
    for split, path in out.items():
        print(f"{args.task} {split}: {path}")


if __name__ == "__main__":
    main()
