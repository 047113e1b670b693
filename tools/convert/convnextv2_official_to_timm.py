"""Convert an official ConvNeXt-V2 checkpoint (facebookresearch/ConvNeXt-V2) to timm's layout.

The result loads into ``ConvNeXtV2`` through ``init_cfg=dict(type='Pretrained', checkpoint=...)``
(only our output norms missing, timm's classifier ``head.*`` unused).

    python tools/convert/convnextv2_official_to_timm.py convnextv2_large_22k_384_ema.pt \
        convnextv2_large_timm.pth --arch large
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from mm_spectral.state import atomic_save  # noqa: E402
from tools.convert import converters  # noqa: E402
from tools.convert.converters import DTYPES  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="official checkpoint (.pt/.pth, state dict under 'model')")
    parser.add_argument("dst", help="output .pth (timm-layout state dict)")
    parser.add_argument("--arch", required=True, help="atto|femto|pico|nano|tiny|base|large|huge")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="keep")
    parser.add_argument("--keep-head", action="store_true", help="keep the classifier (head.*)")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow arbitrary pickled objects when loading (trusted files only)",
    )
    args = parser.parse_args(argv)

    from mm_spectral.openmmlab.backbones import ConvNeXtV2

    shapes = converters.convnextv2_timm_shapes(args.arch)
    state_dict = converters.convnextv2_official_to_timm(
        converters.load_state_dict_file(args.src, args.trust_pickle), shapes
    )
    if not args.keep_head:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    missing = sorted(set(shapes) - set(state_dict) - {k for k in shapes if k.startswith("head.")})
    wrong = sorted(k for k, v in state_dict.items() if k in shapes and v.shape != shapes[k])
    unknown = sorted(set(state_dict) - set(shapes))
    if missing or wrong or unknown:
        raise SystemExit(
            f"mismatch with convnextv2_{args.arch}: missing={missing[:8]} "
            f"wrong shape={wrong[:8]} unknown={unknown[:8]}"
        )
    with torch.device("meta"):
        ours = set(ConvNeXtV2(arch=args.arch).state_dict())
    print(
        f"{len(state_dict)} tensors; ConvNeXtV2 will initialise {len(ours - set(state_dict))} "
        f"of its own (output norms): {sorted(ours - set(state_dict))}"
    )
    atomic_save(converters.cast(state_dict, DTYPES[args.dtype]), args.dst)
    print(f"saved {args.dst}")


if __name__ == "__main__":
    main()
