"""End to end, per toolbox (mmdet, mmseg, mmrotate), on generated data through the Runner:
train a few iterations, save (full + adapter-only), resume, test, merge, and check that the
merged checkpoint under the adapter-free config predicts what the adapted model predicts."""

from __future__ import annotations

import copy
import importlib
import multiprocessing.dummy
import os.path as osp
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmdet")
pytest.importorskip("mmseg")
pytest.importorskip("mmrotate")

from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import mm_spectral  # noqa: E402
from mm_spectral.openmmlab import build_model, merge_checkpoint  # noqa: E402
from tools.data.synthetic_shapes import (  # noqa: E402
    make_shapes_ade,
    make_shapes_coco,
    make_shapes_dota,
)

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "mmdet": ("configs/demo/mask-rcnn_r18-flora_fpn_1xb8-shapes.py", make_shapes_coco),
    "mmseg": ("configs/demo/upernet_convnextv2-atto-flora_1xb8-shapes-ade.py", make_shapes_ade),
    "mmrotate": (
        "configs/demo/oriented-rcnn-le90_convnextv2-atto-flora_fpn_1xb4-shapes-dota.py",
        make_shapes_dota,
    ),
}


def tiny_config(scope: str, data_root: Path, work_dir: Path, length: int) -> Config:
    """The toolbox's demo config on the generated data, ``length`` epochs (iterations for
    the iteration-based segmentation schedule), batch 2, no workers."""
    cfg = Config.fromfile(str(ROOT / CASES[scope][0]))
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[loader].dataset.data_root = str(data_root)
        cfg[loader].batch_size = 2
        cfg[loader].num_workers = 0
        cfg[loader].persistent_workers = False
    for evaluator in ("val_evaluator", "test_evaluator"):
        if "ann_file" in cfg[evaluator]:
            cfg[evaluator].ann_file = str(data_root / "annotations/instances_val.json")
    if cfg.train_cfg.type == "IterBasedTrainLoop":
        cfg.train_cfg.max_iters = cfg.train_cfg.val_interval = length
        cfg.default_hooks.checkpoint.interval = length
        cfg.param_scheduler = []
    else:
        cfg.train_cfg.max_epochs = cfg.train_cfg.val_interval = length
        cfg.default_hooks.checkpoint.interval = 1
        cfg.param_scheduler = []
    cfg.work_dir = str(work_dir)
    cfg.default_hooks.logger.interval = 1
    return cfg


def predictions(model: torch.nn.Module, data: dict) -> list[torch.Tensor]:
    """The tensors a prediction consists of, for any of the three toolboxes."""
    model.eval()
    with torch.no_grad():
        samples = model.test_step(copy.deepcopy(data))
    out = []
    for sample in samples:
        if "pred_sem_seg" in sample:
            out.append(sample.seg_logits.data)
        else:
            inst = sample.pred_instances
            boxes = inst.bboxes.tensor if hasattr(inst.bboxes, "tensor") else inst.bboxes
            out += [boxes, inst.scores]
    return out


@pytest.mark.parametrize("scope", list(CASES))
def test_train_resume_test_merge(scope, tmp_path, monkeypatch):
    if scope == "mmrotate":  # DOTAMetric's 4 spawned processes re-import torch: 15 s a test
        from mmrotate.evaluation.functional import mean_ap

        monkeypatch.setattr(mean_ap, "get_context", lambda method: multiprocessing.dummy)
    importlib.import_module(f"{scope}.utils").register_all_modules(init_default_scope=False)
    data_root = tmp_path / "data"
    CASES[scope][1](data_root, num_train=4, num_val=2, seed=0)
    length = 2 if scope == "mmseg" else 1
    cfg = tiny_config(scope, data_root, tmp_path / "work", length)
    cfg.experiment_name = f"{scope}_train"
    Runner.from_cfg(copy.deepcopy(cfg)).train()
    name = f"iter_{length}.pth" if scope == "mmseg" else f"epoch_{length}.pth"
    first = tmp_path / "work" / name
    assert first.exists()
    assert (tmp_path / "work" / name.replace(".pth", "_adapter.pth")).exists()

    # resume (an MMEngine checkpoint with its message hub: the torch>=2.6 trap) and go on
    resumed = tiny_config(scope, data_root, tmp_path / "work", 2 * length)
    resumed.resume, resumed.load_from = True, str(first)
    resumed.experiment_name = f"{scope}_resume"
    runner = Runner.from_cfg(resumed)
    runner.train()
    assert runner.iter > 0 and (runner.epoch == 2 or runner.iter == 2 * length)
    metrics = runner.test()
    assert metrics and all(v == v for v in metrics.values() if isinstance(v, float))
    final = tmp_path / "work" / name.replace(f"_{length}.pth", f"_{2 * length}.pth")

    # merge, then the adapter-free config must give the adapted model's predictions
    state, plain_cfg = merge_checkpoint(resumed, str(final))
    assert not any(".adapter." in k for k in state)
    assert "AdaptedBackbone" not in str(plain_cfg.model)
    adapted = build_model(resumed)
    adapted.load_state_dict(torch.load(final, weights_only=False)["state_dict"], strict=True)
    plain = build_model(plain_cfg)
    plain.load_state_dict(state, strict=True)
    data = next(iter(runner.test_dataloader))
    got, want = predictions(plain, data), predictions(adapted, data)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-3)
    # features always exist (a barely trained detector may predict no box at all)
    inputs = adapted.data_preprocessor(copy.deepcopy(data), False)["inputs"]
    with torch.no_grad():
        feats_plain, feats_adapted = plain.extract_feat(inputs), adapted.extract_feat(inputs)
    assert len(feats_plain) == len(feats_adapted) >= 4
    for g, w in zip(feats_plain, feats_adapted):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    # and the adapters did change them: the check above is not comparing two plain models
    adapted_unmerged_delta = sum(
        layer.adapter.delta_weight().abs().sum() for _, layer in mm_spectral.adapted_layers(adapted)
    )
    assert adapted_unmerged_delta > 0
    assert osp.isdir(cfg.work_dir)
