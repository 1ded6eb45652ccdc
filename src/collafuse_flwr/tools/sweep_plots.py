"""Figures of a sweep's summary table against t_zeta (mean and spread over seeds), each
written atomically:

quality.png     quality distances, pooled and averaged over clients; the t_zeta = 0 run (global
                model), the t_zeta = T run (local models) and any FedAvg run drawn as reference levels
disclosure.png  linkage, reconstruction and distances of what the server holds or can generate
cost.png        compute and bytes per client (mean over clients) and of the server

In a sweep with variants every panel draws one line per variant and strategy instead, in the
same colour and marker in every panel, named once in a legend beside the panels: a CollaFuse
variant with a single cut point as one point at that cut point, a FedAvg variant (no cut point)
as a dashed level with a band of one standard deviation; no global, local or FedAvg reference
levels, which would mix the variants. A panel whose values are all positive and span more than
a factor of 30 has a logarithmic axis.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from collafuse_flwr.outputs import write_atomically  # noqa: E402
from collafuse_flwr.tools.sweep_tables import has_variants  # noqa: E402

QUALITY = (("pooled", "fd_classifier"), ("client-mean", "fd_classifier"), ("pooled", "fid"),
           ("client-mean", "fid"), ("pooled", "fcd"), ("client-mean", "fcd"))
DISCLOSURE = (("client-mean", "linkage-top1"), ("client-mean", "reconstruction-psnr-tweedie"),
              ("client-mean", "reconstruction-psnr-wiener"), ("client-mean", "reconstruction-psnr-recompute"),
              ("client-mean", "upload-fd_classifier"),
              ("pooled", "server-only-fd_classifier"))
COST = (("client-mean", "flops-train"), ("client-mean", "flops-sample"), ("client-mean", "bytes-up"),
        ("server", "flops-train"), ("server", "flops-sample"), ("client-mean", "bytes-down"))
LOG_SCALE_RATIO = 30  # a panel whose positive values span more than this ratio is drawn on a log scale
REFERENCE_STYLE = {"global (t_zeta = 0)": "tab:green", "local (t_zeta = T)": "tab:red", "fedavg": "tab:purple"}


def _references(rows: pd.DataFrame) -> dict[str, float]:
    """Reference levels of one dataset and metric: global, local and FedAvg means over seeds."""
    collafuse = rows[rows.strategy == "collafuse"]
    levels = {
        "global (t_zeta = 0)": collafuse[collafuse.t_zeta == 0].value.mean(),
        "local (t_zeta = T)": collafuse[collafuse.t_zeta == collafuse.timesteps].value.mean(),
        "fedavg": rows[rows.strategy == "fedavg"].value.mean(),
    }
    return {k: v for k, v in levels.items() if not math.isnan(v)}


def _series_styles(keys: list[tuple]) -> dict[tuple, tuple[str, str]]:
    """A colour and a marker per series, distinct for up to 20 x 5 series: tab20's ten dark
    hues first, then their light twins, then the next marker."""
    palette, markers = plt.get_cmap("tab20").colors, "osD^v"
    return {key: (palette[(2 * i) % 20 + (i // 10) % 2], markers[(i // 20) % 5]) for i, key in enumerate(keys)}


def _figure(table: pd.DataFrame, specs, path: Path, references: bool) -> Path | None:
    panels = [(d, party, metric) for d in sorted(table.dataset.unique()) for party, metric in specs
              if ((table.dataset == d) & (table.party == party) & (table.metric == metric)).any()]
    if not panels:
        return None
    variants = has_variants(table)
    series = ["variant", "strategy"] if variants else ["strategy"]
    styles = _series_styles([key for key, _ in table.groupby(series)]) if variants else {}
    cols = min(3, len(panels))
    lines = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(4.4 * cols, 3.3 * lines), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (dataset, party, metric) in zip(axes.flat, panels):
        rows = table[(table.dataset == dataset) & (table.party == party) & (table.metric == metric)]
        for key, g in rows.groupby(series):
            stats = g.groupby("t_zeta").value.agg(["mean", "std", "count"]).reset_index()
            label = " ".join(key)
            if variants and key[-1] == "fedavg":
                mean, std = g.value.mean(), g.value.std()
                ax.axhline(mean, linestyle="--", color=styles[key][0], label=label)
                if std > 0:
                    ax.axhspan(mean - std, mean + std, color=styles[key][0], alpha=0.12, linewidth=0)
            elif variants or len(stats) > 1 or key[-1] != "fedavg":
                color, marker = styles.get(key, (None, "o"))
                ax.errorbar(stats.t_zeta, stats["mean"], yerr=stats["std"].fillna(0), marker=marker, capsize=3,
                            color=color, label=label)
        if references and not variants:
            for label, level in _references(rows).items():
                ax.axhline(level, linestyle="--", color=REFERENCE_STYLE[label], label=label)
        ax.set(title=f"{dataset}: {metric} ({party})", xlabel="t_zeta")
        if (rows.value > 0).all() and rows.value.max() > LOG_SCALE_RATIO * rows.value.min():
            ax.set_yscale("log")
        if not variants:
            ax.legend(fontsize=7)
    if variants:  # one legend for all panels: the series keep their style everywhere
        named = {label: handle for ax in axes.flat for handle, label in zip(*ax.get_legend_handles_labels())}
        fig.legend(named.values(), named.keys(), loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path


def plot_sweep(table: pd.DataFrame, out: Path) -> list[Path]:
    """Write the sweep's figures into `out`; return the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ok = table[table.status == "finished:completed"].dropna(subset=["value"])
    written = [
        _figure(ok, QUALITY, out / "quality.png", references=True),
        _figure(ok, DISCLOSURE, out / "disclosure.png", references=False),
        _figure(ok, COST, out / "cost.png", references=True),
    ]
    return [p for p in written if p is not None]
