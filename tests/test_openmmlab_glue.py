"""The OpenMMLab layer on toy models: AdaptedBackbone, hooks, optimizer constructor, the
torch.load fix, checkpoints, merging, and the train / test / merge / count / plot tools.

A real MMEngine Runner trains a toy classifier through tools/train.py once (module
fixture); the tests then check what that run left behind and resume from it.
"""

from __future__ import annotations

import copy
import math
import os
import os.path as osp
import pickle
import uuid
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

pytest.importorskip("mmengine")

from mmengine.config import Config  # noqa: E402
from mmengine.logging import HistoryBuffer, MMLogger  # noqa: E402
from mmengine.model import BaseModule  # noqa: E402
from mmengine.registry import MODELS, DefaultScope  # noqa: E402
from openmmlab_toys import (  # noqa: E402
    ADAPTED,
    LORA,
    Capture,
    GlueToyBackbone,
    GlueToyClassifier,
    backbone_cfg,
    load_tool,
    randomize_adapters,
    unique_name,
    write_config,
)

import mm_spectral  # noqa: E402
import mm_spectral.openmmlab  # noqa: E402,F401  (registers)
from mm_spectral.delta_stats import amplification, delta_stats, top_singular_vectors  # noqa: E402
from mm_spectral.openmmlab.checkpoint import (  # noqa: E402
    ADAPTER_TENSORS_KEY,
    adapter_checkpoint,
    load_adapter_checkpoint,
    merge_checkpoint,
    plain_config,
)
from mm_spectral.openmmlab.hooks import AdapterHook  # noqa: E402
from mm_spectral.state import load_checkpoint_file, merged_state_dict  # noqa: E402


# ---------------------------------------------------------------- AdaptedBackbone
def test_adapted_backbone_is_the_inner_backbone_with_adapter_keys():
    torch.manual_seed(0)
    plain = MODELS.build(dict(type="GlueToyBackbone"))
    adapted = MODELS.build(dict(backbone_cfg(), adapter=LORA, trainable=[r"norm\..*"]))
    assert type(adapted) is GlueToyBackbone
    plain_keys, keys = set(plain.state_dict()), set(adapted.state_dict())
    extra = keys - plain_keys
    assert plain_keys <= keys and extra and all(".adapter." in k for k in extra)
    assert {k.split(".adapter.")[0] for k in extra} == set(ADAPTED)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable == {k for k in extra if "lora" in k} | {"norm.weight", "norm.bias"}
    record = adapted.mm_spectral_cfg
    assert record["adapted"] == ADAPTED
    assert record["adapter"]["type"] == "LoRA" and record["trainable"] == [r"norm\..*"]
    assert adapted.load_state_dict(plain.state_dict(), strict=False).unexpected_keys == []


def test_frozen_baseline_has_no_adapters_and_only_trainable_matches_train():
    model = MODELS.build(dict(backbone_cfg(), trainable=[r"fc\.bias"]))
    assert not any(".adapter." in k for k in model.state_dict())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.bias"]
    assert model.mm_spectral_cfg["adapter"] is None


def test_frozen_dtype_stores_frozen_weights_low_and_runs_under_autocast():
    model = MODELS.build(dict(backbone_cfg(), adapter=LORA, frozen_dtype="bfloat16"))
    assert model.stem.weight.dtype == torch.bfloat16 and model.norm.weight.dtype == torch.bfloat16
    assert (
        model.stem.adapter.lora_A.dtype == torch.float32 and model.stem.adapter.lora_A.requires_grad
    )
    model.fc(torch.randn(2, 16, dtype=torch.bfloat16)).float().sum().backward()
    assert model.fc.adapter.lora_B.grad is not None and model.fc.weight.grad is None


def test_cuda_graph_option_wraps_the_forward_and_refuses_checkpointing():
    from mm_spectral.cuda_graph import CudaGraphForward

    model = MODELS.build(dict(backbone_cfg(), adapter=LORA, cuda_graph=dict(max_shapes=1)))
    runner = model.__dict__["forward"]
    assert isinstance(runner, CudaGraphForward) and runner.max_shapes == 1
    assert model.mm_spectral_cfg["cuda_graph"] is True
    assert "forward" not in MODELS.build(dict(backbone_cfg(), adapter=LORA)).__dict__
    with pytest.raises(ValueError, match="with_cp"):
        MODELS.build(dict(backbone_cfg(with_cp=True), adapter=LORA, cuda_graph=True))


def test_compile_option_compiles_in_place_and_refuses_other_step_switches():
    model = MODELS.build(dict(backbone_cfg(), adapter=LORA, compile=dict(backend="eager")))
    assert model._compiled_call_impl is not None  # the module itself: names unchanged
    assert model.mm_spectral_cfg["compile"] == dict(backend="eager")
    assert not any(k.startswith("_orig_mod") for k in model.state_dict())
    blocks = MODELS.build(dict(backbone_cfg(), adapter=LORA,
                               compile=dict(targets=[r"blocks\.\d+"], backend="eager")))  # fmt: skip
    assert blocks._compiled_call_impl is None
    assert all(block._compiled_call_impl is not None for block in blocks.blocks)
    for clash in ("cuda_graph", "batched_spectra"):
        with pytest.raises(ValueError, match=f"compile cannot be combined with {clash}"):
            MODELS.build(dict(backbone_cfg(), adapter=LORA, compile=True, **{clash: True}))


@MODELS.register_module(name="TwinLinearToy", force=True)
class TwinLinearToy(BaseModule):
    """Two same-shape linears: one shape group for batched spectra."""

    def __init__(self, with_cp: bool = False) -> None:
        super().__init__()
        self.with_cp = with_cp  # as the project's backbones: checkpointing per block
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        if self.with_cp and torch.is_grad_enabled():
            return checkpoint(lambda t: self.b(torch.tanh(self.a(t))), x, use_reentrant=False)
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("method", ["FourierFT", "FoRA"])
def test_batched_spectra_option_builds_once_per_shape_with_equal_values_and_grads(
    method, monkeypatch
):
    """AdaptedBackbone(batched_spectra=True): one inverse FFT per shape group, same numbers.
    FFTs are counted at torch.fft, so the per-layer builds run in Python here (the C++ node
    calls ATen directly; tests/test_native.py holds it to the Python function)."""
    from mm_spectral.kernels import native

    monkeypatch.setattr(native._NATIVE, "value", "off")
    cfg = dict(type=method, n=12, seed=3, targets=["a", "b"])
    calls = []
    irfft2 = torch.fft.irfft2
    monkeypatch.setattr(torch.fft, "irfft2", lambda *a, **k: calls.append(1) or irfft2(*a, **k))
    results = []
    for batched in (False, True):
        torch.manual_seed(0)
        model = MODELS.build(dict(type="AdaptedBackbone", backbone=dict(type="TwinLinearToy"),
                                  adapter=cfg, batched_spectra=batched))  # fmt: skip
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".adapter." in name:
                    param.normal_(0, 0.1)
        calls.clear()
        loss = model(torch.randn(3, 16)).square().sum()
        results.append((len(calls), loss.detach()))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[-1] += (grads,)
        assert model.mm_spectral_cfg["batched_spectra"] is batched
    (calls_plain, loss_plain, grads_plain), (calls_batched, loss_batched, grads_batched) = results
    per_layer = 2 if method == "FourierFT" else 4  # FoRA: two factors per layer
    assert (calls_plain, calls_batched) == (per_layer, per_layer // 2)
    torch.testing.assert_close(loss_plain, loss_batched)
    assert grads_plain.keys() == grads_batched.keys() and grads_plain
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grad, grads_batched[name], msg=name)
    with pytest.raises(ValueError, match="batched_spectra"):
        MODELS.build(dict(type="AdaptedBackbone", backbone=dict(type="TwinLinearToy"),
                          adapter=cfg, batched_spectra=True, cuda_graph=True))  # fmt: skip


def test_batched_spectra_default_is_on_for_eager_spectral_backbones_only(monkeypatch):
    from mm_spectral.kernels import OPTIONS

    def built(adapter, **switches):
        cfg = dict(type="AdaptedBackbone", backbone=dict(type="TwinLinearToy"), **switches)
        return MODELS.build(dict(cfg, adapter=dict(adapter, targets=["a", "b"])))

    fourier = dict(type="FourierFT", n=12)
    assert built(fourier).mm_spectral_cfg["batched_spectra"] is True
    assert built(dict(type="FoRA", n=12, rank=4)).mm_spectral_cfg["batched_spectra"] is True
    # LoRA's two same-shape linears: their weight changes batch (OPTIONS.batched_linears)
    assert built(dict(type="LoRA")).mm_spectral_cfg["batched_spectra"] is True
    monkeypatch.setattr(OPTIONS, "batched_linears", "off")
    assert built(dict(type="LoRA")).mm_spectral_cfg["batched_spectra"] is False
    monkeypatch.setattr(OPTIONS, "batched_linears", "on")
    flora = dict(type="FLoRA", rank=4)  # its core products batch too
    assert built(flora).mm_spectral_cfg["batched_spectra"] is True
    for switch in ("cuda_graph", "compile"):
        assert built(fourier, **{switch: True}).mm_spectral_cfg["batched_spectra"] is False
    assert built(fourier, batched_spectra=False).mm_spectral_cfg["batched_spectra"] is False
    one_layer = MODELS.build(dict(type="AdaptedBackbone", backbone=dict(type="TwinLinearToy"),
                                  adapter=dict(fourier, targets=["a"])))  # fmt: skip
    assert one_layer.mm_spectral_cfg["batched_spectra"] is False  # nothing to batch


@pytest.mark.parametrize("method", ["FLoRA", "FourierFT"])
def test_batched_spectra_stay_off_under_activation_checkpointing(method):
    """with_cp recomputes each block in the backward, where a build made once per forward is
    gone: off by default (the step then matches the plain model), refused when asked for."""
    cfg = dict(
        type=method, targets=["a", "b"], **(dict(rank=4) if method == "FLoRA" else dict(n=12))
    )

    def build(**switches):
        torch.manual_seed(0)
        model = MODELS.build(dict(type="AdaptedBackbone", adapter=cfg, **switches))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".adapter." in name:
                    param.normal_(0, 0.1)
        return model

    checkpointed = build(backbone=dict(type="TwinLinearToy", with_cp=True))
    assert checkpointed.mm_spectral_cfg["batched_spectra"] is False
    plain = build(backbone=dict(type="TwinLinearToy"))
    x = torch.randn(3, 16)
    for model in (checkpointed, plain):
        model(x).square().sum().backward()
    for (name, p), q in zip(checkpointed.named_parameters(), plain.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    with pytest.raises(ValueError, match="with_cp"):
        build(backbone=dict(type="TwinLinearToy", with_cp=True), batched_spectra=True)


def test_init_weights_keeps_grads_adapters_and_summarises_missing_keys(tmp_path):
    torch.manual_seed(1)
    pretrained = MODELS.build(dict(type="GlueToyBackbone")).state_dict()
    path = str(tmp_path / "pretrained.pth")
    torch.save(pretrained, path)
    init_cfg = dict(type="Pretrained", checkpoint=path)
    for greedy in (False, True):
        model = MODELS.build(dict(backbone_cfg(init_cfg=init_cfg), adapter=LORA))
        randomize_adapters(model)
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        adapters = {k: v.clone() for k, v in mm_spectral.adapter_state_dict(model).items()}
        with Capture() as logs:
            model.init_weights()
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        for key, value in mm_spectral.adapter_state_dict(model).items():
            torch.testing.assert_close(value, adapters[key], rtol=0, atol=0)
        if greedy:
            twin = copy.deepcopy(model)  # EMA's copy: its guard must act on the copy
            assert twin.init_weights.module is twin
            twin.init_weights()
            assert not twin.stem.weight.requires_grad and model.stem.adapter is not None
        else:
            torch.testing.assert_close(model.fc.weight, pretrained["fc.weight"])
            summary = [m for m in logs.messages if "adapter tensors" in m]
            assert len(summary) == 1 and "\n" not in summary[0]
            assert f"{len(adapters)} adapter tensors" in summary[0]
            assert not any("missing keys" in m for m in logs.messages)


def test_child_registry_finds_adapted_backbone_without_default_scope():
    """A toolbox's child registry falls back to the root one for AdaptedBackbone."""
    from mmengine.registry import Registry

    child = Registry("model", parent=MODELS, scope=f"glue{uuid.uuid4().hex[:6]}")
    child.register_module(name="GlueChildOnlyBackbone", module=GlueToyBackbone)
    model = child.build(
        dict(
            type="AdaptedBackbone",
            backbone=dict(type="GlueChildOnlyBackbone"),
            adapter=LORA,
        )
    )
    assert type(model) is GlueToyBackbone and model.stem.adapter is not None


def test_mmdet_resnet_through_mmdet_registry():
    mmdet_registry = pytest.importorskip("mmdet.registry")
    pytest.importorskip("mmdet.models")
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    cfg = dict(
        type="AdaptedBackbone",
        backbone=dict(type="ResNet", depth=18, out_indices=(3,), norm_eval=False),
        adapter=dict(type="FLoRA", rank=2, targets=[r"layer4\.1\.conv[12]"]),
    )
    with DefaultScope.overwrite_default_scope("mmdet"):
        model = mmdet_registry.MODELS.build(cfg)
    assert type(model).__name__ == "ResNet"
    assert model.mm_spectral_cfg["adapted"] == ["layer4.1.conv1", "layer4.1.conv2"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable)
    model.eval()  # mmdet's ResNet.train() returns None
    out = model(torch.randn(1, 3, 64, 64))
    assert out[0].shape == (1, 512, 2, 2)


# ---------------------------------------------------------------- AdapterHook's guard
def toy_model(adapter=LORA, trainable=None) -> GlueToyClassifier:
    torch.manual_seed(0)
    return GlueToyClassifier(dict(backbone_cfg(), adapter=adapter, trainable=trainable))


def fake_runner(model) -> SimpleNamespace:
    hub = SimpleNamespace(runtime_info={})
    return SimpleNamespace(model=model, logger=MMLogger.get_current_instance(), message_hub=hub)


def test_adapter_hook_passes_a_good_model_and_logs_the_table():
    hook = AdapterHook()
    with Capture() as logs:
        hook.before_train(fake_runner(toy_model(trainable=[r"norm\..*"])))
    assert any("total trainable" in m for m in logs.messages)


def test_adapter_hook_rejects_an_extra_trainable_backbone_parameter():
    model = toy_model()
    model.backbone.stem.weight.requires_grad_(True)
    model.backbone.fc.bias.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"(?s)2 backbone parameters.*backbone\.stem\.weight"):
        AdapterHook().before_train(fake_runner(model))
    AdapterHook(allowed=[r"backbone\.stem\.weight", r"backbone\.fc\.bias"]).before_train(
        fake_runner(model)
    )
    with pytest.raises(RuntimeError, match="no backbone built by AdaptedBackbone"):
        AdapterHook().before_train(fake_runner(nn.Linear(2, 2)))


# ---------------------------------------------------------------- optimizer constructor
def test_optimizer_constructor_sees_only_trainable_and_logs_one_line():
    from mmengine.optim import build_optim_wrapper

    model = toy_model(trainable=[r"norm\..*"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = sum(1 for p in model.parameters() if not p.requires_grad)
    for paramwise_cfg in (None, dict(norm_decay_mult=0.0, custom_keys={"head": dict(lr_mult=2)})):
        cfg = dict(
            constructor="AdapterOptimWrapperConstructor",
            optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.05),
        )
        if paramwise_cfg:
            cfg["paramwise_cfg"] = paramwise_cfg
        with Capture() as logs:
            wrapper = build_optim_wrapper(model, cfg)
        groups = wrapper.optimizer.param_groups
        params = [p for g in groups for p in g["params"]]
        assert len(params) == len(trainable) and {id(p) for p in params} == {
            id(p) for p in trainable
        }
        lines = [m for m in logs.messages if m.startswith("optimizer:")]
        assert len(lines) == 1 and f"{frozen} frozen skipped" in lines[0]
        assert not any(
            "requires_grad=False" in m or "paramwise_options" in m for m in logs.messages
        )
        if paramwise_cfg:
            by_param = {id(p): g for g in groups for p in g["params"]}
            assert by_param[id(model.backbone.norm.weight)]["weight_decay"] == 0.0
            assert by_param[id(model.head.weight)]["lr"] == pytest.approx(2e-3)


def test_flat_adamw_from_a_config_steps_as_torch_adamw():
    """optimizer=dict(type='FlatAdamW'): MMEngine builds it with the constructor's groups,
    packs each group into one buffer, and it steps as torch's fused AdamW does."""
    from mmengine.optim import build_optim_wrapper

    from mm_spectral import FlatAdamW

    paramwise = dict(norm_decay_mult=0.0, custom_keys={"head": dict(lr_mult=2)})
    models, wrappers, summaries = [], [], {}
    for kind in ("FlatAdamW", "AdamW"):
        model = toy_model(trainable=[r"norm\..*"])
        optimizer = dict(type=kind, lr=1e-2, weight_decay=0.05)
        if kind == "AdamW":
            optimizer["fused"] = True
        cfg = dict(
            constructor="AdapterOptimWrapperConstructor",
            optimizer=optimizer,
            paramwise_cfg=paramwise,
        )
        models.append(model)
        with Capture() as logs:
            wrappers.append(build_optim_wrapper(model, cfg))
        lines = [m for m in logs.messages if m.startswith("optimizer:")]
        assert len(lines) == 1
        summaries[kind] = lines[0]
    flat = wrappers[0].optimizer
    assert f"; FlatAdamW: {flat.layout()}" in summaries["FlatAdamW"]
    assert "FlatAdamW" not in summaries["AdamW"]
    assert isinstance(flat, FlatAdamW) and len(flat.param_groups) > 1
    assert any(packed is not None for packed in flat._flat.values())
    for step in range(3):
        for model, wrapper in zip(models, wrappers):
            torch.manual_seed(step)
            wrapper.update_params(model(torch.randn(2, 3, 8, 8)).square().mean())
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_plain_config_gives_flat_adamw_back_as_torch_adamw():
    cfg = Config(
        dict(
            model=dict(type="ResNet", depth=18),
            custom_imports=dict(imports=["mm_spectral.openmmlab"]),
            optim_wrapper=dict(
                constructor="AdapterOptimWrapperConstructor",
                optimizer=dict(type="FlatAdamW", lr=1e-4, weight_decay=0.05),
            ),
        )
    )
    plain = plain_config(cfg)
    assert plain.optim_wrapper.optimizer.type == "AdamW"
    assert "constructor" not in plain.optim_wrapper and "custom_imports" not in plain
    assert cfg.optim_wrapper.optimizer.type == "FlatAdamW"


# ---------------------------------------------------------------- ΔW statistics
def test_amplification_matches_exact_svd_reference():
    gen = torch.Generator().manual_seed(0)
    for (m, n), rank in (((12, 9), 3), ((96, 80), 4)):
        weight = torch.randn(m, n, generator=gen)
        delta = torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen)
        u, s, vh = torch.linalg.svd(delta.double())
        reference = delta.double().norm() / (u[:, :rank].T @ weight.double() @ vh[:rank].T).norm()
        assert amplification(delta, weight, rank) == pytest.approx(reference.item(), rel=1e-4)
        uu, vv = top_singular_vectors(delta, rank)
        torch.testing.assert_close(
            uu @ uu.T, (u[:, :rank] @ u[:, :rank].T).float(), atol=1e-4, rtol=0
        )
        torch.testing.assert_close(vv @ vv.T, (vh[:rank].T @ vh[:rank]).float(), atol=1e-4, rtol=0)


def test_delta_stats_zero_then_positive_and_leave_rng_alone():
    model = toy_model()
    stats = delta_stats(model)
    assert stats["delta_norm"] == 0 and "delta_amplification" not in stats
    randomize_adapters(model)
    state = torch.get_rng_state()
    stats = delta_stats(model)
    assert torch.equal(state, torch.get_rng_state())
    assert stats["delta_norm"] > 0 and math.isfinite(stats["delta_amplification"])
    assert stats["delta_amplification"] > 0


# ---------------------------------------------------------------- torch.load fix
def test_mmengine_loads_runner_style_checkpoints_on_new_torch(tmp_path):
    from mmengine.runner.checkpoint import _load_checkpoint

    from mm_spectral.openmmlab.compat import patch_mmengine_torch_load

    assert patch_mmengine_torch_load() == patch_mmengine_torch_load()  # idempotent
    buffer = HistoryBuffer()
    buffer.update(1.5)
    path = str(tmp_path / "ckpt.pth")
    torch.save(
        dict(state_dict={"w": torch.ones(2)}, message_hub=dict(log_scalars={"x": buffer})), path
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loads with weights_only=True: no fallback warning
        ckpt = _load_checkpoint(path, map_location="cpu")
    assert ckpt["message_hub"]["log_scalars"]["x"].current() == 1.5


class _GetattrPayload:
    """Pickles as getattr(numpy.ndarray, 'tofile'): a getattr HistoryBuffer never needs."""

    def __reduce__(self):
        return (getattr, (np.ndarray, "tofile"))


def test_the_allowed_getattr_serves_history_buffers_only(tmp_path):
    path = tmp_path / "payload.pth"
    torch.save({"x": _GetattrPayload()}, path)
    with pytest.raises(pickle.UnpicklingError, match="getattr"):
        torch.load(path, weights_only=True)


# ---------------------------------------------------------------- a real Runner
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """tools/train.py on the toy config: 6 iterations, checkpoints at 3 and 6."""
    root = tmp_path_factory.mktemp("glue")
    config = write_config(root)
    work = root / "work"
    argv = [str(config), "--work-dir", str(work), "--cfg-options", unique_name()]
    runner = load_tool("train").main(argv)
    return SimpleNamespace(root=root, config=str(config), work=work, runner=runner)


def test_runner_writes_full_and_adapter_checkpoints(trained):
    work = trained.work
    for step in (3, 6):
        assert (work / f"iter_{step}.pth").is_file()
        assert (work / f"iter_{step}_adapter.pth").is_file()
    ckpt = load_checkpoint_file(str(work / "iter_6_adapter.pth"))
    state = ckpt[ADAPTER_TENSORS_KEY]
    assert "backbone.stem.weight" not in state and "backbone.fc.weight" not in state
    assert {"head.weight", "backbone.norm.running_mean"} <= set(state)
    assert any(".adapter." in k for k in state)
    assert isinstance(ckpt["state_dict"], str)  # not loadable as a full checkpoint
    record = ckpt["meta"]["mm_spectral"]
    assert record["kind"] == "adapter-only" and ckpt["meta"]["iter"] == 6
    assert record["backbones"]["backbone"]["adapted"] == ADAPTED
    assert record["backbones"]["backbone"]["adapter"]["alpha"] == 4
    assert set(record["base_fingerprint"]) == {"backbone.stem.weight", "backbone.stem.bias",
        "backbone.norm.weight", "backbone.norm.bias", "backbone.blocks.0.weight",
        "backbone.blocks.0.bias", "backbone.blocks.1.weight", "backbone.blocks.1.bias",
        "backbone.fc.weight", "backbone.fc.bias"}  # fmt: skip
    assert {"message_hub", "optimizer", "rng_state"} <= set(ckpt)
    full = load_checkpoint_file(str(work / "iter_6.pth"))
    assert full["meta"]["mm_spectral"]["kind"] == "full"
    assert full["meta"]["mm_spectral"]["backbones"] == record["backbones"]
    for key, value in state.items():
        torch.testing.assert_close(value, full["state_dict"][key], rtol=0, atol=0)
    (log,) = work.glob("*/*.log")
    text = log.read_text()
    assert f"{2 * len(ADAPTED)} adapter tensors are not in the checkpoint" in text
    assert "missing keys" not in text


def test_delta_stats_reach_message_hub_and_scalars_json(trained, tmp_path):
    hub = trained.runner.message_hub
    for key in ("train/delta_norm", "train/delta_amplification"):
        value = hub.get_scalar(key).current()
        assert math.isfinite(value) and value > 0
    plot = load_tool("analysis/plot_delta_stats")
    series = plot.read_scalars(plot.find_scalars(str(trained.work)))
    assert [step for step, _ in series["delta_norm"]][:2] == [2, 3]
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "delta.png")
    plot.main([str(trained.work), "--out", out])
    assert Path(out).stat().st_size > 1000


def test_resume_from_runner_checkpoint_reproduces_the_run(trained, tmp_path):
    argv = [
        trained.config,
        "--work-dir",
        str(tmp_path),
        "--resume",
        str(trained.work / "iter_3.pth"),
    ]
    runner = load_tool("train").main([*argv, "--cfg-options", unique_name()])
    assert runner.iter == 6
    resumed = mm_spectral.adapter_state_dict(runner.model)
    original = load_checkpoint_file(str(trained.work / "iter_6.pth"))["state_dict"]
    for key, value in resumed.items():
        torch.testing.assert_close(value, original[key])
    assert not (tmp_path / "iter_3_adapter.pth").exists()  # not re-written after the resume


def test_runner_with_compiled_backbone_trains_to_the_eager_weights(trained, tmp_path):
    """``compile`` through tools/train.py: the traced ops (aot_eager: the same kernels, no
    code generation) give the eager run's weights, and checkpoints keep the plain keys."""
    config = write_config(tmp_path, "toy_compiled.py", replace={
        "adapter=dict(type='LoRA'": "compile=dict(backend='aot_eager', fullgraph=True),\n"
                                    "        adapter=dict(type='LoRA'"})  # fmt: skip
    torch._dynamo.reset()
    work = tmp_path / "work"
    argv = [str(config), "--work-dir", str(work), "--cfg-options", unique_name()]
    runner = load_tool("train").main(argv)
    assert runner.model.backbone._compiled_call_impl is not None
    compiled = load_checkpoint_file(str(work / "iter_6.pth"))["state_dict"]
    eager = load_checkpoint_file(str(trained.work / "iter_6.pth"))["state_dict"]
    assert compiled.keys() == eager.keys()
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, msg=key)


def build_plain_and_adapted(trained, plain_cfg):
    plain = MODELS.build(plain_cfg.model).eval()
    adapted = MODELS.build(Config.fromfile(trained.config).model).eval()
    adapted.load_state_dict(load_checkpoint_file(str(trained.work / "iter_6.pth"))["state_dict"])
    return plain, adapted


@pytest.mark.parametrize("which", ["iter_6.pth", "iter_6_adapter.pth"])
def test_merge_checkpoint_loads_strictly_into_plain_model(trained, which):
    cfg = Config.fromfile(trained.config)
    state, plain_cfg = merge_checkpoint(cfg, str(trained.work / which))
    assert plain_cfg.model.backbone.type == "GlueToyBackbone"
    assert list(plain_cfg.custom_hooks) == []
    plain, adapted = build_plain_and_adapted(trained, plain_cfg)
    plain.load_state_dict(state, strict=True)
    x = torch.randn(4, 3, 8, 8)
    assert mm_spectral.adapter_state_dict(adapted)  # ΔW ≠ 0 after training
    assert delta_stats(adapted)["delta_norm"] > 0
    torch.testing.assert_close(plain(x), adapted(x), rtol=1e-5, atol=1e-5)


def test_hook_merged_checkpoint_equals_merge_checkpoint(trained):
    merged = load_checkpoint_file(str(trained.work / "merged.pth"))["state_dict"]
    state, _ = merge_checkpoint(Config.fromfile(trained.config), str(trained.work / "iter_6.pth"))
    assert set(merged) == set(state)
    for key in state:
        torch.testing.assert_close(merged[key], state[key], rtol=1e-6, atol=1e-6)
    assert (trained.work / "merged_config.py").is_file()


def test_adapter_checkpoint_round_trip_and_merged_state_dict():
    model = toy_model(trainable=[r"norm\..*"])
    randomize_adapters(model)
    ckpt = adapter_checkpoint(model, dict(note="x"))
    other = toy_model(trainable=[r"norm\..*"])
    meta = load_adapter_checkpoint(other, ckpt)
    assert meta["note"] == "x"
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(other.eval()(x), model.eval()(x))
    state = merged_state_dict(model)
    assert not any(".adapter." in k for k in state)
    mm_spectral.remove_adapters(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(state[key], value)
    tensors = dict(ckpt[ADAPTER_TENSORS_KEY], nonsense=torch.zeros(1))
    with pytest.raises(ValueError, match="nonsense"):
        load_adapter_checkpoint(other, {**ckpt, ADAPTER_TENSORS_KEY: tensors})


def test_plain_config_strips_nested_adapted_backbones():
    cfg = Config(
        dict(
            model=dict(
                type="EncoderDecoder",
                backbone=dict(backbone_cfg(), adapter=LORA),
                extra=[dict(type="Wrapper", inner=backbone_cfg())],
            ),
            custom_hooks=[dict(type="AdapterHook"), dict(type="EMAHook")],
        )
    )
    plain = plain_config(cfg)
    assert plain.model.backbone == dict(type="GlueToyBackbone")
    assert plain.model.extra[0].inner == dict(type="GlueToyBackbone")
    assert [h.type for h in plain.custom_hooks] == ["EMAHook"]
    assert cfg.model.backbone.type == "AdaptedBackbone"  # the original is untouched


# ---------------------------------------------------------------- the other tools
def test_merge_tool_output_runs_in_the_plain_config(trained, tmp_path, capsys):
    ckpt_path, cfg_path = load_tool("merge_adapters").main(
        [trained.config, str(trained.work / "iter_6_adapter.pth"), "--out-dir", str(tmp_path)]
    )
    assert osp.basename(cfg_path) == "toy_lora_merged.py"
    assert "tools/test.py" in capsys.readouterr().out
    plain_cfg = Config.fromfile(cfg_path)
    plain, adapted = build_plain_and_adapted(trained, plain_cfg)
    saved = torch.load(ckpt_path, weights_only=False)
    assert saved["meta"]["iter"] == 6
    plain.load_state_dict(saved["state_dict"], strict=True)
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(plain(x), adapted(x), rtol=1e-5, atol=1e-5)


def test_test_tool_full_and_adapter_only_checkpoints_agree(trained, tmp_path):
    test = load_tool("test")
    metrics = []
    for name in ("iter_6.pth", "iter_6_adapter.pth"):
        argv = [trained.config, str(trained.work / name), "--work-dir", str(tmp_path / name)]
        metrics.append(test.main([*argv, "--cfg-options", unique_name()]))
    assert metrics[0] == metrics[1] and 0 <= metrics[0]["acc"] <= 1


def test_count_params_tool(trained, capsys):
    rows = load_tool("count_params").main([trained.config, "--markdown"])
    model = toy_model()
    assert rows[0]["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert rows[0]["total"] == sum(p.numel() for p in model.parameters())
    out = capsys.readouterr().out
    assert "total trainable" in out and "| `toy_lora.py` |" in out


def test_train_and_test_command_lines(trained, monkeypatch):
    train, test = load_tool("train"), load_tool("test")
    for flag in ("--local_rank", "--local-rank"):
        monkeypatch.delenv("LOCAL_RANK", raising=False)
        args = train.parse_args([trained.config, flag, "3", "--amp", "--resume"])
        assert args.local_rank == 3
        assert os.environ["LOCAL_RANK"] == "3"
    cfg = train.build_cfg(args)
    assert cfg.optim_wrapper.type == "AmpOptimWrapper" and cfg.optim_wrapper.loss_scale == "dynamic"
    assert cfg.resume is True and cfg.load_from is None
    assert cfg.work_dir.endswith("toy_lora")
    cfg = train.build_cfg(
        train.parse_args([trained.config, "--resume", "x.pth", "--work-dir", "w"])
    )
    assert (cfg.resume, cfg.load_from, cfg.work_dir) == (True, "x.pth", "w")
    args = test.parse_args([trained.config, "--checkpoint", "c.pth", "--out", "r.pkl"])
    cfg = test.build_cfg(args)
    assert (cfg.load_from, cfg.resume) == ("c.pth", False)
    assert [e["type"] for e in cfg.test_evaluator] == ["GlueToyAccuracy", "DumpResults"]
