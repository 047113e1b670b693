"""The GPU benchmark scripts run end to end on the CPU in their tiny modes, and their tables
hold a row per variant with finite numbers: the scripts whose tables the README quotes
cannot rot unnoticed between GPU sessions."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ADAPTERS = ["LoRA r16", "DoRA r16", "FLoRA r16", "FourierFT n3000", "FoRA r64 n8000"]


def run_tool(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The cells of the markdown table under the first heading line containing ``heading``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("###") and heading in line)
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("###"):
            break
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[1:]  # without the header


def number(cell: str) -> float:
    return float(cell.rstrip("x").replace(",", ""))


def test_backbone_benchmark_tiny_run():
    out = run_tool(
        "tools/benchmark.py",
        *("--tiny", "--device", "cpu", "--only", "ViT"),
        *("--warmup", "1", "--iters", "2", "--amp-steps", "2"),
    )
    training = {row[1]: row for row in table_rows(out, "Training step")}
    assert set(training) == {"floor (frozen)", "full FT", *ADAPTERS}
    assert number(training["floor (frozen)"][4]) == pytest.approx(1.0)
    for row in training.values():
        assert number(row[3]) > 0 and math.isfinite(number(row[5]))
    assert number(training["floor (frozen)"][2]) == 0  # the floor trains nothing

    inference = {row[1]: row for row in table_rows(out, "Inference")}
    assert set(inference) == set(ADAPTERS)
    for row in inference.values():
        base_ms, merged_ms, rel_diff = number(row[2]), number(row[3]), number(row[8])
        assert base_ms > 0 and merged_ms > 0
        assert rel_diff < 1e-2  # merged vs unmerged outputs under bf16

    amp = table_rows(out, "AMP training")
    assert {row[1] for row in amp} == set(ADAPTERS)
    assert all(row[5] == "ok" for row in amp)
    for row in amp:  # every adapter tensor moved
        updated, total = row[4].split("/")
        assert int(updated) == int(total) > 0


def test_peers_benchmark_tiny_run():
    """Ours vs HF peft: same trainable counts (tools/peers.py refuses otherwise), a ratio."""
    pytest.importorskip("peft")
    out = run_tool(
        "tools/benchmark.py",
        *("--tiny", "--device", "cpu", "--only", "ViT", "--peers"),
        *("--skip-training", "--skip-inference", "--warmup", "1", "--iters", "1"),
    )
    rows = {row[1]: row for row in table_rows(out, "Ours vs HF peft")}
    assert set(rows) == {"LoRA r16", "FourierFT n300"}
    for row in rows.values():
        assert number(row[2]) > 0 and number(row[3]) > 0 and number(row[4]) > 0
        ours_ms, peft_ms, ratio = number(row[3]), number(row[4]), number(row[5])
        # the cells are rounded: ms to 0.05, the ratio to 0.005; allow exactly that much
        slack = 0.005 + (peft_ms / ours_ms) * (0.05 / peft_ms + 0.05 / ours_ms) * 1.01
        assert ratio == pytest.approx(peft_ms / ours_ms, abs=slack)


@pytest.mark.parametrize(
    "preset, only, expected",
    [
        ("maskrcnn", ["FLoRA", "DoRA"], ["DoRA r16 (loralib convs)", "FLoRA r16"]),
        ("vit-upernet", [], ["LoRA r16", "FourierFT n3000", "FoRA r64 n8000"]),
        ("internvit6b", [], ["InternViT-6B FLoRA r16 (bf16 frozen, with_cp)"]),
    ],
)
def test_model_benchmark_tiny_run(preset: str, only: list[str], expected: list[str]):
    flags = ["--only", *only] if only else []
    if preset == "maskrcnn":  # detection's varying input sizes, one batch each in turn
        flags += ["--shapes", "64x96", "96x64"]
    out = run_tool(
        "tools/benchmark_model.py",
        *("--preset", preset, "--tiny", "--device", "cpu"),
        *("--warmup", "1", "--iters", "1", "--batch", "2", "--size", "64", *flags),
    )
    rows = table_rows(out, "training step")
    if preset == "maskrcnn":
        assert "2× (64×96, 96×64)" in out
    assert [row[0] for row in rows] == expected
    for row in rows:
        assert number(row[1]) > 0  # trainable parameters
        assert number(row[2]) > 0  # step time


def test_benchmark_variants_store_frozen_weights_in_the_asked_dtype():
    """--frozen-dtype: floor and adapters hold frozen weights in bf16 (as AdaptedBackbone's
    frozen_dtype), full FT keeps float32 masters, and a bf16-autocast step runs."""
    import torch

    sys.path.insert(0, str(REPO))
    from tools import benchmark

    spec = next(s for s in benchmark.TINY if s.name == "ViT-tiny")
    base = benchmark.build(spec)
    full = benchmark.variant(base, spec, None, "cpu", "bfloat16")
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    base.requires_grad_(False)
    for cfg in (None, benchmark.TINY_ADAPTERS["DoRA r16"]):
        model = benchmark.variant(base, spec, cfg, "cpu", "bfloat16")
        assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert all(p.dtype == torch.float32 for p in trainable) and bool(trainable) == bool(cfg)
        x = torch.randn(1, 3, spec.size, spec.size, requires_grad=True)
        loss = benchmark.train_step_fn(model, x, torch.bfloat16)()
        assert math.isfinite(loss)


def test_interleaved_training_benchmark_tiny_run():
    """--interleave: every variant resident, timed in turns; the same table, ratios to the
    floor of the run; compile modes are refused (each resets dynamo's cache)."""
    out = run_tool(
        "tools/benchmark.py",
        *("--tiny", "--device", "cpu", "--only", "ViT", "--skip-inference", "--interleave"),
        *("--variants", "DoRA", "FourierFT", "--warmup", "1", "--iters", "2"),
        *(
            "--dtype",
            "float16",
            "--rank-term",
            "output",
            "weight",
            "--batched-spectra",
            "on",
            "off",
        ),
    )
    assert "### Training step, float16 autocast" in out  # loss-scaled fp16 steps
    training = {row[1]: row for row in table_rows(out, "Training step")}
    fourier = "FourierFT n3000"
    # one variant per rank-term form and way of building (DoRA batches grouped convs' ΔW)
    builds = ("batched", "per-layer spectra")
    forms = {f"DoRA r16 [{form}, {build}]" for form in ("output", "weight") for build in builds}
    forms |= {f"{fourier} [{build}]" for build in builds}
    assert set(training) == {"full FT", "floor (frozen)", *forms}
    assert number(training["floor (frozen)"][4]) == pytest.approx(1.0)
    assert all(number(training["floor (frozen)"][2]) == 0 < number(training[f][2]) for f in forms)
    refused = subprocess.run(
        [sys.executable, "tools/benchmark.py", "--interleave", "--mode", "compile-model"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert refused.returncode == 2 and "--interleave" in refused.stderr


def test_benchmark_runs_adapters_once_per_optimizer():
    """--optimizer fused flat: each adapter once with torch's fused AdamW, once with
    FlatAdamW; full FT keeps torch's."""
    out = run_tool(
        "tools/benchmark.py",
        *("--tiny", "--device", "cpu", "--only", "ViT", "--skip-inference", "--interleave"),
        *("--variants", "LoRA", "--warmup", "1", "--iters", "2", "--optimizer", "fused", "flat"),
    )
    assert "AdamW (adapters: FlatAdamW unless labelled)" in out
    training = {row[1] for row in table_rows(out, "Training step")}
    assert training == {
        "full FT",
        "floor (frozen)",
        "LoRA r16 [fused AdamW]",
        "LoRA r16 [flat AdamW]",
    }


def test_optimizer_benchmark_tiny_run():
    """benchmark_optimizer.py: one row per optimizer over the adapter's trainable tensors."""
    out = run_tool(
        "tools/benchmark_optimizer.py",
        *("--tiny", "--device", "cpu", "--only", "ViT", "--variants", "LoRA"),
        *("--warmup", "1", "--iters", "2"),
    )
    rows = table_rows(out, "One AdamW step")
    assert [row[3] for row in rows] == ["AdamW fused", "AdamW foreach", "FlatAdamW"]
    assert all(row[1] == "LoRA r16" and int(row[2]) > 0 for row in rows)
    assert all(number(row[4]) > 0 and number(row[6]) > 0 for row in rows)


def test_model_benchmark_interleaved_tiny_run():
    """benchmark_model.py --interleave: the models take turns; ratios to the run's floor."""
    out = run_tool(
        "tools/benchmark_model.py",
        *("--preset", "maskrcnn", "--tiny", "--device", "cpu", "--interleave"),
        *("--warmup", "1", "--iters", "2", "--batch", "1", "--size", "64"),
        *("--only", "floor", "DoRA", "--rank-term", "weight"),
    )
    assert "interleaved" in out
    rows = {row[0]: row for row in table_rows(out, "training step")}
    dora = "DoRA r16 (loralib convs) [weight]"  # low-rank variants: one per asked-for form
    assert list(rows) == ["floor (Base, frozen)", dora]
    assert number(rows["floor (Base, frozen)"][3]) == pytest.approx(1.0)
    assert number(rows[dora][1]) > number(rows["floor (Base, frozen)"][1])
    refused = subprocess.run(
        [sys.executable, "tools/benchmark_model.py", "--interleave", "--compile"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert refused.returncode == 2 and "--interleave" in refused.stderr


def test_dispatch_cost_benchmark_tiny_run():
    """Host µs per op and per adapted linear: a row per op and per variant, each a finite
    number; the frozen linear's own cost is positive."""
    out = run_tool(
        "tools/benchmark_dispatch.py",
        *("--device", "cpu", "--calls", "16", "--width", "16", "--tokens", "8"),
    )
    ops = {row[0]: number(row[1]) for row in table_rows(out, "Host µs per op")}
    assert {"mm", "cast float32 → bf16", "addmm_ (in place)"} <= set(ops)
    layers = {row[0]: number(row[1]) for row in table_rows(out, "Host µs per adapted linear")}
    assert set(layers) == {
        "frozen linear (absolute)",
        "frozen linear, weights stored bf16 (absolute)",
        "full fine-tuning",
        "LoRA r16",
        "LoRA r16, Python autograd function",
        "DoRA r16",
        "DoRA r16, Python autograd function",
        "FLoRA r16",
        "FLoRA r16, Python autograd function",
        "LoRA r16, frozen weights bf16",
    }  # the fused-kernel row needs a GPU
    assert all(math.isfinite(v) for v in [*ops.values(), *layers.values()])
    assert layers["frozen linear (absolute)"] > 0


def test_model_benchmark_sets_batched_spectra_per_variant():
    """benchmark_model.py --batched-spectra on off: FourierFT / FoRA / FLoRA / LoRA / DoRA
    configs once per setting, written into AdaptedBackbone's switch; without it the
    config's own default."""
    from mmengine.config import Config

    sys.path.insert(0, str(REPO))
    from tools import benchmark, benchmark_model

    variants = {name: dict(type=name.split()[0], path=path)
                for name, path in benchmark_model.VARIANTS.items()
                if name.startswith(("FourierFT", "LoRA"))}  # fmt: skip
    expanded = benchmark.path_variants(variants, None, None, ["on", "off"])
    assert set(expanded) == {
        f"{name} [{build}]"
        for name in ("FourierFT n3000", "LoRA r16")
        for build in ("batched", "per-layer spectra")
    }
    for label, want in (("[batched]", True), ("[per-layer spectra]", False)):
        variant = expanded[f"FourierFT n3000 {label}"]
        cfg = Config.fromfile(variant["path"])
        option = benchmark.run_options(variant)["batched_spectra"]
        benchmark_model.set_batched_spectra(cfg, option, ["on", "off"])
        assert cfg.model.backbone.batched_spectra is want
    cfg = Config.fromfile(variants["FourierFT n3000"]["path"])
    benchmark_model.set_batched_spectra(cfg, None, None)
    assert "batched_spectra" not in cfg.model.backbone  # AdaptedBackbone's default decides
    benchmark_model.set_batched_spectra(cfg, None, [])  # the flag alone
    assert cfg.model.backbone.batched_spectra is True


def test_benchmarks_stop_when_the_native_nodes_did_not_build(monkeypatch):
    """A failed C++ build must not pass for a timing of the nodes: the header check exits
    with the compiler's error line; with the nodes off it reports 'off' and goes on."""
    sys.path.insert(0, str(REPO))
    from mm_spectral.kernels import native
    from tools import benchmark

    failed = RuntimeError("Error building extension\nx.cpp:67:53: error: call is ambiguous\nmore")
    monkeypatch.setattr(native, "_build", lambda: failed)
    previous = native.set_native_mode("auto")
    try:
        assert native.native_status() == (
            "did not build: RuntimeError: x.cpp:67:53: error: call is ambiguous"
        )
        with pytest.raises(SystemExit, match="error: call is ambiguous"):
            benchmark.require_native_nodes()
        native.set_native_mode("off")
        assert benchmark.require_native_nodes() == "off"
    finally:
        native.set_native_mode(previous)


def test_interleaved_graphs_stop_before_they_outgrow_the_device():
    """Every interleaved CUDA graph keeps its pool: the check refuses the next captures
    where the variants left, at the largest pool so far, would not fit in the free memory."""
    sys.path.insert(0, str(REPO))
    from tools import benchmark

    left = [("LoRA r16", {}), ("DoRA r16", {})]
    benchmark.check_graph_room(30 * 2**30, [8.0, 13.5], left)  # 27 GiB needed: fits
    with pytest.raises(SystemExit, match=r"\(LoRA r16, DoRA r16\) need about 27.0 GiB, 20.0 GiB"):
        benchmark.check_graph_room(20 * 2**30, [8.0, 13.5], left)


def test_backbone_benchmark_profiles_by_host_time():
    out = run_tool(
        "tools/benchmark.py",
        *("--tiny", "--device", "cpu", "--only", "ViT", "--variants", "LoRA"),
        *("--warmup", "1", "--iters", "1", "--skip-inference", "--amp-steps", "1"),
        *("--profile", "LoRA", "--profile-sort", "host", "--profile-rows", "3"),
    )
    assert "#### profile: ViT-tiny LoRA r16 (3 steps, by self_cpu_time_total)" in out
    table = out.split("by self_cpu_time_total)", 1)[1]
    assert "aten::" in table and "# of Calls" in table


def test_model_benchmark_variants_share_neck_and_heads():
    """Every variant takes the first one's neck and heads (same layout), keeps its own
    backbone, and a model of another head layout starts its own entry."""
    import torch
    from torch import nn

    from tools.benchmark_model import share_heads

    def detector(width: int) -> nn.Module:
        return nn.ModuleDict(dict(backbone=nn.Linear(3, 4), neck=nn.Linear(4, width),
                                  roi_head=nn.Linear(width, 2)))  # fmt: skip

    store: dict = {}
    first, second, other = detector(5), detector(5), detector(6)
    backbone = second.backbone.weight.detach().clone()
    assert not torch.equal(first.neck.weight, second.neck.weight)
    for model in (first, second, other):
        share_heads(model, store)
    for name in ("neck.weight", "neck.bias", "roi_head.weight", "roi_head.bias"):
        assert torch.equal(first.state_dict()[name], second.state_dict()[name])
    assert torch.equal(second.backbone.weight, backbone)
    assert len(store) == 2 and other.neck.weight.shape == (6, 4)


def test_batched_linears_variants_and_their_options():
    """--batched-linears on off: each low-rank variant once per setting (FourierFT, which
    has no low-rank linears, once), and each variant built and stepped with its own
    ``OPTIONS.batched_linears`` (``applied``), restored afterwards."""
    sys.path.insert(0, str(REPO))
    from mm_spectral.kernels import OPTIONS
    from tools import benchmark

    adapters = {name: benchmark.ADAPTERS[name] for name in ("LoRA r16", "FourierFT n3000")}
    expanded = benchmark.path_variants(adapters, None, None, None, ["on", "off"])
    assert set(expanded) == {
        "LoRA r16 [linear ΔW batched on]",
        "LoRA r16 [linear ΔW batched off]",
        "FourierFT n3000",
    }
    before = OPTIONS.batched_linears
    for setting in ("on", "off"):
        options = benchmark.run_options(expanded[f"LoRA r16 [linear ΔW batched {setting}]"])
        assert options == {"batched_linears": setting}
        seen = benchmark.with_run_options(lambda: OPTIONS.batched_linears, options)()
        assert seen == setting
        assert OPTIONS.batched_linears == before


def test_host_phases_time_each_phase_of_a_step():
    """host_phases: the host's time between a step's marks, per phase (a step that sleeps
    known spans in its forward, backward, optimizer and final wait)."""
    import time

    sys.path.insert(0, str(REPO))
    from tools import benchmark

    spans = (0.03, 0.01, 0.0, 0.02)

    def step(marks=None):
        for span in spans:
            time.sleep(span)
            if marks is not None:
                marks.append(time.perf_counter())
        return 0.0

    got = benchmark.host_phases(step, "cpu", iters=3)
    assert len(got) == len(benchmark.PHASES) == len(spans)
    for ms, span in zip(got, spans):
        assert 1e3 * span <= ms < 1e3 * span + 8


def test_backbone_benchmark_prints_host_phases(tmp_path):
    """--phases: a row per variant with its host time per phase; the JSON carries them."""
    import json

    out = run_tool(
        "tools/benchmark.py",
        *("--tiny", "--device", "cpu", "--only", "ViT", "--variants", "LoRA", "--interleave"),
        *("--warmup", "1", "--iters", "2", "--skip-inference", "--phases"),
        *("--json", str(tmp_path / "out.json")),
    )
    phases = {row[1]: row for row in table_rows(out, "Host time per phase")}
    assert set(phases) == {"full FT", "floor (frozen)", "LoRA r16"}
    for row in phases.values():
        cells = [number(c) for c in row[2:]]
        assert len(cells) == 5 and all(c >= 0 for c in cells) and cells[0] > 0
        assert cells[-1] == pytest.approx(sum(cells[:-1]), abs=0.25)
    saved = json.loads((tmp_path / "out.json").read_text())
    assert all(len(r["phases"]) == 4 for r in saved)


def test_python_builds_option_turns_off_the_native_builds_alone():
    """--native python-builds: the per-layer C++ nodes stay on (auto), the batched builds
    take their Python functions; both settings come back after the step."""
    sys.path.insert(0, str(REPO))
    from mm_spectral.kernels import native_builds_mode, native_mode
    from tools import benchmark

    before = (native_mode(), native_builds_mode())
    with benchmark.applied({"native": "python-builds"}):
        assert (native_mode(), native_builds_mode()) == ("auto", "off")
    with benchmark.applied({"native": "off"}):
        assert native_mode() == "off" and native_builds_mode() == before[1]
    assert (native_mode(), native_builds_mode()) == before
    variants = benchmark.path_variants(
        {"LoRA r16": benchmark.ADAPTERS["LoRA r16"]}, None, ["auto", "python-builds"]
    )
    assert set(variants) == {"LoRA r16 [native auto]", "LoRA r16 [native python-builds]"}


def test_repeat_summarises_each_process_against_its_own_baselines():
    """benchmark_repeat: ratios are taken within a process, then median (min–max) across
    processes: a process where everything ran slower moves the step times, not the ratios."""
    sys.path.insert(0, str(REPO))
    from tools import benchmark_repeat

    def process(scale: float, lora: float) -> list[dict]:
        rows = [("full FT", 50.0), ("floor (frozen)", 35.0), ("LoRA r16", lora)]
        return [
            dict(backbone="ViT-L/16", mode="eager", variant=v, step_ms=ms * scale) for v, ms in rows
        ]

    runs = {"tree": [process(1.0, 45.0), process(1.3, 45.0), process(1.0, 40.0)]}
    rows = {row[3]: row for row in benchmark_repeat.summary_rows(runs)}
    assert rows["LoRA r16"][4] == "3"
    assert rows["LoRA r16"][5] == "45.0 (40.0–58.5)"
    assert rows["LoRA r16"][6] == "0.900 (0.800–0.900)"
    assert rows["LoRA r16"][7] == "1.286 (1.143–1.286)"
    assert rows["full FT"][6] == "1.000 (1.000–1.000)"


def test_repeat_runs_fresh_processes_of_the_benchmark():
    """Two tiny CPU processes: one summary row per variant, each from both processes."""
    out = run_tool(
        "tools/benchmark_repeat.py", "--processes", "2", "--",
        *("--tiny", "--device", "cpu", "--only", "ViT", "--variants", "LoRA"),
        *("--warmup", "1", "--iters", "2", "--skip-inference"),
    )  # fmt: skip
    rows = {row[3]: row for row in table_rows(out, "processes per tree")}
    assert set(rows) == {"full FT", "floor (frozen)", "LoRA r16"}
    for row in rows.values():
        assert row[4] == "2"
        assert number(row[5].split(" ")[0]) > 0
    assert rows["full FT"][6].startswith("1.000")
    assert number(rows["LoRA r16"][7].split(" ")[0]) > 0


def test_repeat_keeps_each_trees_extensions_under_the_given_root(tmp_path, monkeypatch):
    """--extensions ROOT: tree k's processes all build into ROOT/k (builds made there
    beforehand are reused); without it, one tree uses the default directory."""
    sys.path.insert(0, str(REPO))
    from tools import benchmark_repeat

    seen = []

    def fake_run(tree, args, extensions):
        seen.append((tree.name, extensions))
        return [dict(backbone="b", mode="eager", variant="full FT", step_ms=1.0)]

    monkeypatch.setattr(benchmark_repeat, "run_once", fake_run)
    trees = [tmp_path / "a", tmp_path / "b"]
    argv = ["benchmark_repeat.py", "--processes", "2", "--extensions", str(tmp_path / "ext")]
    monkeypatch.setattr(sys, "argv", [*argv, "--tree", *map(str, trees), "--", "--tiny"])
    benchmark_repeat.main()
    root = tmp_path / "ext"
    assert seen == [("a", root / "0"), ("b", root / "1"), ("a", root / "0"), ("b", root / "1")]
    seen.clear()
    monkeypatch.setattr(sys, "argv", ["benchmark_repeat.py", "--processes", "1"])
    benchmark_repeat.main()
    assert seen == [(REPO.name, None)]
