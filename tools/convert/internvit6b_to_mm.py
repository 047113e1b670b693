"""Convert an InternViT-6B release to the state dict of mm_spectral's ``InternViT6B``.

Accepts the HF ``InternVisionModel`` layout (OpenGVLab/InternViT-6B-*), InternVL chat/CLIP
checkpoints (vision tower under 'vision_model.', the rest dropped) and the original
``patch_embed``/``blocks`` layout; .pth/.bin, .safetensors, or a directory of shards.

    python tools/convert/internvit6b_to_mm.py InternViT-6B-448px-V1-5/ internvit6b_448.pth \
        --dtype bfloat16
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
    parser.add_argument("src", help="checkpoint file, shard index .json, or directory of shards")
    parser.add_argument("dst", help="output .pth")
    parser.add_argument(
        "--prefix",
        default=None,
        help="key prefix of the vision tower (default: found automatically)",
    )
    parser.add_argument("--num-heads", type=int, default=25, help="for the strict load check")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="keep")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow arbitrary pickled objects when loading (trusted files only)",
    )
    args = parser.parse_args(argv)

    from mm_spectral.openmmlab.backbones import InternViT6B

    raw = converters.load_state_dict_file(args.src, args.trust_pickle)
    state_dict, dropped = converters.internvit_to_mm(raw, args.prefix)
    cfg = converters.infer_internvit_cfg(state_dict)
    depth = cfg["depth"]
    cfg["out_indices"] = (depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1, depth - 1)
    with torch.device("meta"):  # strict check of names and shapes without allocating
        model = InternViT6B(num_heads=args.num_heads, **cfg)
        result = model.load_state_dict(state_dict, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not k.startswith("pyramid.")]
    if missing or result.unexpected_keys:
        raise SystemExit(
            f"does not load: missing={missing[:8]} unexpected={result.unexpected_keys[:8]}"
        )
    print(f"kept {len(state_dict)} tensors, dropped {len(dropped)} (e.g. {dropped[:3]})")
    print(f"InternViT6B arguments read from the weights: {cfg}")
    atomic_save(converters.cast(state_dict, DTYPES[args.dtype]), args.dst)
    print(f"saved {args.dst}")


if __name__ == "__main__":
    main()
