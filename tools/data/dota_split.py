"""Split DOTA images into overlapping patches (DOTA devkit conventions).

SRC holds images/ and annfiles/ (or labelTxt/; none for the test set). The single-scale
data of the configs (data/split_ss_dota/{trainval,test}, DOTA-v1.0 train + val as trainval):
    python tools/data/dota_split.py --src data/DOTA/train --dst data/split_ss_dota/trainval
    python tools/data/dota_split.py --src data/DOTA/val --dst data/split_ss_dota/trainval
    python tools/data/dota_split.py --src data/DOTA/test --dst data/split_ss_dota/test
Multi-scale (devkit style: the image is resized first): --rates 0.5 1.0 1.5 --gap 500.
Defaults: --patch-size 1024 --gap 200 --iof-thr 0.7; add --nproc N for N processes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from tools.data.dota_patches import IMG_EXTS, print_progress, split_dota  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--src", required=True, help="folder with images/ and annfiles/ or labelTxt/"
    )
    parser.add_argument("--dst", required=True, help="output folder (gets images/ and annfiles/)")
    parser.add_argument("--patch-size", type=int, default=1024)
    parser.add_argument("--gap", type=int, default=200, help="overlap of neighbouring patches")
    parser.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=[1.0],
        help="resize factors applied before splitting",
    )
    parser.add_argument(
        "--iof-thr",
        type=float,
        default=0.7,
        help="keep an object when this fraction of it lies in the patch",
    )
    parser.add_argument(
        "--partial-difficulty",
        type=int,
        default=None,
        help="keep objects below --iof-thr clipped with this difficulty "
        "(DOTA devkit: 2); default: drop them",
    )
    parser.add_argument("--img-exts", nargs="+", default=list(IMG_EXTS))
    parser.add_argument("--save-ext", default=".png")
    parser.add_argument("--no-padding", action="store_true", help="keep border patches smaller")
    parser.add_argument("--nproc", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.time()
    counts = split_dota(
        args.src,
        args.dst,
        patch_size=args.patch_size,
        gap=args.gap,
        rates=args.rates,
        iof_thr=args.iof_thr,
        img_exts=args.img_exts,
        nproc=args.nproc,
        partial_difficulty=args.partial_difficulty,
        padding=not args.no_padding,
        save_ext=args.save_ext,
        progress=print_progress,
    )
    print(
        f"{counts['images']} images -> {counts['patches']} patches in {args.dst} "
        f"({time.time() - start:.1f} s)"
    )


if __name__ == "__main__":
    main()
