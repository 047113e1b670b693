"""Checkpoint layout converters for the backbones (pure functions on state dicts).

- official ConvNeXt-V2 (facebookresearch/ConvNeXt-V2, under key 'model') -> timm's names, which
  ``ConvNeXtV2`` uses;
- InternViT-6B releases (HF ``InternVisionModel``, InternVL chat/CLIP checkpoints with a
  ``vision_model.`` prefix, or the original ``patch_embed``/``blocks`` layout) -> ``InternViT6B``.

The command-line tools in ``tools/convert/`` wrap these.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from timm.models.convnext import checkpoint_filter_fn
from torch import Tensor

from mm_spectral.state import load_checkpoint_file

StateDict = dict[str, Tensor]

DTYPES = {
    "keep": None,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

# ----------------------------------------------------------------------------- loading


def load_state_dict_file(path: str | Path, trust_pickle: bool = False) -> StateDict:
    """Read a checkpoint: .safetensors, .pth/.bin/.pt (torch.load), or a directory / index .json
    of shards (Hugging Face layout). ``trust_pickle`` allows arbitrary pickled objects."""
    path = Path(path)
    if path.is_dir():
        indexes = sorted(path.glob("*.index.json"))
        if indexes:
            return load_state_dict_file(indexes[0], trust_pickle)
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if not files:
            raise FileNotFoundError(f"no .safetensors/.bin weights in {path}")
        return _merge([load_state_dict_file(f, trust_pickle) for f in files])
    if path.name.endswith(".index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        return _merge([load_state_dict_file(path.parent / s, trust_pickle) for s in shards])
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # optional dependency, only for this format

        return load_file(str(path))
    return unwrap(load_checkpoint_file(path, trusted=trust_pickle, mmap=True))


def _merge(parts: list[Mapping]) -> StateDict:
    merged: StateDict = {}
    for part in parts:
        merged.update(unwrap(part))
    return merged


def unwrap(checkpoint: Mapping) -> StateDict:
    """The tensor dict inside common containers ('state_dict', 'model', 'module')."""
    for key in ("state_dict", "model", "module"):
        inner = checkpoint.get(key)
        if (
            isinstance(inner, Mapping)
            and inner
            and all(isinstance(v, Tensor) for v in inner.values())
        ):
            return dict(inner)
    return {k: v for k, v in checkpoint.items() if isinstance(v, Tensor)}


def cast(state_dict: StateDict, dtype: torch.dtype | None) -> StateDict:
    """Floating-point tensors cast to ``dtype`` (None keeps them); others untouched."""
    if dtype is None:
        return state_dict
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


# ----------------------------------------------------------------------------- ConvNeXt-V2

# Official ConvNeXt-V2 keys (fine-tuned releases); FCMAE pre-training adds decoder keys.
_CONVNEXT_OFFICIAL_KEY = re.compile(
    r"(downsample_layers\.\d\.\d|stages\.\d+\.\d+\.(dwconv|norm|pwconv[12])|norm|head)"
    r"\.(weight|bias)|stages\.\d+\.\d+\.grn\.(gamma|beta)"
)
_FCMAE_ONLY = ("decoder", "mask_token", "proj", "pred")


class _ShapesOnly:
    """What timm's ``checkpoint_filter_fn`` reads of a model: its state dict's shapes."""

    def __init__(self, shapes: Mapping[str, torch.Size]) -> None:
        self._state = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}

    def state_dict(self) -> dict[str, Tensor]:
        return self._state


def convnextv2_official_to_timm(
    checkpoint: Mapping, target_shapes: Mapping[str, torch.Size]
) -> StateDict:
    """Official ConvNeXt-V2 state dict (or the checkpoint holding it under 'model') -> timm layout.

    Keys are checked against the official layout, then renamed by timm's ConvNeXt
    ``checkpoint_filter_fn``: GRN's (1, 1, 1, C) gamma/beta become (C,) weight/bias, and
    pointwise weights take ``target_shapes`` (a timm model's, see ``convnextv2_timm_shapes``:
    (out, in, 1, 1) 1x1 convs for atto-nano). An FCMAE checkpoint's ``encoder.`` prefix is
    stripped and its decoder dropped; its sparse ``.kernel`` weights (MinkowskiEngine) are
    refused.
    """
    state_dict = unwrap(checkpoint)
    if any(k.endswith(".kernel") for k in state_dict):
        raise ValueError(
            "this is a sparse FCMAE pre-training checkpoint (MinkowskiEngine '.kernel' weights); "
            "convert a fine-tuned ConvNeXt-V2 checkpoint instead"
        )
    if any(k.startswith("encoder.") for k in state_dict):
        state_dict = {
            k[len("encoder.") :]: v for k, v in state_dict.items() if k.startswith("encoder.")
        }
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(_FCMAE_ONLY)}
    unknown = [k for k in state_dict if not _CONVNEXT_OFFICIAL_KEY.fullmatch(k)]
    if unknown:
        raise KeyError(f"not official ConvNeXt-V2 keys: {unknown[:8]}")
    # timm's own remapping: names, GRN (1,1,1,C) -> (C,), pointwise (out,in) -> its shapes.
    return checkpoint_filter_fn(state_dict, _ShapesOnly(target_shapes))


def convnextv2_timm_shapes(arch: str) -> dict[str, torch.Size]:
    """Parameter shapes of timm's ``convnextv2_{arch}``, built on the meta device (no memory)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(f"convnextv2_{arch}", pretrained=False)
    return {k: v.shape for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- InternViT-6B

_HF_ANCHOR = "embeddings.patch_embedding.weight"  # InternVisionModel layout
_ORIG_ANCHOR = "patch_embed.proj.weight"  # original release / InternVL-MMDetSeg layout


def _find_prefix(keys: list[str], anchor: str, prefix: str | None) -> str | None:
    if prefix is not None:
        return prefix if prefix + anchor in keys else None
    found = [k[: -len(anchor)] for k in keys if k.endswith(anchor)]
    found = [p for p in found if p == "" or p.endswith(".")]
    if len(found) > 1:
        raise ValueError(f"several vision towers ({found}); pass the prefix to keep")
    return found[0] if found else None


def _orig_to_hf_key(key: str) -> str | None:
    """Original layout (cls_token, pos_embed, patch_embed.proj, blocks.i.ls1.gamma) -> HF layout."""
    fixed = {
        "cls_token": "embeddings.class_embedding",
        "pos_embed": "embeddings.position_embedding",
        "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
        "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    }
    if key in fixed:
        return fixed[key]
    if m := re.fullmatch(r"blocks\.(\d+)\.(.+)", key):
        rest = re.sub(r"^(ls[12])\.gamma$", r"\1", m[2])
        return f"encoder.layers.{m[1]}.{rest}"
    return None


def _hf_key(key: str) -> str | None:
    return key if key.startswith(("embeddings.", "encoder.layers.")) else None


def internvit_to_mm(checkpoint: Mapping, prefix: str | None = None) -> tuple[StateDict, list[str]]:
    """An InternViT-6B release -> ``InternViT6B`` state dict, plus the list of dropped keys.

    Finds the vision tower by its patch-embedding key (so 'vision_model.', 'module.' ... prefixes
    are stripped whatever they are) and drops everything else ('mlp1.*', 'language_model.*',
    'clip_projector.*', ...). ``prefix`` picks the tower explicitly ('' for none).
    """
    state_dict = unwrap(checkpoint)
    keys = list(state_dict)
    hf_prefix = _find_prefix(keys, _HF_ANCHOR, prefix)
    if hf_prefix is not None:
        convert = _hf_key
        tower = hf_prefix
    else:
        tower = _find_prefix(keys, _ORIG_ANCHOR, prefix)
        if tower is None:
            raise ValueError(
                f"no InternViT patch embedding ('{_HF_ANCHOR}' or '{_ORIG_ANCHOR}') in the checkpoint"
                + (f" under prefix {prefix!r}" if prefix is not None else "")
            )
        convert = _orig_to_hf_key
    out: StateDict = {}
    dropped: list[str] = []
    for key, value in state_dict.items():
        new_key = convert(key[len(tower) :]) if key.startswith(tower) else None
        if new_key is None:
            dropped.append(key)
        else:
            out[new_key] = value
    return out, dropped


def infer_internvit_cfg(state_dict: Mapping[str, Tensor]) -> dict:
    """``InternViT6B`` arguments read from a converted state dict (num_heads is not stored)."""
    embed_dim = state_dict["embeddings.class_embedding"].shape[-1]
    patch = state_dict["embeddings.patch_embedding.weight"].shape[-1]
    grid = round((state_dict["embeddings.position_embedding"].shape[1] - 1) ** 0.5)
    layers = {int(m[1]) for k in state_dict if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    hidden = state_dict["encoder.layers.0.mlp.fc1.weight"].shape[0]
    return dict(
        embed_dim=embed_dim,
        depth=max(layers) + 1,
        mlp_ratio=hidden / embed_dim,
        patch_size=patch,
        pretrain_size=grid * patch,
        qk_normalization="encoder.layers.0.attn.q_norm.weight" in state_dict,
    )
