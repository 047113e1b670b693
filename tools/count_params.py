"""Print the trainable-parameter table of configs' models, built without weights if possible.

    python tools/count_params.py CONFIG [CONFIG ...] [--markdown] [--device meta|cpu]

The model is built on the meta device (no memory, instant even for 6B); where a model
cannot be built there it falls back to the CPU.

A config that reproduces a row of the FLoRA paper's tables says so in a top-level ``paper``
key: ``paper = dict(table='1', params_m=12.94)`` (the paper's parameter budget, millions)
or ``dict(table='2', params_pct=0.32)`` (its share of the backbone, %); without a number the
paper's budget prints as '—'. "Ours" is what the paper counts: the backbone's parameters
that train (adapters, tuned biases, or every pretrained weight for full fine-tuning), not
the neck, the heads or the layers our backbones add for them (pyramid, output norms).
"""

from __future__ import annotations

import argparse
import os.path as osp
import re
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from torch import nn  # noqa: E402

from mm_spectral import parameter_counts, trainable_report  # noqa: E402
from mm_spectral.openmmlab import build_model  # noqa: E402
from mm_spectral.state import is_adapter_key  # noqa: E402

# Parameters our backbone classes add on top of the pretrained network for dense heads:
# ConvNeXtV2's output norms, the ViTs' SimplePyramid. Not part of "the backbone" a paper
# counts.
NEW_PARTS = re.compile(r"(out_norms|pyramid)\.")
DASH = "—"


def build(cfg: Config, device: str) -> tuple[nn.Module, str]:
    """(model, device it was built on). Only an op the meta device cannot run sends the
    build to the CPU; a config error is raised as it is (a 6B model on the CPU to find
    the same error again would take ~24 GB)."""
    if device == "meta":
        try:
            with torch.device("meta"):
                return build_model(cfg), "meta"
        except Exception as err:  # noqa: BLE001  (any op that needs real data)
            if not needs_real_data(err):
                raise
            print(f"  (cannot build on the meta device: {type(err).__name__}: {err}; using CPU)")
    return build_model(cfg), "cpu"


def needs_real_data(err: Exception) -> bool:
    """Did the build fail because the meta device has no data or no kernel for an op?"""
    return isinstance(err, NotImplementedError) or bool(
        re.search(r"\bmeta\b", str(err), re.IGNORECASE)
    )


def backbone_counts(model: nn.Module) -> dict[str, int]:
    """{'backbone': pretrained backbone parameters, 'tuned': those of them (or adapters on
    them) that train}; NEW_PARTS excluded from both."""
    backbone = getattr(model, "backbone", model)
    pretrained = tuned = 0
    for name, param in backbone.named_parameters():
        if NEW_PARTS.match(name):
            continue
        if not is_adapter_key(name):
            pretrained += param.numel()
        if param.requires_grad:
            tuned += param.numel()
    return dict(backbone=pretrained, tuned=tuned)


def paper_budget(paper: dict | None) -> str:
    """The paper's budget as it prints it: '12.94M', '0.32%' or '—'."""
    paper = paper or {}
    if paper.get("params_m") is not None:
        return f"{paper['params_m']:.2f}M"
    if paper.get("params_pct") is not None:
        return f"{paper['params_pct']:.2f}%"
    return DASH


def deviation(row: dict) -> float | None:
    """(ours - paper) / paper for a row with a paper budget, else None."""
    paper = row["paper"] or {}
    if paper.get("params_m") is not None:
        return row["tuned"] / (paper["params_m"] * 1e6) - 1.0
    if paper.get("params_pct") is not None:
        return row["tuned_pct"] / paper["params_pct"] - 1.0
    return None


def runner(cfg: Config) -> str:
    """How the config trains: 'Runner', or 'FlexibleRunner + <strategy>' (several GPUs)."""
    if cfg.get("runner_type") == "FlexibleRunner":
        strategy = cfg.get("strategy") or {}
        return f"FlexibleRunner + {strategy.get('type', '?')}"
    return "Runner"


def count(path: str, device: str = "meta", cfg_options: dict | None = None) -> dict | None:
    """Build one config's model and count it (also prints its trainable table); None for a
    file without a model (a ``_base_`` fragment such as a runtime)."""
    cfg = Config.fromfile(path)
    if cfg_options is not None:
        cfg.merge_from_dict(cfg_options)
    print(f"== {path}")
    if "model" not in cfg:
        print("  (no model in this file: skipped)\n")
        return None
    paper = cfg.get("paper")
    row = dict(
        config=path,
        paper=paper.to_dict() if hasattr(paper, "to_dict") else paper,
        runner=runner(cfg),
    )
    try:
        model, built_on = build(cfg, device)
    except Exception as err:  # noqa: BLE001  (reported in the row, and by the exit status)
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
        print(f"  does not build: {row['error']}\n")
        return row
    row.update(**parameter_counts(model), **backbone_counts(model))
    row["tuned_pct"] = 100.0 * row["tuned"] / max(row["backbone"], 1)
    print(trainable_report(model))
    share = 100.0 * row["trainable"] / max(row["total"], 1)
    print(
        f"total {row['total']:,}  trainable {row['trainable']:,} ({share:.3f}%)  "
        f"adapter {row['adapter']:,}  backbone tuned {row['tuned']:,} of {row['backbone']:,} "
        f"({row['tuned_pct']:.3f}%)  paper {paper_budget(row['paper'])}  [built on {built_on}]\n"
    )
    return row


def markdown(rows: list[dict]) -> str:
    """One line per config: the paper's table and budget beside our count."""
    lines = [
        "| config | paper table | paper budget | ours: backbone params tuned | Δ | "
        "trainable (with neck, heads) | total | runner |",
        "|---|:-:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        paper = row["paper"] or {}
        name = (
            f"`{osp.basename(row['config'])}` | {paper.get('table', DASH)} | {paper_budget(paper)}"
        )
        if "error" in row:
            lines.append(f"| {name} | does not build: {row['error']} | | | | {row['runner']} |")
            continue
        delta = deviation(row)
        ours = f"{row['tuned'] / 1e6:.2f}M ({row['tuned_pct']:.2f}%)"
        lines.append(
            f"| {name} | {ours} | {DASH if delta is None else f'{100 * delta:+.1f}%'} | "
            f"{row['trainable']:,} | {row['total']:,} | {row['runner']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--device", choices=["meta", "cpu"], default="meta")
    parser.add_argument("--markdown", action="store_true", help="end with a markdown table")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction)
    args = parser.parse_args(argv)
    counted = (count(path, args.device, args.cfg_options) for path in args.configs)
    rows = [row for row in counted if row is not None]
    if args.markdown:
        print(markdown(rows))
    failed = [row["config"] for row in rows if "error" in row]
    if failed:
        raise SystemExit(f"{len(failed)} config(s) do not build: {', '.join(failed)}")
    return rows


if __name__ == "__main__":
    main()
