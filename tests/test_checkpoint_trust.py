"""Checkpoints users can trust (issue 12), on the toy Runner: adapter records and the base
fingerprint are checked wherever a checkpoint is loaded, adapter-only files cannot pass
for full ones, merged checkpoints carry the adapter-free config, resume never restarts
silently or overwrites, adapter files resume and follow max_keep_ckpts, and there is
nothing to merge twice.

One run (tools/train.py, 6 iterations, checkpoints at 2, 4, 6, SGD with momentum so the
optimizer state matters) serves most tests; the others copy from it or train a few
iterations more.
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("mmengine")

from mmengine.config import Config  # noqa: E402
from mmengine.registry import MODELS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402
from openmmlab_toys import ROOT, load_tool, randomize_adapters, unique_name, write_config  # noqa: E402

import mm_spectral  # noqa: E402
from mm_spectral.openmmlab.checkpoint import (  # noqa: E402
    ADAPTER_TENSORS_KEY,
    LEGACY_ADAPTER_KEY,
    CheckpointMismatch,
    load_adapter_checkpoint,
    plain_config,
)
from mm_spectral.provenance import (  # noqa: E402
    adapter_hyper_parameters,
    base_fingerprint,
    fingerprint_problems,
    record_problems,
)
from mm_spectral.state import atomic_save, load_checkpoint_file  # noqa: E402

MOMENTUM = {"type='SGD', lr=0.2)": "type='SGD', lr=0.05, momentum=0.9)", "interval=3": "interval=2"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    config = write_config(root, replace=MOMENTUM)
    other = write_config(root, "other_base.py", base_seed=2, replace=MOMENTUM)
    work = root / "work"
    load_tool("train").main([str(config), "--work-dir", str(work), "--cfg-options", unique_name()])
    return SimpleNamespace(root=root, config=str(config), other_base=str(other), work=work)


def train(*argv: str):
    return load_tool("train").main([*map(str, argv), "--cfg-options", unique_name()])


def adapters_of(model) -> dict[str, torch.Tensor]:
    return mm_spectral.adapter_state_dict(model)


def full_state(path) -> dict[str, torch.Tensor]:
    return load_checkpoint_file(str(path))["state_dict"]


def digest(path: Path) -> tuple[str, float]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime


def toy(config: str, **cfg_options):
    cfg = Config.fromfile(config)
    cfg.merge_from_dict(cfg_options)
    return cfg, MODELS.build(cfg.model)


def exit_message(excinfo) -> str:
    return str(excinfo.value.code)


# --------------------------------------------------------------------- 2. hyper-parameters
@pytest.mark.parametrize("name", ["iter_6.pth", "iter_6_adapter.pth"])
def test_test_tool_refuses_other_adapter_hyper_parameters(run, name, tmp_path):
    argv = [run.config, str(run.work / name), "--work-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as excinfo:
        load_tool("test").main([*argv, "--cfg-options", "model.backbone.adapter.alpha=8"])
    message = exit_message(excinfo)
    assert "backbone 'backbone': adapter 'alpha' is 4 in the checkpoint, 8 in the config" in message


def test_merge_tool_and_api_refuse_other_adapter_hyper_parameters(run, tmp_path):
    out = tmp_path / "merged"
    for name in ("iter_6.pth", "iter_6_adapter.pth"):
        argv = [run.config, str(run.work / name), "--out-dir", str(out)]
        with pytest.raises(SystemExit) as excinfo:
            load_tool("merge_adapters").main(
                [*argv, "--cfg-options", "model.backbone.adapter.rank=3"]
            )
        assert "adapter 'rank' is 2 in the checkpoint, 3 in the config" in exit_message(excinfo)
        assert not out.exists()
    _, model = toy(run.config, **{"model.backbone.adapter.targets": [r"stem", r"fc"]})
    with pytest.raises(CheckpointMismatch, match=r"'targets' is \[.*\] in the checkpoint"):
        load_adapter_checkpoint(model, str(run.work / "iter_6_adapter.pth"))


def test_runner_load_from_refuses_other_adapters(run, tmp_path):
    cfg = Config.fromfile(run.config)
    cfg.merge_from_dict({"model.backbone.adapter.alpha": 2})
    cfg.work_dir, cfg.experiment_name = str(tmp_path), unique_name().split("=")[1]
    cfg.load_from = str(run.work / "iter_6.pth")
    with pytest.raises(CheckpointMismatch, match="'alpha' is 4 in the checkpoint, 2"):
        Runner.from_cfg(cfg).test()


def test_records_compare_effective_values():
    lora = dict(type="LoRA", rank=2, targets=["fc"])
    assert adapter_hyper_parameters(lora)["alpha"] is None  # the default, written out
    assert record_problems({"adapter": lora}, {"adapter": dict(lora, alpha=None)}, "b") == []
    spectral = dict(type="FourierFT", n=10, targets=("fc",))  # a tuple reads back as a list
    other_seed = dict(spectral, seed=1, targets=["fc"])
    (problem,) = record_problems({"adapter": spectral}, {"adapter": other_seed}, "b")
    assert problem == "b: adapter 'seed' is 777 in the checkpoint, 1 in the config"
    layers = record_problems(
        {"adapter": lora, "adapted": ["a"]}, {"adapter": lora, "adapted": ["b"]}, "b"
    )
    assert "adapted layers differ" in layers[0]


def test_checkpoints_without_records_load_with_a_warning(run, tmp_path):
    full = load_checkpoint_file(str(run.work / "iter_6.pth"))
    full["meta"].pop("mm_spectral")
    atomic_save(full, tmp_path / "old_full.pth")
    adapter = load_checkpoint_file(str(run.work / "iter_6_adapter.pth"))
    tensors = adapter[ADAPTER_TENSORS_KEY]
    legacy = {  # what format 1 wrote
        LEGACY_ADAPTER_KEY: {k: v for k, v in tensors.items() if ".adapter." in k},
        "state_dict": tensors,
        "meta": dict(adapter_only=True, iter=6),
    }
    atomic_save(legacy, tmp_path / "old_adapter.pth")
    test = load_tool("test")
    metrics = []
    for name in ("iter_6.pth", "old_full.pth", "old_adapter.pth"):
        path = run.work / name if name == "iter_6.pth" else tmp_path / name
        argv = [run.config, str(path), "--work-dir", str(tmp_path / f"w_{name}")]
        argv += ["--cfg-options", unique_name()]
        if name == "iter_6.pth":
            metrics.append(test.main(argv))
            continue
        with pytest.warns(UserWarning, match="no adapter record"):
            metrics.append(test.main(argv))
    assert metrics[0] == metrics[1] == metrics[2]


# --------------------------------------------------------------------- 3. base fingerprint
def test_adapter_files_refuse_another_base_unless_allowed(run, tmp_path):
    adapter = str(run.work / "iter_6_adapter.pth")
    with pytest.raises(SystemExit) as excinfo:
        load_tool("test").main([run.other_base, adapter, "--work-dir", str(tmp_path / "t")])
    message = exit_message(excinfo)
    assert "trained on other base weights" in message and "'backbone.stem.weight'" in message
    assert "--allow-other-base" in message
    out = tmp_path / "merged"
    with pytest.raises(SystemExit, match="other base weights"):
        load_tool("merge_adapters").main([run.other_base, adapter, "--out-dir", str(out)])
    assert not out.exists()
    with pytest.warns(UserWarning, match="Applied anyway"):
        load_tool("merge_adapters").main(
            [run.other_base, adapter, "--out-dir", str(out), "--allow-other-base"]
        )
    assert (out / "merged.pth").is_file()
    _, model = toy(run.other_base)
    with pytest.raises(CheckpointMismatch, match=r"8 of 10 frozen tensors differ"):
        load_adapter_checkpoint(model, adapter)
    with pytest.warns(UserWarning, match="other base weights"):
        load_adapter_checkpoint(model, adapter, allow_other_base=True)
    _, own = toy(run.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter_checkpoint(own, adapter)  # its own base: no warning at all


def test_fingerprint_follows_frozen_dtype_and_catches_small_changes():
    torch.manual_seed(0)
    base = {"w": torch.randn(64, 32), "b": torch.randn(7)}
    assert fingerprint_problems(base_fingerprint(base), base) == []
    as_bf16 = {k: v.bfloat16() for k, v in base.items()}
    assert fingerprint_problems(base_fingerprint(as_bf16), base) == []  # trained bf16, tested fp32
    assert fingerprint_problems(base_fingerprint(base), as_bf16) == []  # and the other way
    tuned = {"w": base["w"] * (1 + 1e-5 * torch.randn(64, 32)), "b": base["b"]}
    (problem,) = fingerprint_problems(base_fingerprint(base), tuned)
    assert problem.startswith("'w':")
    transposed = {"w": base["w"].T.reshape(64, 32), "b": base["b"]}  # same values, moved
    assert fingerprint_problems(base_fingerprint(base), transposed)
    assert (
        "shape"
        in fingerprint_problems(base_fingerprint(base), {"w": base["w"].T, "b": base["b"]})[0]
    )


# --------------------------------------------------------------------- 4. not a full checkpoint
def test_stock_loading_fails_and_ours_loads_over_the_pretrained_base(run, tmp_path):
    from mmengine.runner.checkpoint import _load_checkpoint_to_model, load_checkpoint

    path = str(run.work / "iter_6_adapter.pth")
    ckpt = load_checkpoint_file(path)
    _, model = toy(run.config)
    with pytest.raises(AttributeError):  # mmengine's own loader, where mm_spectral is absent
        _load_checkpoint_to_model.__wrapped__(model, ckpt)
    _, full = toy(run.config)
    full.load_state_dict(full_state(run.work / "iter_6.pth"))
    load_checkpoint(model, path)  # mmengine's loader with mm_spectral imported
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(model.eval()(x), full.eval()(x), rtol=0, atol=0)
    plain_cfg = plain_config(Config.fromfile(run.config))
    with pytest.raises(CheckpointMismatch, match="not in the config"):
        load_checkpoint(MODELS.build(plain_cfg.model), path)
    metrics = []
    for name in ("iter_6.pth", "iter_6_adapter.pth"):  # stock tools/test.py: Runner + load_from
        cfg = Config.fromfile(run.config)
        cfg.work_dir, cfg.load_from = str(tmp_path / name), str(run.work / name)
        cfg.experiment_name = unique_name().split("=")[1]
        metrics.append(Runner.from_cfg(cfg).test())
    assert metrics[0] == metrics[1]


# --------------------------------------------------------------------- 6. resume
def test_resume_never_restarts_silently_nor_overwrites(run, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    for step in (2, 4, 6):  # no last_checkpoint
        for name in (f"iter_{step}.pth", f"iter_{step}_adapter.pth"):
            shutil.copy(run.work / name, work / name)
    before = {p.name: digest(p) for p in work.iterdir()}
    with pytest.raises(SystemExit, match=r"already holds checkpoints .*iter_6.pth"):
        train(run.config, "--work-dir", work)  # a fresh run would overwrite them
    with pytest.raises(SystemExit, match=r"would overwrite later checkpoints .*iter_6.pth"):
        train(run.config, "--work-dir", work, "--resume", work / "iter_2.pth")
    assert {p.name: digest(p) for p in work.iterdir()} == before
    (work / "last_checkpoint").write_text(str(tmp_path / "gone.pth"))  # names a missing file
    runner = load_tool("train").main(
        [run.config, "--work-dir", str(work), "--resume", "--cfg-options", unique_name(),
         "train_cfg.max_iters=8"]
    )  # fmt: skip
    assert runner.iter == 8
    for name, value in before.items():
        assert digest(work / name) == value, f"{name} was written again"
    (log,) = work.glob("*/*.log")
    assert "resumed epoch: 0, iter: 6" in log.read_text()


# --------------------------------------------------------------------- 7. adapter files resume
def test_resume_from_adapter_file_equals_the_uninterrupted_run(run, tmp_path):
    runner = train(
        run.config, "--work-dir", tmp_path / "w", "--resume", run.work / "iter_4_adapter.pth"
    )
    assert runner.iter == 6
    straight = full_state(run.work / "iter_6.pth")
    for key, value in adapters_of(runner.model).items():
        torch.testing.assert_close(value, straight[key], rtol=0, atol=0)
    stripped = load_checkpoint_file(str(run.work / "iter_4_adapter.pth"))
    for key in ("message_hub", "optimizer", "param_schedulers"):
        stripped.pop(key, None)
    atomic_save(stripped, tmp_path / "iter_4_adapter.pth")
    with pytest.raises(SystemExit, match=r"holds no training state .*resume from .*iter_4.pth"):
        train(
            run.config, "--work-dir", tmp_path / "w2", "--resume", tmp_path / "iter_4_adapter.pth"
        )


def test_adapter_files_follow_max_keep_ckpts_across_a_resume(run, tmp_path):
    work = tmp_path / "work"
    keep = "default_hooks.checkpoint.max_keep_ckpts=2"
    train(run.config, "--work-dir", work, "--cfg-options", keep, "train_cfg.max_iters=4")
    load_tool("train").main(
        [run.config, "--work-dir", str(work), "--resume", "--cfg-options", unique_name(), keep,
         "train_cfg.max_iters=8"]
    )  # fmt: skip
    assert sorted(p.name for p in work.glob("*.pth")) == [
        "iter_6.pth", "iter_6_adapter.pth", "iter_8.pth", "iter_8_adapter.pth", "merged.pth"
    ]  # fmt: skip


# --------------------------------------------------------------------- 11. nothing to merge
def test_merging_a_merged_checkpoint_or_an_adapter_free_config_writes_nothing(run, tmp_path):
    merge = load_tool("merge_adapters")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as excinfo:
        merge.main([run.config, str(run.work / "merged.pth"), "--out-dir", str(out)])
    assert "is a merged checkpoint" in exit_message(excinfo)
    assert "nothing written" in exit_message(excinfo)
    plain = tmp_path / "plain.py"
    plain.write_text(plain_config(Config.fromfile(run.config)).pretty_text)
    with pytest.raises(SystemExit, match="builds no adapters"):
        merge.main([str(plain), str(run.work / "iter_6.pth"), "--out-dir", str(out)])
    assert not out.exists()


# --------------------------------------------------------------------- 1. merged files
def test_merged_checkpoints_carry_the_adapter_free_config(run, tmp_path):
    ckpt_path, _ = load_tool("merge_adapters").main(
        [run.config, str(run.work / "iter_6_adapter.pth"), "--out-dir", str(tmp_path)]
    )
    for path in (run.work / "merged.pth", ckpt_path):
        meta = load_checkpoint_file(str(path))["meta"]
        cfg = Config.fromstring(meta["cfg"], file_format=".py")
        assert cfg.model.backbone.type == "GlueToyBackbone" and "AdaptedBackbone" not in meta["cfg"]
        assert [h.type for h in cfg.custom_hooks] == []
        assert meta["mm_spectral"]["kind"] == "merged" and meta["iter"] == 6
        assert meta["mm_spectral"]["backbones"]["backbone"]["adapter"]["type"] == "LoRA"


def test_plain_config_imports_mm_spectral_only_when_it_still_uses_it():
    resnet = plain_config(
        Config.fromfile(str(ROOT / "configs/demo/mask-rcnn_r18-flora_fpn_1xb8-shapes.py"))
    )
    assert "custom_imports" not in resnet and "constructor" not in resnet.optim_wrapper
    assert "mm_spectral" not in resnet.pretty_text
    convnext = plain_config(
        Config.fromfile(str(ROOT / "configs/demo/upernet_convnextv2-atto-flora_1xb8-shapes-ade.py"))
    )
    assert convnext.model.backbone.type == "ConvNeXtV2"
    assert convnext.custom_imports.imports == ["mm_spectral.openmmlab"]


# --------------------------------------------------------------------- torch.load
def test_every_file_loads_weights_only_without_the_fallback(run):
    names = ["iter_6.pth", "iter_6_adapter.pth", "merged.pth"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # load_checkpoint_file warns when it unpickles fully
        loaded = {n: load_checkpoint_file(str(run.work / n), trusted=False) for n in names}
    for name in names[:2]:
        rng = loaded[name]["rng_state"]
        assert set(rng) >= {"python", "numpy", "torch", "cuda"} and rng["iter"] == 6
    assert torch.equal(
        loaded["iter_6.pth"]["rng_state"]["torch"],
        loaded["iter_6_adapter.pth"]["rng_state"]["torch"],
    )


def test_adapter_files_only_hold_what_training_changed(run):
    _, model = toy(run.config)
    randomize_adapters(model)
    tensors = load_checkpoint_file(str(run.work / "iter_6_adapter.pth"))[ADAPTER_TENSORS_KEY]
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    assert not frozen & set(tensors) and set(model.state_dict()) - frozen == set(tensors)
