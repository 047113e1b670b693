"""Stock mmdet inference of merged checkpoints, where mm_spectral cannot be imported
(issue 12, item 1): ``DetInferencer(weights='merged.pth')`` builds the model from the
checkpoint's meta['cfg'], which must be the adapter-free config; an adapted one would put
freshly initialised adapters (FourierFT: Gaussian spectra) on top of the merged weights.

A Mask R-CNN ResNet-18 with FourierFT on every conv (the demo's detector, randomly
initialised coefficients: ΔW ≠ 0) is saved as a Runner would save it; merge_adapters.py
and AdapterHook(merge_at_end=True) merge it; a subprocess that blocks mm_spectral runs
DetInferencer (weights only) and init_detector on the results. Predictions and features
must equal the adapted model's."""

from __future__ import annotations

import os.path as osp
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("mmdet")

from mmdet.apis import inference_detector, init_detector  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402
from openmmlab_toys import load_tool  # noqa: E402

from mm_spectral.openmmlab import build_model  # noqa: E402
from mm_spectral.openmmlab.checkpoint import describe  # noqa: E402
from mm_spectral.openmmlab.hooks import AdapterHook  # noqa: E402
from mm_spectral.state import atomic_save  # noqa: E402
from tools.data.synthetic_shapes import make_shapes_coco  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs/demo/mask-rcnn_r18-flora_fpn_1xb8-shapes.py"
FOURIERFT = dict(type="FourierFT", n=200, alpha=50.0, seed=3)
STOCK = """
import importlib.abc, sys, torch

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'mm_spectral':
            raise ImportError(f'blocked import of {{name}}')

sys.meta_path.insert(0, Block())
from mmdet.apis import DetInferencer, inference_detector, init_detector

images, x = {images!r}, torch.load({x!r})
models = {{
    'hook': DetInferencer(weights={hook!r}, device='cpu').model,
    'tool': init_detector({tool_cfg!r}, {tool!r}, device='cpu'),
}}
out = {{}}
for name, model in models.items():
    preds = inference_detector(model, images)
    with torch.no_grad():
        feats = model.extract_feat(x)
    out[name] = dict(preds=[p.pred_instances.to_dict() for p in preds], feats=list(feats))
assert not [m for m in sys.modules if m.split('.')[0] == 'mm_spectral']
torch.save(out, {result!r})
print('OK')
"""


def detector_config(data_root: Path) -> Config:
    cfg = Config.fromfile(str(DEMO))
    cfg.model.backbone.adapter = dict(FOURIERFT, targets=cfg.model.backbone.adapter.targets)
    cfg.custom_hooks = [dict(type="AdapterHook", merge_at_end=True)]
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[loader].dataset.data_root = str(data_root)
    return cfg


def tensors(pred: dict) -> list[torch.Tensor]:
    return [pred["bboxes"], pred["scores"], pred["labels"].float()]


def test_stock_inference_of_merged_checkpoints_without_mm_spectral(tmp_path):
    register_all_modules(init_default_scope=False)
    make_shapes_coco(tmp_path / "data", num_train=1, num_val=2, seed=0)
    images = sorted(str(p) for p in (tmp_path / "data" / "val").glob("*.png"))
    cfg = detector_config(tmp_path / "data")
    config = tmp_path / "adapted.py"
    config.write_text(cfg.pretty_text)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    meta = dict(cfg=cfg.pretty_text, dataset_meta=dict(cfg.metainfo), epoch=1, iter=1)
    meta["mm_spectral"] = describe(model, "full")  # what AdapterHook records
    full = tmp_path / "work" / "epoch_1.pth"
    atomic_save(dict(state_dict=model.state_dict(), meta=meta), full)

    load_tool("merge_adapters").main([str(config), str(full), "--out-dir", str(tmp_path / "tool")])
    runner = SimpleNamespace(
        model=model, cfg=cfg, work_dir=str(tmp_path / "work"), epoch=1, iter=1,
        logger=MMLogger.get_current_instance(),
    )  # fmt: skip
    hook = AdapterHook(merge_at_end=True)
    hook._meta = meta
    hook.after_train(runner)
    merged_cfg = (tmp_path / "work" / "merged_config.py").read_text()
    assert "AdaptedBackbone" not in merged_cfg and "mm_spectral" not in merged_cfg

    x = torch.randn(1, 3, 128, 128)
    torch.save(x, tmp_path / "x.pt")
    script = STOCK.format(
        images=images,
        x=str(tmp_path / "x.pt"),
        hook=str(tmp_path / "work" / "merged.pth"),
        tool_cfg=str(tmp_path / "tool" / "adapted_merged.py"),
        tool=str(tmp_path / "tool" / "merged.pth"),
        result=str(tmp_path / "stock.pt"),
    )
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], cwd=tmp_path, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-3000:]
    stock = torch.load(tmp_path / "stock.pt", weights_only=False)

    adapted = init_detector(cfg, str(full), device="cpu")
    want = [p.pred_instances.to_dict() for p in inference_detector(adapted, images)]
    with torch.no_grad():
        want_feats = adapted.extract_feat(x)
    assert any(len(p["scores"]) for p in want)  # boxes to compare
    for name in ("hook", "tool"):
        for got, expected in zip(stock[name]["feats"], want_feats):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        for got, expected in zip(stock[name]["preds"], want):
            for g, w in zip(tensors(got), tensors(expected)):
                torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-3)
    assert osp.isfile(tmp_path / "tool" / "merged.pth")
