"""Every config in configs/ loads, and its model builds through its toolbox's registry.

Real backbones build at full size (ConvNeXt-V2-L, ViT-L) except InternViT-6B, which is
overridden to a tiny width/depth of the same class; pretrained loading is not run (no
weights here). Dataset settings are parsed and every transform resolves.
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path

import pytest

pytest.importorskip("mmdet")
pytest.importorskip("mmseg")
pytest.importorskip("mmrotate")

from mmengine.config import Config  # noqa: E402
from mmengine.registry import DefaultScope, init_default_scope  # noqa: E402

import mm_spectral.openmmlab  # noqa: E402,F401  (registers the project's classes)

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(p for p in CONFIG_ROOT.rglob("*.py") if "_base_" not in p.parts)
TINY_INTERNVIT = dict(embed_dim=48, depth=4, num_heads=3, out_indices=(0, 1, 2, 3))


def registry_module(scope: str):
    return importlib.import_module(f"{scope}.registry")


def shrink(cfg: Config) -> None:
    """Tiny InternViT-6B (same class) so the 6B configs build on a CPU."""
    backbone = cfg.model.backbone
    inner = backbone.get("backbone", backbone)
    if inner.type == "InternViT6B":
        inner.update(TINY_INTERNVIT)
        for head in ("decode_head", "auxiliary_head"):
            head_cfg = cfg.model[head]
            head_cfg.in_channels = [48] * 4 if isinstance(head_cfg.in_channels, list) else 48
    inner.pop("init_cfg", None)


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(CONFIG_ROOT)) for p in CONFIGS])
def test_config_builds_its_model(path):
    cfg = Config.fromfile(str(path))
    scope = cfg.default_scope
    assert scope in ("mmdet", "mmseg", "mmrotate"), f"{path.name}: default_scope {scope!r}"
    assert "mm_spectral.openmmlab" in cfg.custom_imports["imports"]
    importlib.import_module(f"{scope}.utils").register_all_modules(init_default_scope=False)
    shrink(cfg)
    with DefaultScope.overwrite_default_scope(scope):
        init_default_scope(scope)
        model = registry_module(scope).MODELS.build(copy.deepcopy(cfg.model))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    backbone = cfg.model.backbone
    if backbone.type == "AdaptedBackbone":
        backbone_trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
        assert all(
            ".adapter." in n or n.startswith(("out_norms.", "pyramid.")) for n in backbone_trainable
        )
        assert (backbone.adapter is None) == (not any(".adapter." in n for n in backbone_trainable))
        assert trainable < total
    else:
        assert trainable == total  # full fine-tuning
    # dataset settings parse and every transform resolves in the toolbox registry
    transforms = registry_module(scope).TRANSFORMS
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        if cfg.get(loader) is None:  # e.g. a throughput config without validation
            continue
        for step in cfg[loader].dataset.get("pipeline", []):
            assert transforms.get(step["type"]) is not None, f"{loader}: {step['type']}"
    assert (
        cfg.optim_wrapper.constructor == "AdapterOptimWrapperConstructor"
        or backbone.type != "AdaptedBackbone"
    )


def test_every_readme_config_exists():
    readme = (CONFIG_ROOT.parent / "README.md").read_text()
    import re

    named = set(re.findall(r"configs/[\w./-]+\.py", readme))
    assert named, "the README names no config"
    missing = [n for n in named if not (CONFIG_ROOT.parent / n).exists()]
    assert not missing, missing
