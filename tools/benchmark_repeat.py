"""Run ``tools/benchmark.py`` in several fresh processes (of one or more source trees, in
turns) and print each variant's median step time and ratios with their spread.

Why: on a host-bound eager step the host's speed differs from one process to the next (on
the H100 hosts this project rents, full fine-tuning's ViT-L step took 45–62 ms in eight
processes of one session, and ratios to it moved by ±10%), so one invocation cannot tell a
change of a few percent. Each process's ratios are taken against full FT and the floor of
the same process, then summarised across processes. With ``--tree`` the trees (e.g. a
checkout of the previous commit, and ``.``) take turns, each with its own C++ extension
directory, so that differing native sources do not rebuild at every switch.

    python tools/benchmark_repeat.py --processes 4 -- --only ViT --variants LoRA --interleave
    python tools/benchmark_repeat.py --processes 4 --tree ../before . -- --only ViT --interleave
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINES = {"full FT": "full FT", "floor": "floor (frozen)"}


def run_once(tree: Path, benchmark_args: Sequence[str], extensions: Path | None) -> list[dict]:
    """One fresh ``tools/benchmark.py`` process of ``tree``: its results (``--json``)."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "results.json"
        env = dict(os.environ, PYTHONPATH=str(tree))
        if extensions is not None:
            env["TORCH_EXTENSIONS_DIR"] = str(extensions)
        command = [sys.executable, "tools/benchmark.py", *benchmark_args, "--json", str(out)]
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{tree}: tools/benchmark.py failed:\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def per_process_ratios(results: Iterable[dict]) -> dict[tuple[str, str, str], dict[str, float]]:
    """(backbone, mode, variant) -> its step (ms) and its ratio to each baseline of the same
    process (``BASELINES``; absent where that baseline did not run)."""
    rows = {(r["backbone"], r["mode"], r["variant"]): r["step_ms"] for r in results}
    out: dict[tuple[str, str, str], dict[str, float]] = {}
    for (backbone, mode, variant), ms in rows.items():
        entry = {"ms": ms}
        for key, name in BASELINES.items():
            base = rows.get((backbone, mode, name))
            if base:
                entry[key] = ms / base
        out[(backbone, mode, variant)] = entry
    return out


def spread(values: Sequence[float], digits: int) -> str:
    """'median (min–max)', or the one value."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{mid:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


def summary_rows(runs: dict[str, list[list[dict]]]) -> list[list[str]]:
    """Table rows: tree, backbone, mode, variant, processes, step ms, × full FT, × floor,
    each as median (min–max) over the tree's processes."""
    rows = []
    for tree, processes in runs.items():
        seen: dict[tuple[str, str, str], dict[str, list[float]]] = defaultdict(
            lambda: defaultdict(list)
        )
        for results in processes:
            for key, entry in per_process_ratios(results).items():
                for name, value in entry.items():
                    seen[key][name].append(value)
        for (backbone, mode, variant), values in seen.items():
            rows.append(
                [
                    tree, backbone, mode, variant, str(len(values["ms"])),
                    spread(values["ms"], 1),
                    spread(values["full FT"], 3) if values.get("full FT") else "–",
                    spread(values["floor"], 3) if values.get("floor") else "–",
                ]
            )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=4, help="fresh processes per tree")
    parser.add_argument(
        "--tree",
        nargs="+",
        default=[str(REPO)],
        help="source trees to run in turns (default: this checkout)",
    )
    parser.add_argument(
        "--extensions",
        help="root of the trees' C++ extension directories (<root>/<tree index>; default: a new "
        "temporary one), so that builds made beforehand are reused",
    )
    parser.add_argument("benchmark_args", nargs=argparse.REMAINDER, help="-- then its options")
    args = parser.parse_args()
    forwarded = (
        args.benchmark_args[1:] if args.benchmark_args[:1] == ["--"] else args.benchmark_args
    )
    if "--json" in forwarded:
        parser.error("--json is this script's own (each process writes one)")
    trees = [Path(t).resolve() for t in args.tree]
    runs: dict[str, list[list[dict]]] = {str(t): [] for t in trees}
    scratch = (
        Path(args.extensions)
        if args.extensions
        else Path(tempfile.mkdtemp(prefix="mm_spectral_extensions_"))
    )
    for index in range(args.processes):
        for number, tree in enumerate(trees):
            extensions = scratch / str(number) if len(trees) > 1 or args.extensions else None
            print(f"process {index + 1}/{args.processes}: {tree}", flush=True)
            runs[str(tree)].append(run_once(tree, forwarded, extensions))
    print(f"\n### Step time over {args.processes} processes per tree: median (min–max)\n")
    print("| tree | backbone | mode | variant | processes | step (ms) | × full FT | × floor |")
    print("|---|---|---|---|---|---|---|---|")
    for row in summary_rows(runs):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
