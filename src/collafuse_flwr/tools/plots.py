"""Figures of one run directory: quality over rounds, disclosure, and cost per party.

    collafuse-plot RUN_DIR [--out DIR]

writes into RUN_DIR/figures (`RunDirectory.figures`; or DIR), each atomically:
    quality.png      every quality distance over rounds, one line per client and the pooled one
    disclosure.png   the latest disclosure figures per client (attacks and distances)
    cost.png         cumulative NFEs, FLOPs, seconds and bytes per party
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from collafuse_flwr.outputs import write_atomically  # noqa: E402
from collafuse_flwr.run_dir import RunDirectory  # noqa: E402
from collafuse_flwr.summary import COST_SUMS, QUALITY, is_disclosure, read_metrics  # noqa: E402

COST_PANELS = ("nfe-train", "nfe-sample", "flops-train", "flops-sample", "train-seconds",
               "sample-seconds", "bytes-up", "bytes-down")


def _grid(count: int) -> tuple[plt.Figure, list]:
    cols = min(3, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.axis("off")
    return fig, list(axes.flat[:count])


def plot_quality(metrics: pd.DataFrame, path: Path) -> bool:
    """One panel per quality distance present: value over rounds per client and pooled."""
    names = [m for m in QUALITY if m in set(metrics.metric) and not m.endswith("_std") and not m.startswith("num-")]
    if not names:
        return False
    fig, axes = _grid(len(names))
    for ax, name in zip(axes, names):
        rows = metrics[metrics.metric == name]
        for client, g in rows.groupby("client"):
            style = dict(color="black", linewidth=2.5) if client == "pooled" else {}
            ax.plot(g["round"], g.value, marker="o", label=client, **style)
        ax.set(title=name, xlabel="round")
    axes[0].legend(title="client", fontsize=7)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return True


def plot_disclosure(metrics: pd.DataFrame, path: Path) -> bool:
    """The latest round's disclosure figures: one bar panel per metric, bars per client."""
    rows = metrics[metrics.metric.map(is_disclosure)]
    if rows.empty:
        return False
    rows = rows[rows["round"] == rows["round"].max()]
    chance = rows[rows.metric == "linkage-chance"].value
    # infinite SNR (t_zeta = 0) has no bar; chance is drawn as a line in the linkage panel
    shown = rows[np.isfinite(rows.value) & (rows.metric != "linkage-chance")]
    names = [m for m in dict.fromkeys(shown.metric) if not m.endswith("_std")]
    fig, axes = _grid(len(names))
    for ax, name in zip(axes, names):
        g = shown[shown.metric == name]
        ax.bar(g.client, g.value, color=["black" if c == "pooled" else "tab:blue" for c in g.client])
        if name == "linkage-top1":
            if len(chance):
                ax.axhline(chance.mean(), color="tab:red", linestyle="--", label="chance")
                ax.legend(fontsize=7)
        ax.set(title=name, xlabel="client")
    fig.suptitle(f"disclosure after round {int(rows['round'].max())}")
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return True


def plot_cost(metrics: pd.DataFrame, path: Path) -> bool:
    """Cumulative cost per party (server, every client) for each cost figure present."""
    parties = metrics[(metrics.client != "pooled") & ~metrics.client.str.startswith("node-")]
    totals = {name: parties[parties.metric.isin(COST_SUMS[name])].groupby("client").value.sum()
              for name in COST_PANELS}
    totals = {k: v for k, v in totals.items() if len(v)}
    if not totals:
        return False
    fig, axes = _grid(len(totals))
    for ax, (name, values) in zip(axes, totals.items()):
        ax.bar(values.index, values.values, color=["tab:orange" if p == "server" else "tab:blue" for p in values.index])
        ax.set(title=f"{name} (sum over rounds)", xlabel="party")
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return True


def plot_run(run_dir: RunDirectory, out: Path | None = None) -> list[Path]:
    """Write the figures of `run_dir` into `out` (default: its figures/); return the paths
    written."""
    metrics = read_metrics(run_dir)
    out = Path(out) if out else run_dir.figures
    written = []
    for name, plot in (("quality", plot_quality), ("disclosure", plot_disclosure), ("cost", plot_cost)):
        if plot(metrics, out / f"{name}.png"):
            written.append(out / f"{name}.png")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    run_dir = RunDirectory(args.run_dir)
    if not run_dir.metrics_csv.exists():
        parser.error(f"{args.run_dir} has no metrics.csv: not a run directory")
    for path in plot_run(run_dir, args.out):
        print(path)
    return 0
