"""inject / merge / report / remove on multi-layer models, and every bad input's error."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mm_spectral


class TinyNet(nn.Module):
    """Stem, depthwise block with norm, MLP: the layer kinds of a ConvNeXt stage."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.dwconv = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.dwconv(self.stem(x)).permute(0, 2, 3, 1)
        x = self.fc2(torch.relu(self.fc1(self.norm(x))))
        return self.head(x.mean((1, 2)))


def test_inject_returns_names_and_freezes_the_rest():
    model = TinyNet()
    names = mm_spectral.inject(
        model, dict(type="FLoRA", targets=[r"fc\d", "stem|dwconv"], rank=2, trainable=[r"norm\..*"])
    )
    assert names == ["fc1", "fc2", "stem", "dwconv"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".adapter." in n} | {"norm.weight", "norm.bias"}
    assert "head.weight" not in trainable and "fc1.weight" not in trainable
    assert not hasattr(model.head, "adapter")


def test_trainable_report_counts():
    model = TinyNet()
    mm_spectral.inject(
        model, dict(type="LoRA", targets=["fc1", "fc2"], rank=2, trainable=[r"norm\.weight"])
    )
    report = mm_spectral.trainable_report(model)
    lora = (2 * 8 + 16 * 2) + (2 * 16 + 8 * 2)
    assert "LoRA" in report and "Linear" in report
    assert f"{lora:,}" in report
    total = sum(p.numel() for p in model.parameters())
    assert f"{lora + 8:,} of {total:,}" in report


def test_merge_whole_model_and_remove_adapters():
    torch.manual_seed(0)
    model = TinyNet()
    plain = copy.deepcopy(model)
    mm_spectral.inject(model, dict(type="FoRA", targets=[".*"], rank=3, n=20))
    for _, layer in mm_spectral.adapted_layers(model):
        nn.init.normal_(layer.adapter.b_coefficients, std=0.5)
    x = torch.randn(2, 3, 16, 16)
    adapted_out = model(x)
    mm_spectral.remove_adapters(model)
    assert type(model.fc1) is nn.Linear and type(model.stem) is nn.Conv2d
    assert set(model.state_dict()) == set(plain.state_dict())
    torch.testing.assert_close(model(x), adapted_out, rtol=1e-4, atol=1e-5)
    plain.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(plain(x), adapted_out, rtol=1e-4, atol=1e-5)


def test_pickle_round_trip_of_an_adapted_model():
    import io

    torch.manual_seed(0)
    model = TinyNet()
    mm_spectral.inject(model, dict(type="FoRA", targets=["fc1", "stem"], rank=2, n=10))
    nn.init.normal_(model.fc1.adapter.b_coefficients)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    x = torch.randn(1, 3, 8, 8)
    assert type(restored.fc1).__name__ == "AdaptedLinear"
    torch.testing.assert_close(restored(x), model(x))


def test_deepcopy_of_an_adapted_model():
    model = TinyNet()
    mm_spectral.inject(model, dict(type="FourierFT", targets=["fc1"], n=10))
    clone = copy.deepcopy(model)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(clone(x), model(x))


# ----------------------------------------------------------------------------- bad input


def expect_untouched(model: nn.Module, cfg: dict, match: str) -> None:
    before = copy.deepcopy(model.state_dict())
    classes = {n: type(m) for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises((ValueError, TypeError), match=match):
        mm_spectral.inject(model, cfg)
    assert {n: type(m) for n, m in model.named_modules()} == classes, "half-applied"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pattern_matching_no_layer_names_what_it_matched():
    model = TinyNet()
    with pytest.raises(ValueError, match=r"'norm'.*matched only 'norm' \(LayerNorm\)"):
        mm_spectral.inject(model, dict(type="LoRA", targets=["fc1", "norm"]))
    with pytest.raises(ValueError, match="'blocks.*' matches no .* no module at all"):
        mm_spectral.inject(model, dict(type="LoRA", targets=["blocks.*"]))
    expect_untouched(model, dict(type="LoRA", targets=["fc1", "norm"]), "norm")


@pytest.mark.parametrize(
    "cfg,match",
    [
        (dict(type="LoRA", rank=0), r"LoRA on layer 'fc1': rank must be > 0, got 0"),
        (dict(type="FLoRA", rank=-1), "rank must be > 0, got -1"),
        (dict(type="FLoRA", rank=2, kernel_rank=0), "kernel_rank must be > 0"),
        (dict(type="FourierFT", n=0), "n must be > 0"),
        (dict(type="FourierFT", n=10_000), r"'fc1': n=10000 exceeds the 16x8 weight's 128"),
        (dict(type="FourierFT", n=5, init="uniform"), "init must be one of"),
        (dict(type="FoRA", rank=2, n=-3), "n must be > 0"),
        (
            dict(type="VeRA", rank=2),
            r"unknown adapter type 'VeRA'; known types: \['BitFit', 'DoRA', ",
        ),
        (dict(type="LoRA", rnak=2), "LoRA on layer 'fc1'.*rnak"),
        (dict(type="DoRA", rank=0), r"DoRA on layer 'fc1': rank must be > 0, got 0"),
        (dict(type="DoRA", conv_factors="flat"), r"DoRA on layer 'fc1': conv_factors must be one"),
        (dict(type="BitFit", rank=2), "BitFit on layer 'fc1'.*rank"),
        (
            dict(type="LoRA", row_blocks=dict(split=3, use=(0,))),
            r"does not fit 2 layers:\n  row_blocks on layer 'fc1': split=3 must be a positive "
            r"divisor of 16 rows\n  row_blocks on layer 'stem': row blocks apply to nn.Linear",
        ),
        (dict(type="LoRA", trainable=["nothing"]), "trainable pattern 'nothing'"),
    ],
)
def test_bad_hyper_parameters_leave_the_model_untouched(cfg, match):
    model = TinyNet()
    expect_untouched(model, dict(cfg, targets=["fc1", "stem"]), match)


def test_inject_twice_into_one_layer():
    model = TinyNet()
    mm_spectral.inject(model, dict(type="LoRA", targets=["fc1"]))
    expect_untouched(model, dict(type="FLoRA", targets=["fc.*"]), r"already carry an adapter.*fc1")


def _spectral_pair(seed_a: int, seed_b: int, method: str = "FourierFT"):
    a, b = TinyNet(), TinyNet()
    extra = dict(n=12) if method == "FourierFT" else dict(rank=2, n=12)
    mm_spectral.inject(a, dict(type=method, targets=["fc1", "fc2"], seed=seed_a, **extra))
    mm_spectral.inject(b, dict(type=method, targets=["fc1", "fc2"], seed=seed_b, **extra))
    return a, b


def test_loading_state_with_other_entries_fails_and_loads_nothing():
    a, b = _spectral_pair(1, 2)
    before = copy.deepcopy(b.state_dict())
    with pytest.raises(ValueError, match=r"'fc1': spectral entries indices differ"):
        mm_spectral.load_adapter_state_dict(b, mm_spectral.adapter_state_dict(a))
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())
    a, b = _spectral_pair(1, 2, method="FoRA")
    with pytest.raises(ValueError, match="a_indices differ"):
        mm_spectral.load_adapter_state_dict(b, mm_spectral.adapter_state_dict(a))


def test_loading_state_of_another_method_or_shape_fails():
    lora, flora, wide = TinyNet(), TinyNet(), TinyNet()
    mm_spectral.inject(lora, dict(type="LoRA", targets=["fc1"], rank=2))
    mm_spectral.inject(flora, dict(type="FLoRA", targets=["fc1"], rank=2))
    mm_spectral.inject(wide, dict(type="LoRA", targets=["fc1"], rank=4))
    with pytest.raises(ValueError, match=r"'fc1'.*model's FLoRA adapter.*another method"):
        mm_spectral.load_adapter_state_dict(flora, mm_spectral.adapter_state_dict(lora))
    with pytest.raises(
        ValueError, match=r"'fc1': lora_A has shape \(4, 8\), the model's is \(2, 8\)"
    ):
        mm_spectral.load_adapter_state_dict(lora, mm_spectral.adapter_state_dict(wide))
    extra = dict(mm_spectral.adapter_state_dict(lora))
    extra["fc2.adapter.lora_A"] = torch.zeros(2, 16)
    with pytest.raises(ValueError, match="'fc2': the model has no adapter there"):
        mm_spectral.load_adapter_state_dict(lora, extra)


def test_non_finite_delta_merges_nothing():
    model = TinyNet()
    mm_spectral.inject(model, dict(type="LoRA", targets=["fc1", "fc2"], rank=2))
    with torch.no_grad():
        model.fc1.adapter.lora_B.fill_(1.0)
        model.fc2.adapter.lora_B.fill_(float("nan"))
    w1 = model.fc1.weight.detach().clone()
    with pytest.raises(ValueError, match=r"not finite in \['fc2'\]; nothing was merged"):
        mm_spectral.merge(model)
    assert torch.equal(model.fc1.weight, w1) and not model.fc1.merged
