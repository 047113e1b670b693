"""Plot ‖ΔW‖_F and the feature amplification factor that DeltaStatsHook logged.

    python tools/analysis/plot_delta_stats.py WORK_DIR_OR_SCALARS_JSON [--out delta_stats.png]

Reads MMEngine's ``<work_dir>/<timestamp>/vis_data/scalars.json`` (one JSON record per
line; the newest run when given a work dir) and draws both curves against iterations.
"""

from __future__ import annotations

import argparse
import glob
import json
import os.path as osp

KEYS = {"delta_norm": "mean ‖ΔW‖_F", "delta_amplification": "feature amplification factor"}


def find_scalars(path: str) -> str:
    """``path`` itself if a file, else the newest ``*/vis_data/scalars.json`` below it."""
    if osp.isfile(path):
        return path
    found = sorted(glob.glob(osp.join(path, "*", "vis_data", "scalars.json")))
    if not found:
        raise SystemExit(f"no */vis_data/scalars.json under {path}")
    return found[-1]


def read_scalars(path: str) -> dict[str, list[tuple[int, float]]]:
    """{'delta_norm': [(iter, value)], 'delta_amplification': [...]} from scalars.json."""
    series: dict[str, list[tuple[int, float]]] = {key: [] for key in KEYS}
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            step = record.get("iter", record.get("step", 0))
            for key in KEYS:
                value = record.get(key, record.get(f"train/{key}"))
                if value is not None:
                    series[key].append((int(step), float(value)))
    return series


def plot(series: dict[str, list[tuple[int, float]]], out: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise SystemExit(
            f"matplotlib is needed to draw the plot ({err}); install it with "
            "`pip install matplotlib`"
        ) from None
    fig, axes = plt.subplots(1, len(KEYS), figsize=(10, 3.6))
    for ax, (key, title) in zip(axes, KEYS.items()):
        if series[key]:
            steps, values = zip(*series[key])
            ax.plot(steps, values, marker=".")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a work dir, or a vis_data/scalars.json file")
    parser.add_argument("--out", default="delta_stats.png", help="PNG to write")
    args = parser.parse_args(argv)
    scalars = find_scalars(args.path)
    series = read_scalars(scalars)
    if not any(series.values()):
        raise SystemExit(
            f"{scalars} has no delta_norm / delta_amplification records: "
            "was DeltaStatsHook in custom_hooks, and did training reach its interval?"
        )
    plot(series, args.out)
    print(f"wrote {args.out} ({', '.join(f'{k}: {len(v)} points' for k, v in series.items())})")
    return args.out


if __name__ == "__main__":
    main()
