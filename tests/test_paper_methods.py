"""What DoRA, BitFit, loralib conv factors, row blocks and the rank warning add beyond the
shared matrix (tests/conftest.py): magnitude initialisation, bias-only merging, the FLoRA
paper's parameter budgets, q/v-only adapters on a fused qkv, one warning per inject."""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
from torch import nn

import mm_spectral

from adapter_references import reference_layer
from conftest import randomize_adapter


def explicit_channel_norm(weight: torch.Tensor) -> torch.Tensor:
    return torch.stack([row.double().pow(2).sum().sqrt() for row in weight]).float()


def one_layer(layer: nn.Module, cfg: dict) -> nn.Sequential:
    model = nn.Sequential()
    model.add_module("layer", layer)
    mm_spectral.inject(model, dict(cfg, targets=["layer"]))
    return model


# ----------------------------------------------------------------------------- DoRA


@pytest.mark.parametrize(
    "factory",
    [lambda: nn.Linear(12, 7), lambda: nn.Conv2d(4, 6, 3), lambda: nn.Conv2d(5, 5, 7, groups=5)],
    ids=["linear", "conv", "depthwise"],
)
def test_dora_magnitude_starts_at_the_channel_norm(factory):
    torch.manual_seed(0)
    model = one_layer(factory(), dict(type="DoRA", rank=2))
    layer = model.layer
    torch.testing.assert_close(
        layer.adapter.magnitude.detach(), explicit_channel_norm(layer.weight)
    )
    x = (
        torch.randn(2, 12)
        if isinstance(layer, nn.Linear)
        else torch.randn(2, layer.in_channels, 9, 9)
    )
    torch.testing.assert_close(model(x), type(layer).__mro__[2].forward(layer, x))


def test_dora_magnitude_follows_a_base_checkpoint_loaded_after_injection():
    """OpenMMLab loads pretrained weights after the adapters exist: m must be ‖W_pretrained‖_c."""
    torch.manual_seed(0)
    pretrained = nn.Sequential(nn.Linear(10, 6), nn.Conv2d(3, 4, 3))
    model = copy.deepcopy(pretrained)
    for module in model:
        nn.init.normal_(module.weight)  # the random init the backbone starts from
    mm_spectral.inject(model, dict(type="DoRA", rank=2, targets=["0", "1"]))
    model.load_state_dict(pretrained.state_dict(), strict=False)
    for module, source in zip(model, pretrained):
        torch.testing.assert_close(
            module.adapter.magnitude.detach(), explicit_channel_norm(source.weight)
        )
    x = torch.randn(2, 10)
    torch.testing.assert_close(model[0](x), pretrained[0](x))  # B = 0: W' = W0 exactly


def test_dora_magnitude_from_a_state_dict_is_kept():
    torch.manual_seed(0)
    trained = one_layer(nn.Linear(10, 6), dict(type="DoRA", rank=2))
    randomize_adapter(trained.layer.adapter)
    magnitude = trained.layer.adapter.magnitude.detach().clone()
    # A full checkpoint (base + adapter): the saved magnitude wins over the derived one.
    fresh = one_layer(nn.Linear(10, 6), dict(type="DoRA", rank=2))
    fresh.load_state_dict(trained.state_dict())
    torch.testing.assert_close(fresh.layer.adapter.magnitude.detach(), magnitude)
    # Adapter-only file first, base checkpoint afterwards: the trained magnitude stays.
    fresh = one_layer(nn.Linear(10, 6), dict(type="DoRA", rank=2))
    mm_spectral.load_adapter_state_dict(fresh, mm_spectral.adapter_state_dict(trained))
    fresh.load_state_dict(
        {k: v for k, v in trained.state_dict().items() if ".adapter." not in k}, strict=False
    )
    torch.testing.assert_close(fresh.layer.adapter.magnitude.detach(), magnitude)
    x = torch.randn(3, 10)
    torch.testing.assert_close(fresh(x), trained(x))


def test_dora_magnitude_after_guarded_init_weights(tmp_path):
    """AdaptedBackbone's guard: init_weights loading a pretrained checkpoint (or drawing
    new weights) leaves m = ‖W0‖_c of the weights it ends with; other adapter tensors
    are restored as before."""
    pytest.importorskip("mmengine")
    from mmengine.model import BaseModule

    from mm_spectral.openmmlab.init_guard import GuardedInitWeights

    class Toy(BaseModule):
        def __init__(self, init_cfg=None, redraw=False):
            super().__init__(init_cfg)
            self.fc, self.conv, self.redraw = nn.Linear(8, 5), nn.Conv2d(3, 4, 3), redraw

        def init_weights(self):
            super().init_weights()
            if self.redraw:
                with torch.no_grad():
                    for p in self.parameters():
                        p.normal_()

    torch.manual_seed(0)
    pretrained = Toy().state_dict()
    torch.save(pretrained, tmp_path / "pre.pth")
    for redraw in (False, True):
        init_cfg = None if redraw else dict(type="Pretrained", checkpoint=str(tmp_path / "pre.pth"))
        model = Toy(init_cfg=init_cfg, redraw=redraw)
        mm_spectral.inject(model, dict(type="DoRA", rank=2, targets=["fc", "conv"]))
        lora_b = model.fc.adapter.lora_B
        with torch.no_grad():
            lora_b.normal_()
        before = lora_b.detach().clone()
        model.init_weights = GuardedInitWeights(model)
        model.init_weights()
        if not redraw:
            torch.testing.assert_close(model.fc.weight.detach(), pretrained["fc.weight"])
        for layer in (model.fc, model.conv):
            torch.testing.assert_close(
                layer.adapter.magnitude.detach(), explicit_channel_norm(layer.weight)
            )
        assert torch.equal(model.fc.adapter.lora_B, before)


def test_dora_merge_round_trip_with_zero_magnitude_rows():
    torch.manual_seed(0)
    model = one_layer(nn.Conv2d(4, 6, 3, padding=1), dict(type="DoRA", rank=2))
    randomize_adapter(model.layer.adapter)
    with torch.no_grad():
        model.layer.adapter.magnitude[[1, 4]] = 0.0
    w0 = model.layer.weight.detach().clone()
    x = torch.randn(2, 4, 6, 6)
    out = model(x)
    mm_spectral.merge(model)
    assert model.layer.weight[[1, 4]].abs().max() == 0
    torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)
    mm_spectral.unmerge(model)
    torch.testing.assert_close(model.layer.weight.detach(), w0, rtol=0, atol=1e-5)


def test_dora_gradient_drops_only_the_norm_gradient():
    """Value: exact W'. Gradients of the one-node DoRA linear (3-D tokens, trainable base and
    bias; x, W0, b, A, B, m): those of W' with ‖W0 + ΔW‖_c detached (paper §4.3), in float64
    autograd. They differ from the full gradient, so the test tells the two apart."""
    torch.manual_seed(0)
    model = one_layer(nn.Linear(12, 8), dict(type="DoRA", rank=3, alpha=6))
    layer = model.layer
    randomize_adapter(layer.adapter)
    layer.weight.requires_grad_(True)
    layer.bias.requires_grad_(True)
    x = torch.randn(2, 5, 12, requires_grad=True)
    inputs = [x, layer.weight, layer.bias, *layer.adapter.parameters()]
    out = model(x)
    got = torch.autograd.grad(out.square().sum(), inputs)
    x64 = x.detach().double().requires_grad_(True)
    grads = {}
    for detach in (True, False):
        weight, bias = reference_layer(layer, detach_norm=detach)
        expected_out = torch.nn.functional.linear(x64, weight, bias)
        torch.testing.assert_close(out.double(), expected_out, rtol=1e-5, atol=1e-5)
        grads[detach] = torch.autograd.grad(expected_out.square().sum(), [x64, *inputs[1:]])
    for g, detached in zip(got, grads[True]):
        torch.testing.assert_close(g.double(), detached.double(), rtol=1e-4, atol=1e-4)
    assert any(not torch.allclose(d, f, rtol=1e-3) for d, f in zip(grads[True], grads[False]))


def test_dora_linear_node_under_bf16_autocast_matches_float32_to_bf16_tolerance():
    torch.manual_seed(0)
    model = one_layer(nn.Linear(32, 16), dict(type="DoRA", rank=4))
    randomize_adapter(model.layer.adapter)
    x = torch.randn(64, 32)
    params = list(model.layer.adapter.parameters())
    reference = torch.autograd.grad(model(x).square().sum(), params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    got = torch.autograd.grad(out.float().square().sum(), params)
    for g, r in zip(got, reference):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=5e-2, atol=5e-2 * r.abs().max().item())


# ----------------------------------------------------------------------------- BitFit


def test_bitfit_names_every_layer_without_a_bias():
    model = nn.Sequential(
        nn.Linear(4, 4, bias=False), nn.Linear(4, 4), nn.Conv2d(4, 4, 1, bias=False)
    )
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(
        ValueError, match=r"does not fit 2 layers(.|\n)*'0': the layer has no bias(.|\n)*'2'"
    ):
        mm_spectral.inject(model, dict(type="BitFit", targets=[r"\d"]))
    assert not any(mm_spectral.adapted_layers(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bitfit_trains_and_merges_only_bias_deltas():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Conv2d(5, 3, 1))
    plain = copy.deepcopy(model)
    mm_spectral.inject(model, dict(type="BitFit", targets=["0", "2"]))
    assert sorted(mm_spectral.adapter_state_dict(model)) == [
        "0.adapter.bias_delta",
        "2.adapter.bias_delta",
    ]
    assert mm_spectral.parameter_counts(model)["trainable"] == 5 + 3
    for layer in (model[0], model[2]):
        nn.init.normal_(layer.adapter.bias_delta)
    merged = mm_spectral.merged_state_dict(model)
    for key, value in plain.state_dict().items():
        if key.endswith("weight"):
            assert torch.equal(merged[key], value), key
    torch.testing.assert_close(merged["0.bias"], plain[0].bias + model[0].adapter.bias_delta)
    assert torch.equal(model[0].bias, plain[0].bias), "the base bias itself never changes"


# ----------------------------------------------------------------------------- loralib factors


@pytest.mark.parametrize(
    "factory,a_shape,b_shape",
    [
        (lambda: nn.Conv2d(6, 10, 3), (2 * 3, 6 * 3), (10 * 3, 2 * 3)),
        (lambda: nn.Conv2d(8, 8, 7, groups=8), (2 * 7, 8 * 7), (1 * 7, 2 * 7)),
        (lambda: nn.Conv2d(8, 12, 3, groups=4), (2 * 3, 8 * 3), (3 * 3, 2 * 3)),
        (lambda: nn.Conv2d(5, 7, 1), (2, 5), (7, 2)),
        (lambda: nn.Linear(9, 4), (2, 9), (4, 2)),
    ],
    ids=["conv3x3", "depthwise7x7", "grouped", "conv1x1", "linear"],
)
def test_loralib_factor_shapes(factory, a_shape, b_shape):
    """A: (r·k, in·k), B: (out/groups·k, r·k), ΔW = (B A).view(weight shape), as loralib."""
    model = one_layer(factory(), dict(type="LoRA", rank=2, conv_factors="loralib"))
    adapter = model.layer.adapter
    assert tuple(adapter.lora_A.shape) == a_shape and tuple(adapter.lora_B.shape) == b_shape
    randomize_adapter(adapter)
    view = (adapter.lora_B @ adapter.lora_A).view(model.layer.weight.shape) * adapter.scale
    torch.testing.assert_close(adapter.delta_weight(), view)
    # Factored exactly where loralib's factors are the matrix ones (linear, 1×1).
    assert adapter.factored == (a_shape == (2, math.prod(model.layer.weight.shape[1:])))


@pytest.mark.parametrize(
    "cfg,match",
    [
        (
            dict(conv_factors="tucker"),
            r"LoRA on layer 'layer': conv_factors must be one of .*'tucker'",
        ),
        (
            dict(type="DoRA", conv_factors="loralib"),
            r"DoRA on layer 'layer'.*square kernel, got 3x5",
        ),
    ],
)
def test_loralib_bad_inputs(cfg, match):
    with pytest.raises(ValueError, match=match):
        one_layer(nn.Conv2d(3, 4, (3, 5)), dict(dict(type="LoRA", rank=2), **cfg))


CONVNEXT_PAPER_TARGETS = [
    r"stem\.0",
    r"stages\.\d+\.downsample\.1",
    r"stages\.\d+\.blocks\.\d+\.(conv_dw|mlp\.fc1|mlp\.fc2)",
]


def timm_on_meta(name: str) -> nn.Module:
    """A timm model with meta tensors: real shapes, no memory, no weights."""
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False)


@pytest.fixture(scope="module")
def convnextv2_large_meta():
    return timm_on_meta("convnextv2_large")


def test_paper_lora_budgets_on_convnextv2_large(convnextv2_large_meta):
    """FLoRA paper Table 1: LoRA r = 8 / 16 / 32 over stem, downsampling convs, depthwise
    7×7 and both MLP linears is 12.94 / 25.89 / 51.78 M (loralib's ConvLoRA count)."""
    # Per r: stem 4·(3·4) + 4·(192·4); downsamples 4·(d_i + d_i+1); per block 49·d + 49
    # (depthwise) + 10·d (fc1 + fc2), over 36 blocks whose widths sum to 27,072.
    per_rank = 3120 + 4 * (576 + 1152 + 2304) + 59 * 27072 + 49 * 36
    for rank, paper in ((8, "12.94"), (16, "25.89"), (32, "51.78")):
        model = copy.deepcopy(convnextv2_large_meta)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # depthwise: r·k > k rows (the paper's counting)
            names = mm_spectral.inject(
                model,
                dict(
                    type="LoRA", rank=rank, conv_factors="loralib", targets=CONVNEXT_PAPER_TARGETS
                ),
            )
        assert len(names) == 1 + 3 + 36 * 3
        count = mm_spectral.parameter_counts(model)["adapter"]
        assert count == per_rank * rank
        assert f"{math.floor(count / 1e4) / 100:.2f}" == paper  # the paper truncates
    # DoRA adds one magnitude per output channel: 165,312 on these layers.
    model = copy.deepcopy(convnextv2_large_meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mm_spectral.inject(
            model, dict(type="DoRA", rank=8, conv_factors="loralib", targets=CONVNEXT_PAPER_TARGETS)
        )
    assert mm_spectral.parameter_counts(model)["adapter"] == per_rank * 8 + 165_312


# ----------------------------------------------------------------------------- row blocks


def test_row_blocks_adapt_only_their_rows():
    torch.manual_seed(0)
    for cfg in (
        dict(type="FourierFT", n=30, alpha=10.0),
        dict(type="LoRA", rank=2),
        dict(type="DoRA", rank=2),
    ):
        model = one_layer(nn.Linear(8, 12), dict(cfg, row_blocks=dict(split=3, use=(0, 2))))
        randomize_adapter(model.layer.adapter)
        delta = model.layer.delta_weight().detach()
        assert delta[4:8].abs().max() == 0, cfg["type"]
        assert delta[:4].abs().max() > 0 and delta[8:].abs().max() > 0, cfg["type"]
        assert sorted(model.layer.adapter.blocks) == ["0", "2"]
        x = torch.randn(5, 8)
        torch.testing.assert_close(
            model(x)[:, 4:8],
            nn.functional.linear(x, model.layer.weight[4:8], model.layer.bias[4:8]),
        )


def test_row_blocks_run_one_fused_op_for_additive_low_rank_methods():
    for method, low_rank in (("LoRA", True), ("FoRA", True), ("FLoRA", True), ("FourierFT", False)):
        cfg = dict(type=method, row_blocks=dict(split=3, use=(0, 2)))
        model = one_layer(
            nn.Linear(8, 12), dict(cfg, n=20) if "F" in method and method != "FLoRA" else cfg
        )
        assert model.layer.adapter.low_rank is low_rank, method


@pytest.fixture(scope="module")
def vit_large_meta():
    return timm_on_meta("vit_large_patch16_224")


def test_query_value_counts_of_the_fourierft_and_fora_papers(vit_large_meta):
    """ViT-L, q and v of every block's fused qkv (3·1024 rows): FourierFT n = 3000 gives
    24 × 2 × 3000 parameters; FoRA n = 8000 per factor, 24 × 2 × 2 × 8000."""
    qv = dict(targets=[r"blocks\.\d+\.attn\.qkv"], row_blocks=dict(split=3, use=(0, 2)))
    for cfg, expected in (
        (dict(type="FourierFT", n=3000, alpha=300.0), 24 * 2 * 3000),
        (dict(type="FoRA", n=8000, rank=16), 24 * 2 * 2 * 8000),
    ):
        model = copy.deepcopy(vit_large_meta)
        mm_spectral.inject(model, dict(cfg, **qv))
        assert mm_spectral.parameter_counts(model)["adapter"] == expected
        assert re.search(rf"{cfg['type']}\s+Linear\s+24\s", mm_spectral.trainable_report(model))


@pytest.mark.parametrize(
    "row_blocks,match",
    [
        (
            dict(split=5, use=(0,)),
            r"row_blocks on layer 'layer': split=5 must be a positive divisor of 12",
        ),
        (dict(split=3, use=(0, 3)), r"use=\(0, 3\) must name distinct blocks in 0..2"),
        (dict(split=3, use=(1, 1)), r"use=\(1, 1\) must name distinct"),
        (dict(split=3, use=()), r"use=\(\) must name"),
        (dict(split=3, rows=(0,)), r"expected dict\(split=S, use=\(i, ...\)\)"),
    ],
)
def test_row_blocks_bad_inputs(row_blocks, match):
    model = nn.Sequential()
    model.add_module("layer", nn.Linear(8, 12))
    with pytest.raises(ValueError, match=match):
        mm_spectral.inject(model, dict(type="LoRA", targets=["layer"], row_blocks=row_blocks))
    assert type(model.layer) is nn.Linear


def test_row_blocks_only_on_linears():
    model = nn.Sequential()
    model.add_module("layer", nn.Conv2d(3, 6, 3))
    with pytest.raises(
        ValueError, match=r"'layer': row blocks apply to nn.Linear, the layer is Conv2d 3x3"
    ):
        mm_spectral.inject(
            model, dict(type="LoRA", targets=["layer"], row_blocks=dict(split=3, use=(0,)))
        )


# ----------------------------------------------------------------------------- rank warning


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.dwconv = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)


def inject_and_record(cfg: dict) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mm_spectral.inject(Tiny(), cfg)
    return [w for w in caught if "larger than a mode" in str(w.message)]


def test_oversized_ranks_warn_once_per_inject_listing_layers_and_sizes():
    caught = inject_and_record(dict(type="LoRA", rank=1000, targets=["stem", "fc1", "fc2"]))
    assert len(caught) == 1
    text = str(caught[0].message)
    assert text.startswith("3 adapted layer(s)")
    assert (
        "'stem': LoRA rank 1000: B A is 8x1000 · 1000x48 (rank at most 8), 56,000 parameters for a weight of 384"
        in text
    )
    assert (
        "'fc1': LoRA rank 1000: B A is 16x1000 · 1000x8 (rank at most 8), 24,000 parameters for a weight of 128"
        in text
    )
    assert "'fc2'" in text
    caught = inject_and_record(dict(type="FLoRA", rank=12, targets=["fc1", "fc2", "dwconv"]))
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "'fc1', 'fc2': FLoRA core ranks clipped" not in text  # shapes differ: one line each
    assert (
        "'fc1': FLoRA core ranks clipped to the weight's modes (16, 8): 12 > 8 (core (12, 8))"
        in text
    )
    assert "'dwconv': FLoRA core ranks clipped to the weight's modes (8, 1, 7, 7): 12 > 8" in text
    caught = inject_and_record(dict(type="FoRA", rank=20, n=10_000, targets=["fc1"]))
    assert "FoRA rank 20 > min(16, 8); n=10000 clipped to the factors' sizes (160, 320)" in str(
        caught[0].message
    )


def test_fitting_ranks_do_not_warn():
    # FLoRA's depthwise in-mode of size 1 clips by design and is not reported; the stem's
    # 3 input channels are (rank 4 > 3 would be).
    assert not inject_and_record(
        dict(type="FLoRA", rank=3, targets=["stem", "dwconv", "fc1", "fc2"])
    )
    assert "'stem': FLoRA core ranks clipped to the weight's modes (8, 3, 4, 4): 4 > 3" in str(
        inject_and_record(dict(type="FLoRA", rank=4, targets=["stem", "fc1"]))[0].message
    )
    assert not inject_and_record(dict(type="LoRA", rank=4, targets=["stem", "fc1", "fc2"]))
    assert not inject_and_record(dict(type="DoRA", rank=4, targets=["stem", "dwconv"]))


@pytest.mark.parametrize(
    "cfg",
    [
        dict(type="DoRA", rank=2, conv_factors="loralib", targets=["stem", "dwconv", "fc1"]),
        dict(type="BitFit", targets=["stem", "dwconv", "fc1", "fc2"]),
        dict(type="DoRA", rank=2, targets=["fc1"], row_blocks=dict(split=2, use=(1,))),
    ],
    ids=["DoRA-loralib", "BitFit", "DoRA-rows"],
)
def test_merged_model_loads_into_the_plain_model(cfg):
    """remove_adapters / merged_state_dict give a plain model that runs like the adapted one."""
    torch.manual_seed(0)
    model = Tiny()
    plain = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mm_spectral.inject(model, cfg)
    for _, layer in mm_spectral.adapted_layers(model):
        randomize_adapter(layer.adapter)

    def run(net, x):
        x = net.dwconv(net.stem(x)).permute(0, 2, 3, 1)
        return net.fc2(torch.relu(net.fc1(x)))

    x = torch.randn(2, 3, 16, 16)
    adapted = run(model, x)
    plain.load_state_dict(mm_spectral.merged_state_dict(model), strict=True)
    torch.testing.assert_close(run(plain, x), adapted, rtol=1e-4, atol=1e-5)
    mm_spectral.remove_adapters(model)
    assert type(model.fc1) is nn.Linear and not hasattr(model.fc1, "merge_memo")
    torch.testing.assert_close(run(model, x), adapted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(12, 20), (6, 4, 3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_row_norms_without_forming_delta_equal_the_explicit_norms(shape, dtype):
    from mm_spectral.adapters.dora import low_rank_inverse_norms, low_rank_row_norms

    torch.manual_seed(0)
    weight = torch.randn(shape).to(dtype)
    fan_in = math.prod(shape[1:])
    down, up, scale = torch.randn(3, fan_in), torch.randn(shape[0], 3), 0.7
    explicit = (weight.double().reshape(shape[0], -1) + scale * up.double() @ down.double()).norm(
        dim=1
    )
    got = low_rank_row_norms(weight, down, up, scale)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), explicit, rtol=1e-5, atol=1e-5)
    inverse = low_rank_inverse_norms(weight, down, up, scale)
    torch.testing.assert_close(inverse.double(), 1 / explicit, rtol=1e-5, atol=1e-6)


def test_dora_row_norms_stay_float32_under_autocast():
    """Autocast would run the norms' GEMMs in bf16 (3 significant digits of ‖W0ᵢ‖²)."""
    from mm_spectral.adapters.dora import low_rank_inverse_norms

    torch.manual_seed(0)
    weight, down, up = torch.randn(16, 64), torch.randn(4, 64), torch.randn(16, 4)
    plain = low_rank_inverse_norms(weight, down, up, 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = low_rank_inverse_norms(weight, down, up, 0.5)
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain, rtol=1e-6, atol=0)


def test_outside_autocast_restores_autocast_after_a_result_and_after_an_error():
    from mm_spectral.adapters.functional import outside_autocast

    a = torch.randn(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert outside_autocast("cpu", torch.mm, a, a).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")
        with pytest.raises(RuntimeError):
            outside_autocast("cpu", torch.mm, a, torch.randn(3, 3))
        assert torch.is_autocast_enabled("cpu")
        assert torch.mm(a, a).dtype == torch.bfloat16


@pytest.mark.parametrize("scale", [1.0, 0.25, -3.0])
def test_scaled_mm_equals_the_scaled_product_with_its_gradients(scale):
    from mm_spectral.adapters.functional import scaled_mm

    torch.manual_seed(0)
    a = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    for _ in range(2):  # the second call reuses the cached zero
        got = scaled_mm(a, b.t().t(), scale)
        torch.testing.assert_close(got, scale * (a @ b))
    assert torch.autograd.gradcheck(lambda p, q: scaled_mm(p, q, scale), (a, b))


def test_flora_linear_factor_under_autocast_is_float32_and_scaled():
    """The weight-space factor s · core U₂ᵀ of a linear FLoRA stays float32 under autocast
    and equals the product computed outside it."""
    torch.manual_seed(0)
    model = one_layer(nn.Linear(12, 8), dict(type="FLoRA", rank=3, scale=4.0))
    adapter = model.layer.adapter
    randomize_adapter(adapter)
    plain_down, plain_up, plain_scale = adapter.low_rank_factors()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        down, up, scale = adapter.low_rank_factors()
    assert down.dtype == up.dtype == torch.float32 and scale == plain_scale == 1.0
    expected = 4.0 * adapter.core.detach() @ adapter.factors[1].detach().t()
    torch.testing.assert_close(down.detach(), expected)
    torch.testing.assert_close(down, plain_down)


def test_dora_inverse_norm_of_a_zero_row_is_finite():
    from mm_spectral.adapters.dora import low_rank_inverse_norms

    weight, down, up = torch.zeros(3, 4), torch.randn(2, 4), torch.zeros(3, 2)
    assert torch.isfinite(low_rank_inverse_norms(weight, down, up, 1.0)).all()


def test_dora_base_row_norms_are_computed_once_per_base_weight(monkeypatch):
    """‖W0ᵢ‖² of the frozen base is cached by storage and version: reused across steps,
    recomputed after every in-place write (a new base loaded, merge / unmerge), and the
    outputs always equal those of a freshly computed norm. (The factored forms use it; the
    dense form takes the norms of the summed weight it forms anyway.)"""
    from mm_spectral.adapters import dora
    from mm_spectral.kernels import OPTIONS

    monkeypatch.setattr(OPTIONS, "rank_term", "output")
    calls = []
    row_squares = dora.row_squares
    monkeypatch.setattr(dora, "row_squares", lambda w: calls.append(1) or row_squares(w))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 6))
    mm_spectral.inject(model, dict(type="DoRA", rank=2, targets=["0"]))
    layer = model[0]
    with torch.no_grad():
        layer.adapter.lora_B.normal_()
    x = torch.randn(4, 10)

    def fresh() -> torch.Tensor:  # the same forward with the cache dropped
        layer.adapter.__dict__.pop("_base_squares_cache", None)
        return model(x)

    first = model(x)
    model(x).sum().backward()
    assert len(calls) == 1
    torch.testing.assert_close(first, fresh(), rtol=0, atol=0)
    calls.clear()
    model.load_state_dict({"0.weight": torch.randn(6, 10)}, strict=False)  # a new base
    after_load = model(x)
    assert len(calls) == 1
    torch.testing.assert_close(after_load, fresh(), rtol=0, atol=0)
    mm_spectral.merge(model)
    mm_spectral.unmerge(model)
    calls.clear()
    torch.testing.assert_close(model(x), after_load, rtol=1e-6, atol=1e-6)
    assert len(calls) == 1  # unmerge wrote the weight: recomputed
    layer.weight.requires_grad_(True)  # a trainable base is never cached
    calls.clear()
    model(x), model(x)
    assert len(calls) == 2
