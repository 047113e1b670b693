"""Toy OpenMMLab pieces the OpenMMLab-layer tests share: a registered backbone (conv stem,
BN, depthwise + pointwise convs, a Linear), a classifier, a generated dataset (optionally
with random augmentation drawing from python, numpy and torch), a metric, a Runner config
on them, and helpers (tools loaded from their files, log capture)."""

from __future__ import annotations

import importlib.util
import logging
import os.path as osp
import random
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.evaluator import BaseMetric
from mmengine.logging import MMLogger
from mmengine.model import BaseModel, BaseModule
from mmengine.registry import DATASETS, METRICS, MODELS
from torch import nn
from torch.utils.data import Dataset

import mm_spectral.openmmlab  # noqa: F401  (registers)

ROOT = Path(__file__).resolve().parents[1]
TARGETS = [r"stem", r"blocks\.[01]", r"fc"]
ADAPTED = ["stem", "blocks.0", "blocks.1", "fc"]
LORA = dict(type="LoRA", rank=2, alpha=4, targets=TARGETS)


@MODELS.register_module(name="GlueToyBackbone", force=True)
class GlueToyBackbone(BaseModule):
    """Conv stem, BN (buffers), depthwise + pointwise convs, a Linear: (B,3,8,8) → (B,16)."""

    def __init__(self, init_cfg=None, greedy: bool = False, with_cp: bool = False) -> None:
        super().__init__(init_cfg)
        self.greedy, self.with_cp = greedy, with_cp
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 1))
        self.fc = nn.Linear(16, 16)

    def init_weights(self) -> None:
        super().init_weights()
        if self.greedy:  # a backbone whose init re-enables grads and re-draws everything
            with torch.no_grad():
                for param in self.parameters():
                    param.requires_grad_(True)
                    param.normal_()

    def forward(self, x):
        x = self.blocks(torch.relu(self.norm(self.stem(x))))
        return self.fc(x.mean((2, 3)))


@MODELS.register_module(name="GlueToyClassifier", force=True)
class GlueToyClassifier(BaseModel):
    def __init__(self, backbone: dict, num_classes: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.backbone = MODELS.build(backbone)
        self.dropout = nn.Dropout(dropout)  # draws from torch's generator when > 0
        self.head = nn.Linear(16, num_classes)

    def forward(self, inputs, labels=None, mode="tensor"):
        logits = self.head(self.dropout(torch.relu(self.backbone(inputs))))
        if mode == "loss":
            return {"loss": F.cross_entropy(logits, labels)}
        if mode == "predict":
            return [dict(pred=p, label=t) for p, t in zip(logits.argmax(1), labels)]
        return logits


@DATASETS.register_module(name="GlueToyDataset", force=True)
class GlueToyDataset(Dataset):
    """Generated 3-class images; ``augment`` adds a random pipeline (as mmcv transforms
    draw: python's and numpy's generators, and torch's)."""

    metainfo = dict(classes=("a", "b", "c"))

    def __init__(self, n: int = 16, augment: bool = False) -> None:
        gen = torch.Generator().manual_seed(0)
        self.labels = torch.arange(n) % 3
        self.inputs = torch.randn(n, 3, 8, 8, generator=gen) + self.labels.view(-1, 1, 1, 1)
        self.pipeline = RandomJitter() if augment else (lambda sample: sample)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return self.pipeline(dict(inputs=self.inputs[i], labels=self.labels[i]))


class RandomJitter:
    """Random flip (python), additive noise (numpy) and a random scale (torch)."""

    def __call__(self, sample: dict) -> dict:
        x = sample["inputs"]
        if random.random() < 0.5:
            x = x.flip(-1)
        noise = torch.from_numpy(np.random.normal(0, 0.5, size=tuple(x.shape))).float()
        return dict(sample, inputs=(x + noise) * (0.5 + torch.rand(())))


@METRICS.register_module(name="GlueToyAccuracy", force=True)
class GlueToyAccuracy(BaseMetric):
    def process(self, data_batch, data_samples) -> None:
        self.results += [float(s["pred"] == s["label"]) for s in data_samples]

    def compute_metrics(self, results) -> dict:
        return dict(acc=sum(results) / len(results))


def backbone_cfg(**kwargs) -> dict:
    return dict(type="AdaptedBackbone", backbone=dict(type="GlueToyBackbone", **kwargs))


def load_tool(name: str):
    path = ROOT / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_tool_{osp.basename(name)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Capture(logging.Handler):
    """Collects the messages of MMEngine's current logger."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> Capture:
        MMLogger.get_current_instance().addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        MMLogger.get_current_instance().removeHandler(self)


def randomize_adapters(model: nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapter." in f".{name}":
                param.normal_(0, 0.3)


# ---------------------------------------------------------------- a Runner config
CONFIG = """
model = dict(
    type='GlueToyClassifier',
    backbone=dict(
        type='AdaptedBackbone',
        backbone=dict(type='GlueToyBackbone',
                      init_cfg=dict(type='Pretrained', checkpoint={pretrained!r})),
        adapter=dict(type='LoRA', rank=2, alpha=4, targets={targets!r})))
_data = dict(batch_size=4, num_workers=0, dataset=dict(type='GlueToyDataset', n=16),
             sampler=dict(type='DefaultSampler', shuffle=False),
             collate_fn=dict(type='default_collate'))
train_dataloader = _data
test_dataloader = _data
train_cfg = dict(type='IterBasedTrainLoop', max_iters=6)
test_cfg = dict(type='TestLoop')
test_evaluator = dict(type='GlueToyAccuracy')
optim_wrapper = dict(constructor='AdapterOptimWrapperConstructor',
                     optimizer=dict(type='SGD', lr=0.2))
default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=3, by_epoch=False),
                     logger=dict(type='LoggerHook', interval=1))
log_processor = dict(by_epoch=False)
custom_hooks = [dict(type='AdapterHook', merge_at_end=True),
                dict(type='DeltaStatsHook', interval=2)]
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)
"""


def unique_name() -> str:
    return f"experiment_name=glue_{uuid.uuid4().hex[:8]}"


def write_config(root: Path, name: str = "toy_lora.py", base_seed: int = 1, **text) -> Path:
    """A pretrained backbone (seed ``base_seed``) and :data:`CONFIG` under ``root``;
    ``text`` replaces fragments of the config text (old=new pairs as a dict)."""
    pretrained = root / f"pretrained_{base_seed}.pth"
    if not pretrained.exists():
        torch.manual_seed(base_seed)
        torch.save(GlueToyBackbone().state_dict(), pretrained)
    config = CONFIG.format(pretrained=str(pretrained), targets=TARGETS)
    for old, new in text.get("replace", {}).items():
        assert old in config, old
        config = config.replace(old, new)
    path = root / name
    path.write_text(config)
    return path
