"""Backbones: shapes/strides, timm names, position-embedding resampling, checkpointing, converters
on synthetic state dicts with the real key layouts, registration, and adapter injection."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import pickle
import re
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from mmengine.registry import MODELS
from timm.layers import resample_abs_pos_embed
from torch import nn

import mm_spectral
from mm_spectral.openmmlab.backbones import ConvNeXtV2, InternViT6B, InternViT300M, TimmViT
from mm_spectral.openmmlab.backbones.internvit6b import resample_position_embedding
from tools.convert import converters

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = dict(
    arch="vit_tiny_patch16_224",
    img_size=64,
    depth=4,
    embed_dim=48,
    num_heads=3,
    out_indices=(0, 1, 2, 3),
)
TINY_INTERN = dict(embed_dim=48, depth=4, num_heads=3, out_indices=(0, 1, 2, 3), img_size=56)
TINY_300M = dict(img_size=56, depth=4, embed_dim=48, num_heads=3, out_indices=(0, 1, 2, 3))


def tool(name: str):
    """Import a script from tools/convert/ (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "convert" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def channel_layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], eps=eps).permute(0, 3, 1, 2)


def assert_feature_maps(outs, channels, size, strides):
    assert len(outs) == len(channels) == len(strides)
    for out, c, s in zip(outs, channels, strides):
        assert out.shape == (2, c, round(size[0] / s), round(size[1] / s)), (out.shape, c, s)
        assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- shapes and names


def test_convnext_shapes_strides_channels():
    torch.manual_seed(0)
    model = ConvNeXtV2(arch="atto").eval()
    assert model.out_channels == [40, 80, 160, 320]
    with torch.no_grad():
        assert_feature_maps(
            model(torch.randn(2, 3, 64, 96)), model.out_channels, (64, 96), (4, 8, 16, 32)
        )
    partial = ConvNeXtV2(arch="atto", out_indices=(2, 1))
    assert partial.out_channels == [80, 160] and len(partial.stages) == 3
    assert sorted(partial.out_norms) == ["1", "2"]
    with torch.device("meta"):
        assert ConvNeXtV2(arch="large").out_channels == [192, 384, 768, 1536]
    with pytest.raises(ValueError, match="unknown arch"):
        ConvNeXtV2(arch="gigantic")


def test_convnext_keeps_timm_names_and_matches_timm_features():
    torch.manual_seed(0)
    reference = timm.create_model("convnextv2_atto", pretrained=False).eval()
    model = ConvNeXtV2(arch="atto").eval()
    result = model.load_state_dict(reference.state_dict(), strict=False)
    assert sorted(result.missing_keys) == sorted(
        f"out_norms.{i}.{p}" for i in range(4) for p in ("weight", "bias")
    )
    assert result.unexpected_keys and all(k.startswith("head.") for k in result.unexpected_keys)
    for name in (
        "stem.0.weight",
        "stages.2.blocks.5.conv_dw.weight",
        "stages.1.downsample.1.weight",
    ):
        assert name in dict(model.named_parameters())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model(x)
        theirs = reference.forward_intermediates(x, indices=4, intermediates_only=True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, channel_layer_norm(b), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("wrap", ["raw", "detector"])
def test_convnext_pretrained_init_cfg(tmp_path, wrap):
    torch.manual_seed(0)
    source = timm.create_model("convnextv2_atto", pretrained=False).state_dict()
    path = tmp_path / "ckpt.pth"
    if wrap == "raw":
        torch.save(source, path)
        init_cfg = dict(type="Pretrained", checkpoint=str(path))
    else:
        torch.save({"state_dict": {f"backbone.{k}": v for k, v in source.items()}}, path)
        init_cfg = dict(type="Pretrained", checkpoint=str(path), prefix="backbone.")
    model = ConvNeXtV2(arch="atto", init_cfg=init_cfg)
    model.init_weights()
    for name, value in model.state_dict().items():
        if not name.startswith("out_norms."):
            torch.testing.assert_close(value, source[name], rtol=0, atol=0, msg=name)


def test_vit_shapes_names_and_timm_features_at_two_sizes():
    torch.manual_seed(0)
    model = TimmViT(**TINY_VIT).eval()
    assert model.out_channels == [48] * 4
    kwargs = {k: v for k, v in TINY_VIT.items() if k not in ("arch", "out_indices")}
    reference = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs
    ).eval()
    result = model.load_state_dict(reference.state_dict(), strict=False)
    assert result.missing_keys and all(k.startswith("pyramid.") for k in result.missing_keys)
    assert set(result.unexpected_keys) <= {"norm.weight", "norm.bias"}
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "pos_embed", "cls_token"):
        assert name in dict(model.named_parameters())
    for size in ((64, 64), (64, 96)):  # the stored grid, then a different one (resampled)
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            outs = model(x)
            theirs = reference.forward_intermediates(x, indices=[2], intermediates_only=True)
        assert_feature_maps(outs, model.out_channels, size, (4, 8, 16, 32))
        torch.testing.assert_close(outs[2], theirs[0], atol=1e-5, rtol=1e-4)


def test_internvit300m_through_timm():
    assert "vit_intern300m_patch14_448" in timm.list_models("*intern*")
    torch.manual_seed(0)
    model = InternViT300M(**TINY_300M).eval()
    assert model.arch == "vit_intern300m_patch14_448" and model.patch_size == (14, 14)
    assert "blocks.0.ls1.gamma" in dict(model.named_parameters())
    with torch.no_grad():  # patch 14: strides 3.5, 7, 14, 28
        assert_feature_maps(model(torch.randn(2, 3, 56, 84)), [48] * 4, (56, 84), (3.5, 7, 14, 28))
    with torch.device("meta"):
        full = InternViT300M()
    backbone = sum(p.numel() for n, p in full.named_parameters() if not n.startswith("pyramid."))
    assert 0.29e9 < backbone < 0.31e9 and full.out_channels == [1024] * 4


def test_internvit6b_tiny_shapes_and_release_names():
    torch.manual_seed(0)
    model = InternViT6B(**TINY_INTERN).eval()
    assert model.out_channels == [48] * 4
    with torch.no_grad():
        assert_feature_maps(model(torch.randn(2, 3, 56, 84)), [48] * 4, (56, 84), (3.5, 7, 14, 28))
    params = dict(model.named_parameters())
    assert params["embeddings.class_embedding"].shape == (1, 1, 48)
    assert params["embeddings.position_embedding"].shape == (1, 1 + 16, 48)
    assert params["encoder.layers.3.ls1"].shape == (48,)
    assert params["encoder.layers.0.attn.q_norm.weight"].shape == (48,)  # full width, not per head
    assert "encoder.layers.0.attn.qkv.bias" not in params
    assert (
        "embeddings.patch_embedding.bias" in params and "encoder.layers.0.attn.proj.bias" in params
    )
    layer_keys = {n.split(".", 3)[3] for n in params if n.startswith("encoder.layers.0.")}
    assert layer_keys == set(internvit_layer_shapes(48, 4))


def test_internvit6b_full_size_parameter_count_without_allocating():
    with torch.device("meta"):
        model = InternViT6B()
    assert all(p.is_meta for p in model.parameters())
    backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("pyramid."))
    c, depth, grid = 3200, 48, 224 // 14
    per_layer = 3 * c * c + (c * c + c) + (4 * c * c + 4 * c) + (4 * c * c + c) + 6 * c
    embeddings = (3 * 14 * 14 * c + c) + c + (1 + grid * grid) * c
    assert backbone == depth * per_layer + embeddings == 5_902_793_600
    assert 5.85e9 < backbone < 5.95e9  # published: 5.9B
    assert model.out_channels == [3200] * 4


# ----------------------------------------------------------------------------- position embeddings


def test_internvit_position_embedding_resampling_matches_timm_bicubic():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 16, 8)
    assert resample_position_embedding(pos, 4, (4, 4)) is pos
    for size in ((6, 9), (3, 2)):
        ours = resample_position_embedding(pos, 4, size)
        theirs = resample_abs_pos_embed(
            pos,
            new_size=size,
            old_size=(4, 4),
            num_prefix_tokens=1,
            interpolation="bicubic",
            antialias=False,
        )
        torch.testing.assert_close(ours, theirs)


def internvl_position_embedding(pos: torch.Tensor, grid: int, size: tuple[int, int]):
    """InternVL's ``InternVisionEmbeddings._get_pos_embed`` written out: the class entry kept,
    the (grid x grid) patch entries resized by F.interpolate (bicubic, align_corners=False, no
    antialiasing) in float32."""
    patches = pos[:, 1:].float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=size, mode="bicubic", align_corners=False)
    patches = patches.reshape(1, pos.shape[-1], -1).permute(0, 2, 1).to(pos.dtype)
    return torch.cat([pos[:, :1], patches], dim=1)


@pytest.mark.parametrize("size", [(84, 84), (42, 70), (28, 28)])  # grids 6x6, 3x5, 2x2
def test_internvit300m_resamples_position_embeddings_as_internvl(size):
    """Tokens + position embeddings at inputs off the stored 4x4 grid equal InternVL's
    plain bicubic resampling, not timm's antialiased one (which differs measurably)."""
    torch.manual_seed(0)
    model = InternViT300M(**TINY_300M).eval()  # 56 px: a stored 4x4 grid
    with torch.no_grad():
        model.pos_embed.normal_()
        tokens = model.patch_embed(torch.randn(2, 3, *size))  # (B, H, W, C)
        ours = model._pos_embed(tokens)
    grid = (size[0] // 14, size[1] // 14)
    patches = tokens.reshape(2, -1, 48)
    with_class = torch.cat([model.cls_token.expand(2, -1, -1), patches], dim=1)
    reference = with_class + internvl_position_embedding(model.pos_embed, 4, grid)
    torch.testing.assert_close(ours, reference)
    antialiased = with_class + resample_abs_pos_embed(model.pos_embed, grid, (4, 4))
    assert (antialiased - reference).abs().max() > 1e-3
    assert TimmViT.pos_embed_antialias  # timm's own ViTs keep timm's resampling


@pytest.mark.parametrize("family", ["vit", "internvit300m", "internvit6b"])
def test_checkpoint_on_another_grid_is_resampled_at_load(family):
    """A model whose stored grid is smaller, loaded into one with a bigger grid, computes the same
    features at the bigger input: forward-time and load-time resampling agree."""
    torch.manual_seed(0)
    if family == "vit":
        small, big = TimmViT(**dict(TINY_VIT, img_size=32)), TimmViT(**TINY_VIT)
        key = "pos_embed"
    elif family == "internvit300m":
        small, big = InternViT300M(**dict(TINY_300M, img_size=28)), InternViT300M(**TINY_300M)
        key = "pos_embed"
    else:
        small, big = InternViT6B(**dict(TINY_INTERN, img_size=28)), InternViT6B(**TINY_INTERN)
        key = "embeddings.position_embedding"
    assert small.state_dict()[key].shape != big.state_dict()[key].shape
    big.load_state_dict(small.state_dict())
    x = torch.randn(2, 3, 64, 64) if family == "vit" else torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        for a, b in zip(small.eval()(x), big.eval()(x)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_internvit6b_refuses_checkpoints_that_would_load_partly(tmp_path):
    """A checkpoint with fewer encoder layers than the model builds (a 45-layer 448 px release
    in the 48-layer default), or on a finer position grid than the model stores, fails loudly
    instead of leaving layers random or throwing the release's grid away."""
    torch.manual_seed(0)
    release = InternViT6B(**dict(TINY_INTERN, depth=3, out_indices=(0, 1, 2, 2)))
    path = tmp_path / "release.pth"
    torch.save(release.state_dict(), path)
    init_cfg = dict(type="Pretrained", checkpoint=str(path))
    with pytest.raises(ValueError, match=r"3 encoder layers.*builds 4.*\[3\].*depth=45"):
        InternViT6B(**TINY_INTERN, init_cfg=init_cfg).init_weights()
    fitting = InternViT6B(**dict(TINY_INTERN, depth=3, out_indices=(0, 1, 2, 2)), init_cfg=init_cfg)
    fitting.init_weights()
    torch.testing.assert_close(fitting.state_dict(), release.state_dict(), rtol=0, atol=0)
    # adapter-only state dicts carry no base layer keys: not refused
    mm_spectral.inject(
        release, dict(type="LoRA", rank=2, targets=[r"encoder\.layers\.0\.mlp\.fc1"])
    )
    InternViT6B(**TINY_INTERN).load_state_dict(
        mm_spectral.adapter_state_dict(release), strict=False
    )

    finer = InternViT6B(**dict(TINY_INTERN, pretrain_size=112))  # an 8x8 grid
    with pytest.raises(ValueError, match=r"8x8 grid \(112 px.*stores 4x4: set pretrain_size=112"):
        InternViT6B(**TINY_INTERN).load_state_dict(finer.state_dict())


# ----------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("family", ["convnext", "vit", "internvit6b"])
def test_with_cp_same_outputs_and_grads(family, monkeypatch):
    build = {
        "convnext": lambda cp: ConvNeXtV2("atto", drop_path_rate=0.2, with_cp=cp),
        "vit": lambda cp: TimmViT(**TINY_VIT, drop_path_rate=0.2, with_cp=cp),
        "internvit6b": lambda cp: InternViT6B(**TINY_INTERN, drop_path_rate=0.2, with_cp=cp),
    }[family]
    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint  # what timm's checkpoint_seq calls
    monkeypatch.setattr(
        torch.utils.checkpoint,
        "checkpoint",
        lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k),
    )
    torch.manual_seed(0)
    plain = build(False).train()
    checkpointed = build(True).train()
    checkpointed.load_state_dict(plain.state_dict())
    size = {"convnext": 32, "vit": 64, "internvit6b": 56}[family]
    x = torch.randn(2, 3, size, size)
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # same drop-path draws in both runs
        outs = model(x)
        sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs).backward()
        results.append((outs, {n: p.grad for n, p in model.named_parameters()}))
    n_blocks = sum(
        1 for m in plain.modules() if type(m).__name__ in ("ConvNeXtBlock", "Block", "InternBlock")
    )
    assert len(calls) == n_blocks > 0  # the checkpointed model really checkpointed every block
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        assert grad is not None, name
        torch.testing.assert_close(grad, results[1][1][name], atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():  # eval / no-grad never checkpoints
        checkpointed.eval()(x)
    assert len(calls) == n_blocks


# ----------------------------------------------------------------------------- ConvNeXt-V2 converter


def official_convnextv2_layout(depths, dims, num_classes=1000):
    """(key, shape) of facebookresearch/ConvNeXt-V2's ``ConvNeXtV2`` state dict."""
    yield "downsample_layers.0.0.weight", (dims[0], 3, 4, 4)
    yield "downsample_layers.0.0.bias", (dims[0],)
    yield "downsample_layers.0.1.weight", (dims[0],)  # channels-first LayerNorm
    yield "downsample_layers.0.1.bias", (dims[0],)
    for i in range(1, 4):
        yield f"downsample_layers.{i}.0.weight", (dims[i - 1],)
        yield f"downsample_layers.{i}.0.bias", (dims[i - 1],)
        yield f"downsample_layers.{i}.1.weight", (dims[i], dims[i - 1], 2, 2)
        yield f"downsample_layers.{i}.1.bias", (dims[i],)
    for i, (depth, d) in enumerate(zip(depths, dims)):
        for j in range(depth):
            p = f"stages.{i}.{j}."
            yield p + "dwconv.weight", (d, 1, 7, 7)
            yield p + "dwconv.bias", (d,)
            yield p + "norm.weight", (d,)
            yield p + "norm.bias", (d,)
            yield p + "pwconv1.weight", (4 * d, d)
            yield p + "pwconv1.bias", (4 * d,)
            yield p + "grn.gamma", (1, 1, 1, 4 * d)
            yield p + "grn.beta", (1, 1, 1, 4 * d)
            yield p + "pwconv2.weight", (d, 4 * d)
            yield p + "pwconv2.bias", (d,)
    yield "norm.weight", (dims[-1],)
    yield "norm.bias", (dims[-1],)
    yield "head.weight", (num_classes, dims[-1])
    yield "head.bias", (num_classes,)


def official_convnextv2_features(sd, x):
    """Stage outputs of the official ConvNeXt-V2 forward, written from its definition."""

    def ln_first(t, prefix):
        return F.layer_norm(
            t.permute(0, 2, 3, 1), t.shape[1:2], sd[prefix + "weight"], sd[prefix + "bias"], 1e-6
        ).permute(0, 3, 1, 2)

    feats = []
    for i in range(4):
        if i == 0:
            x = F.conv2d(x, sd["downsample_layers.0.0.weight"], sd["downsample_layers.0.0.bias"], 4)
            x = ln_first(x, "downsample_layers.0.1.")
        else:
            x = ln_first(x, f"downsample_layers.{i}.0.")
            x = F.conv2d(
                x, sd[f"downsample_layers.{i}.1.weight"], sd[f"downsample_layers.{i}.1.bias"], 2
            )
        j = 0
        while f"stages.{i}.{j}.dwconv.weight" in sd:
            p = f"stages.{i}.{j}."
            y = F.conv2d(
                x, sd[p + "dwconv.weight"], sd[p + "dwconv.bias"], padding=3, groups=x.shape[1]
            )
            y = y.permute(0, 2, 3, 1)
            y = F.layer_norm(y, y.shape[-1:], sd[p + "norm.weight"], sd[p + "norm.bias"], 1e-6)
            y = F.gelu(F.linear(y, sd[p + "pwconv1.weight"], sd[p + "pwconv1.bias"]))
            gx = torch.norm(y, p=2, dim=(1, 2), keepdim=True)
            nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
            y = sd[p + "grn.gamma"] * (y * nx) + sd[p + "grn.beta"] + y
            y = F.linear(y, sd[p + "pwconv2.weight"], sd[p + "pwconv2.bias"])
            x = x + y.permute(0, 3, 1, 2)
            j += 1
        feats.append(x)
    return feats


def synthetic_official_atto():
    torch.manual_seed(0)
    layout = official_convnextv2_layout((2, 2, 6, 2), (40, 80, 160, 320))
    return {k: torch.randn(shape) * 0.1 for k, shape in layout}


def test_convnext_official_converter_loads_strictly_and_computes_the_official_forward():
    official = synthetic_official_atto()
    converted = converters.convnextv2_official_to_timm(
        {"model": official, "epoch": 7}, converters.convnextv2_timm_shapes("atto")
    )
    timm_keys = timm.create_model("convnextv2_atto", pretrained=False).state_dict().keys()
    assert set(converted) == set(timm_keys)
    assert converted["stages.0.blocks.1.mlp.grn.weight"].shape == (160,)
    assert converted["stages.0.blocks.1.mlp.fc1.weight"].shape == (160, 40, 1, 1)  # atto: 1x1 convs
    model = ConvNeXtV2(arch="atto").eval()
    result = model.load_state_dict(converted, strict=False)
    assert all(k.startswith("out_norms.") for k in result.missing_keys)
    assert sorted(result.unexpected_keys) == [
        "head.fc.bias",
        "head.fc.weight",
        "head.norm.bias",
        "head.norm.weight",
    ]
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        for ours, theirs in zip(model(x), official_convnextv2_features(official, x)):
            torch.testing.assert_close(ours, channel_layer_norm(theirs), atol=1e-4, rtol=1e-4)


def test_convnext_converter_refuses_unknown_and_sparse_keys():
    shapes = converters.convnextv2_timm_shapes("atto")
    with pytest.raises(KeyError, match="stages.0.0.gamma"):
        converters.convnextv2_official_to_timm({"stages.0.0.gamma": torch.ones(3)}, shapes)
    with pytest.raises(ValueError, match="FCMAE"):
        converters.convnextv2_official_to_timm(
            {"encoder.stages.0.0.dwconv.kernel": torch.ones(49, 3)}, shapes
        )


def test_convnext_converter_tool_end_to_end(tmp_path):
    src, dst = tmp_path / "official.pt", tmp_path / "timm.pth"
    torch.save({"model": synthetic_official_atto(), "epoch": 1}, src)
    tool("convnextv2_official_to_timm").main([str(src), str(dst), "--arch", "atto"])
    model = ConvNeXtV2(arch="atto", init_cfg=dict(type="Pretrained", checkpoint=str(dst)))
    model.init_weights()
    saved = torch.load(dst, weights_only=True)
    assert not any(k.startswith("head.") for k in saved)
    for name, value in saved.items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)


# ----------------------------------------------------------------------------- InternViT converter


def internvit_layer_shapes(c, ratio=4):
    """Per-layer (name, shape) of InternVL's ``InternVisionEncoderLayer`` (qkv_bias=False)."""
    return {
        "norm1.weight": (c,),
        "attn.qkv.weight": (3 * c, c),
        "attn.q_norm.weight": (c,),
        "attn.k_norm.weight": (c,),
        "attn.proj.weight": (c, c),
        "attn.proj.bias": (c,),
        "ls1": (c,),
        "ls2": (c,),
        "mlp.fc1.weight": (ratio * c, c),
        "mlp.fc1.bias": (ratio * c,),
        "mlp.fc2.weight": (c, ratio * c),
        "mlp.fc2.bias": (c,),
        "norm2.weight": (c,),
    }


def synthetic_internvit(c=48, depth=4, patch=14, grid=4, layout="hf"):
    """Random weights in the released ``InternVisionModel`` layout (or the original one)."""
    torch.manual_seed(0)
    shapes = {
        "embeddings.class_embedding": (1, 1, c),
        "embeddings.patch_embedding.weight": (c, 3, patch, patch),
        "embeddings.patch_embedding.bias": (c,),
        "embeddings.position_embedding": (1, 1 + grid * grid, c),
    }
    for i in range(depth):
        shapes.update({f"encoder.layers.{i}.{k}": s for k, s in internvit_layer_shapes(c).items()})
    sd = {k: torch.randn(s) * 0.1 for k, s in shapes.items()}
    for k in sd:
        if k.endswith(("norm1.weight", "norm2.weight", "_norm.weight")):
            sd[k] += 1.0
    if layout == "hf":
        return sd
    original = {
        "cls_token": "embeddings.class_embedding",
        "pos_embed": "embeddings.position_embedding",
        "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
        "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    }
    out = {new: sd[old] for new, old in original.items()}
    for k, v in sd.items():
        if m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", k):
            rest = m[2] + ".gamma" if m[2] in ("ls1", "ls2") else m[2]
            out[f"blocks.{m[1]}.{rest}"] = v
    return out


def reference_internvit_tokens(sd, x, heads):
    """Last-layer tokens computed from the released InternViT definition (naive attention)."""

    def rms(t, w):
        return w * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6))

    patches = (
        F.conv2d(
            x,
            sd["embeddings.patch_embedding.weight"],
            sd["embeddings.patch_embedding.bias"],
            stride=14,
        )
        .flatten(2)
        .transpose(1, 2)
    )
    t = torch.cat([sd["embeddings.class_embedding"].expand(x.shape[0], -1, -1), patches], 1)
    t = t + sd["embeddings.position_embedding"]
    i = 0
    while f"encoder.layers.{i}.ls1" in sd:
        p = f"encoder.layers.{i}."
        b, n, c = t.shape
        h = rms(t, sd[p + "norm1.weight"])
        qkv = F.linear(h, sd[p + "attn.qkv.weight"]).reshape(b, n, 3, heads, c // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q = rms(q.transpose(1, 2).flatten(-2), sd[p + "attn.q_norm.weight"])
        k = rms(k.transpose(1, 2).flatten(-2), sd[p + "attn.k_norm.weight"])
        q, k = (z.view(b, n, heads, -1).transpose(1, 2) for z in (q, k))
        attn = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        a = F.linear(
            (attn @ v).transpose(1, 2).reshape(b, n, c),
            sd[p + "attn.proj.weight"],
            sd[p + "attn.proj.bias"],
        )
        t = t + a * sd[p + "ls1"]
        h = rms(t, sd[p + "norm2.weight"])
        h = F.linear(
            F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
            sd[p + "mlp.fc2.weight"],
            sd[p + "mlp.fc2.bias"],
        )
        t = t + h * sd[p + "ls2"]
        i += 1
    return t


@pytest.mark.parametrize("layout", ["hf", "chat", "original"])
def test_internvit_converter_loads_strictly_and_computes_the_release_forward(layout):
    release = synthetic_internvit()
    if layout == "hf":
        checkpoint, extra = release, []
    elif layout == "chat":  # InternVL-Chat: vision tower under 'vision_model.', LLM and projector
        checkpoint = {f"vision_model.{k}": v for k, v in release.items()}
        extra = [
            "mlp1.0.weight",
            "mlp1.1.weight",
            "language_model.model.tok_embeddings.weight",
            "language_model.model.layers.0.attention.wqkv.weight",
        ]
        checkpoint.update({k: torch.zeros(2, 2) for k in extra})
    else:
        checkpoint = {"module": synthetic_internvit(layout="original")}
        checkpoint["module"]["clip_projector.norm.weight"] = torch.ones(3)
        extra = ["clip_projector.norm.weight"]
    converted, dropped = converters.internvit_to_mm(checkpoint)
    assert sorted(dropped) == sorted(extra)
    assert converted.keys() == release.keys()
    model = InternViT6B(**TINY_INTERN).eval()
    result = model.load_state_dict(converted, strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.startswith("pyramid.") for k in result.missing_keys)
    cfg = converters.infer_internvit_cfg(converted)
    assert cfg == dict(
        embed_dim=48, depth=4, mlp_ratio=4.0, patch_size=14, pretrain_size=56, qk_normalization=True
    )
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ours = model(x)[2]  # the identity level: layer 2's tokens as a map
        tokens = reference_internvit_tokens(
            {k: v for k, v in release.items() if not k.startswith("encoder.layers.3.")}, x, heads=3
        )
    torch.testing.assert_close(
        ours, tokens[:, 1:].transpose(1, 2).reshape(2, 48, 4, 4), atol=1e-5, rtol=1e-4
    )


def test_internvit_converter_tool_safetensors_to_pretrained_init(tmp_path):
    from safetensors.torch import save_file

    release = synthetic_internvit()
    checkpoint = {f"vision_model.{k}": v.to(torch.bfloat16) for k, v in release.items()}
    checkpoint["mlp1.0.weight"] = torch.zeros(2, 2)
    src, dst = tmp_path / "model.safetensors", tmp_path / "internvit.pth"
    save_file(checkpoint, str(src))
    tool("internvit6b_to_mm").main([str(src), str(dst), "--num-heads", "3", "--dtype", "float32"])
    model = InternViT6B(**TINY_INTERN, init_cfg=dict(type="Pretrained", checkpoint=str(dst)))
    model.init_weights()
    for name, value in release.items():
        expected = value.to(torch.bfloat16).float()
        torch.testing.assert_close(model.state_dict()[name], expected, rtol=0, atol=0, msg=name)


def test_loader_refuses_pickled_objects_unless_trusted(tmp_path):
    path = tmp_path / "with_args.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(pickle.UnpicklingError, match="trust"):
        converters.load_state_dict_file(path)
    loaded = converters.load_state_dict_file(path, trust_pickle=True)
    assert list(loaded) == ["w"]


def test_internvit_converter_errors():
    with pytest.raises(ValueError, match="no InternViT patch embedding"):
        converters.internvit_to_mm({"foo.weight": torch.ones(1)})
    two = {f"{p}.embeddings.patch_embedding.weight": torch.ones(1) for p in ("a", "b")}
    with pytest.raises(ValueError, match="several vision towers"):
        converters.internvit_to_mm(two)
    converted, dropped = converters.internvit_to_mm(two, prefix="b.")
    assert list(converted) == ["embeddings.patch_embedding.weight"] and dropped == [
        "a.embeddings.patch_embedding.weight"
    ]


# ----------------------------------------------------------------------------- registry, adapters


BUILD_CFGS = [
    dict(type="ConvNeXtV2", arch="atto"),
    dict(type="TimmViT", **TINY_VIT),
    dict(type="InternViT300M", **TINY_300M),
    dict(type="InternViT6B", **TINY_INTERN),
]


@pytest.mark.parametrize("cfg", BUILD_CFGS, ids=[c["type"] for c in BUILD_CFGS])
def test_registered_in_mmengine_root(cfg):
    model = MODELS.build(cfg)
    assert type(model).__name__ == cfg["type"]


@pytest.mark.parametrize("package", ["mmdet", "mmseg", "mmrotate"])
def test_buildable_from_openmmlab_child_registries(package):
    pytest.importorskip("mmcv.ops")
    registry = importlib.import_module(f"{pytest.importorskip(package).__name__}.registry").MODELS
    for cfg in BUILD_CFGS:
        assert cfg["type"] not in registry.module_dict, f"{package} has its own {cfg['type']}"
    assert type(registry.build(dict(type="ConvNeXtV2", arch="atto"))).__name__ == "ConvNeXtV2"


def test_flora_on_every_conv_and_linear_of_convnext():
    torch.manual_seed(0)
    model = ConvNeXtV2(arch="atto").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    names = mm_spectral.inject(
        model, dict(type="FLoRA", rank=2, kernel_rank=2, scale=1.0, targets=[r".*"])
    )
    assert sorted(names) == sorted(layers)
    assert any(n.endswith("conv_dw") for n in names)  # depthwise 7x7 convs included
    assert model.stages[1].blocks[0].conv_dw.groups == 80
    for name, param in model.named_parameters():
        assert param.requires_grad == (".adapter." in name), name
    with torch.no_grad():  # a zero-core adapter changes nothing; a non-zero one does
        for a, b in zip(model(x), before):
            torch.testing.assert_close(a, b)
        for _, layer in mm_spectral.adapted_layers(model):
            for p in layer.adapter.parameters():
                p.normal_(0, 0.05)
    outs = model.train()(x)
    assert [o.shape for o in outs] == [b.shape for b in before]
    assert not torch.allclose(outs[3], before[3])
    sum(o.sum() for o in outs).backward()
    assert model.stages[2].blocks[0].conv_dw.adapter.core.grad.abs().sum() > 0
