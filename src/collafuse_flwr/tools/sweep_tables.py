"""The results table of a sweep (results.md): one row per dataset, variant (in a sweep with
variants), strategy and t_zeta with the mean ± standard deviation over seeds of the headline
metrics, from summary.csv's long table."""

from __future__ import annotations

import math

import pandas as pd

# (column title, party, metric, scale, format); a column without any value is left out. Party
# "total" is the server's plus all clients' cost of a run (results_table adds it).
COLUMNS = (
    ("fd_classifier pooled", "pooled", "fd_classifier", 1, "{:.0f}"),
    ("fd_classifier client mean", "client-mean", "fd_classifier", 1, "{:.0f}"),
    ("FID pooled", "pooled", "fid", 1, "{:.1f}"),
    ("FCD pooled", "pooled", "fcd", 1, "{:.1f}"),
    ("condition accuracy pooled", "pooled", "condition-accuracy", 1, "{:.3f}"),
    ("on real images", "pooled", "condition-accuracy-real", 1, "{:.3f}"),
    ("image-blind best", "pooled", "condition-accuracy-blind", 1, "{:.3f}"),
    ("own-class share pooled", "pooled", "own-class-share", 1, "{:.3f}"),
    ("linkage top-1", "client-mean", "linkage-top1", 1, "{:.3f}"),
    ("Tweedie PSNR (dB)", "client-mean", "reconstruction-psnr-tweedie", 1, "{:.1f}"),
    ("Wiener PSNR (dB)", "client-mean", "reconstruction-psnr-wiener", 1, "{:.1f}"),
    ("recompute-eps PSNR (dB)", "client-mean", "reconstruction-psnr-recompute", 1, "{:.1f}"),
    ("server-only fd pooled", "pooled", "server-only-fd_classifier", 1, "{:.0f}"),
    ("epsilon (max over clients)", "max", "epsilon", 1, "{:.3g}"),
    ("membership AUC", "client-mean", "membership-auc", 1, "{:.3f}"),
    ("membership TPR at 1 % FPR", "client-mean", "membership-tpr-at-1pct-fpr", 1, "{:.3f}"),
    ("client TFLOPs train", "client-mean", "flops-train", 1e-12, "{:.2f}"),
    ("client GFLOPs sample", "client-mean", "flops-sample", 1e-9, "{:.0f}"),
    ("client MB up", "client-mean", "bytes-up", 1e-6, "{:.2f}"),
    ("client MB down", "client-mean", "bytes-down", 1e-6, "{:.2f}"),
    ("server TFLOPs", "server", "flops-train", 1e-12, "{:.2f}"),
    ("total train TFLOPs", "total", "flops-train", 1e-12, "{:.2f}"),
)


def has_variants(table: pd.DataFrame) -> bool:
    """Whether a summary table comes from a sweep with [variant.<name>] tables."""
    return "variant" in table.columns and table.variant.fillna("").ne("").any()


def results_table(table: pd.DataFrame) -> pd.DataFrame:
    """Rows (dataset, [variant,] strategy, t_zeta, seeds) and one "mean ± std" string per column
    of COLUMNS, from a completed sweep's summary table; the variant column only in a sweep with
    variants. FedAvg has no cut point: its t_zeta is "—"."""
    ok = _with_total_train_flops(table[(table.status == "finished:completed") & table.value.notna()])
    keys = ["dataset", "variant", "strategy", "t_zeta"] if has_variants(table) else ["dataset", "strategy", "t_zeta"]
    rows = []
    for group, runs in ok.groupby(keys, sort=False):
        row = dict(zip(keys, group)) | {"seeds": runs.seed.nunique()}
        row["t_zeta"] = "—" if row["strategy"] == "fedavg" else int(row["t_zeta"])
        for title, party, metric, scale, fmt in COLUMNS:
            values = runs[(runs.party == party) & (runs.metric == metric)].value * scale
            row[title] = _mean_std(values, fmt) if len(values) else None
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.dropna(axis=1, how="all").fillna("—") if len(frame) else frame


def _with_total_train_flops(ok: pd.DataFrame) -> pd.DataFrame:
    """`ok` and, per run with a "flops-train" row, one of party "total": the server's plus
    num_clients times the client mean (a party without the row trained nothing), so that runs
    of equal training compute can be read off."""
    flops = ok[ok.metric == "flops-train"]
    if flops.empty:
        return ok
    parts = flops.pivot_table(index="run", columns="party", values="value").reindex(columns=["server", "client-mean"])
    parts = parts.fillna(0)
    runs = flops.drop_duplicates("run").set_index("run")
    total = runs.assign(party="total", value=parts["server"] + runs.num_clients * parts["client-mean"])
    return pd.concat([ok, total.reset_index()], ignore_index=True)


def _mean_std(values: pd.Series, fmt: str) -> str:
    """"mean ± std" in `fmt`; a std that is only float rounding of equal values (below 1e-9 of
    the mean) is 0, not 1.4e-16."""
    std = values.std() if len(values) > 1 else math.nan
    if std < 1e-9 * abs(values.mean()):
        std = 0.0
    return fmt.format(values.mean()) + ("" if math.isnan(std) else " ± " + fmt.format(std))


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of `frame` (all cells as text)."""
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"
