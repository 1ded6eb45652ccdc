"""summary.json: a run's latest quality and disclosure figures and its cumulative cost per party.

Built from metrics.csv (long format: round, client, metric, value) after every round:

    {"run", "dataset", "strategy", "t_zeta", "timesteps", "noise_policy", "rounds_completed",
     "notes": {...: why a metric is missing, how many samples a distance used},
     "quality":    {"round": r, "clients": {"0": {"fd_classifier": ...}}, "pooled": {...}},
     "disclosure": {"round": r, "clients": {...}, "pooled": {...}},
     "privacy": {"delta", "clip_norm", "target_epsilon", "clients": {"0": epsilon}, "max_epsilon"},
     "cost": {"server": {...}, "clients": {"0": {...}}, "clients_mean": {...}}}

Cost entries are sums over all rounds: nfe-/flops-train, nfe-/flops-sample, seconds per phase,
and bytes: "bytes-up" (client -> server protocol messages), "bytes-down" (server -> client),
"bytes-up-evaluation" and "bytes-down-evaluation" (the evaluation replies and the feature
network sent for it: measurement only). Privacy: each client's latest epsilon (privacy.py;
the views of its images so far), absent for FedAvg, which sends weights. Non-finite values are
null (an infinite epsilon: t_zeta = 0, whose uploads are the images themselves; the notes say so).
"""

from __future__ import annotations

import json
import math

import pandas as pd

from collafuse_flwr.config import RunConfig
from collafuse_flwr.metrics.manifold import manifold_names
from collafuse_flwr.outputs import write_atomically
from collafuse_flwr.run_dir import RunDirectory

QUALITY = ("fd_classifier", "kid_classifier", "kid_classifier_std", "fid", "kid", "kid_std", "fcd",
           "kid_clip", "kid_clip_std", "num-generated", "num-real", "condition-accuracy", "condition-accuracy-real",
           "condition-accuracy-blind", "own-class-share",
           *(name for network in ("classifier", "inception", "clip") for name in manifold_names(network)))
DISCLOSURE_PREFIXES = ("upload-", "server-only-", "reconstruction-", "linkage-", "membership-")
DISCLOSURE = ("views-per-image", "effective-snr", "conditions-received")
COST_SUMS = {
    "nfe-train": ("nfe-train",), "flops-train": ("flops-train",), "nfe-sample": ("nfe-sample",),
    "flops-sample": ("flops-sample",), "train-seconds": ("train-seconds",),
    "sample-seconds": ("sample-seconds",), "eval-seconds": ("eval-seconds",),
    "disclosure-seconds": ("disclosure-seconds",), "aggregate-seconds": ("aggregate-seconds",),
    "bytes-up": ("bytes-up-train",),
    "bytes-down": ("bytes-down-train", "bytes-down-sample"),
    "bytes-up-evaluation": ("bytes-up-evaluation",),
    "bytes-down-evaluation": ("bytes-down-evaluation",),
}


def is_disclosure(metric: str) -> bool:
    return metric.startswith(DISCLOSURE_PREFIXES) or metric in DISCLOSURE


def read_metrics(run_dir: RunDirectory) -> pd.DataFrame:
    """`run_dir`'s metrics.csv as a DataFrame with columns round, client (str), metric, value."""
    return pd.read_csv(run_dir.metrics_csv, dtype={"client": str})


def reproducible_metrics(run_dir: RunDirectory) -> pd.DataFrame:
    """`read_metrics` without the wall-clock rows (metrics ending in "seconds"), sorted by round,
    client and metric: what two runs of one configuration by the same clients (their secrets)
    compute alike, however their processes are arranged."""
    metrics = read_metrics(run_dir)
    metrics = metrics[~metrics["metric"].str.endswith("seconds")]
    return metrics.sort_values(["round", "client", "metric"]).reset_index(drop=True)


def summarise(metrics: pd.DataFrame, config: RunConfig, notes: dict) -> dict:
    """The summary.json content for a metrics table; a condition accuracy the feature network
    cannot judge (metrics/conditioning.py) is flagged in the notes."""
    quality = _latest(metrics[metrics.metric.isin(QUALITY)])
    notes = {**notes, **uninformative_condition_accuracy(quality.get("pooled", {}))}
    privacy = _privacy(metrics, config)
    if privacy and not math.isfinite(privacy["max_epsilon"]):
        notes["privacy"] = "epsilon null: infinite, the uploads at t_zeta = 0 carry no noise"
    return {
        "run": None,
        "dataset": config.dataset,
        "strategy": config.strategy,
        "t_zeta": config.t_zeta,
        "timesteps": config.timesteps,
        "noise_policy": config.noise_policy,
        "rounds_completed": int(metrics["round"].max()) if len(metrics) else 0,
        "notes": notes,
        "quality": quality,
        "disclosure": _latest(metrics[metrics.metric.map(is_disclosure)]),
        "privacy": privacy,
        "cost": _cost(metrics),
    }


def write_summary(run_dir: RunDirectory, config: RunConfig, notes: dict) -> None:
    """Rewrite `run_dir`'s summary.json from its metrics.csv (atomically)."""
    summary = summarise(read_metrics(run_dir), config, notes)
    summary["run"] = run_dir.name
    write_atomically(run_dir.summary_json, json.dumps(_finite(summary), indent=2) + "\n")


def uninformative_condition_accuracy(pooled: dict) -> dict:
    """{"condition-accuracy": why} when the feature network scores the clients' real held-out
    images no better than the best image-blind answer (pooled means): it cannot tell the
    requested conditions apart, so neither can its verdict on generated images. Else {}."""
    real, blind = pooled.get("condition-accuracy-real"), pooled.get("condition-accuracy-blind")
    if real is None or blind is None or real > blind:
        return {}
    return {"condition-accuracy": (
        f"uninformative: on the clients' real held-out images the fd_classifier network scores {real:.3f}, no "
        f"better than the best answer that ignores the images ({blind:.3f}); it cannot judge these conditions"
    )}


def _latest(rows: pd.DataFrame) -> dict:
    """The latest round's values, per client and pooled."""
    if rows.empty:
        return {}
    last = rows[rows["round"] == rows["round"].max()]
    table = {client: dict(zip(g.metric, g.value)) for client, g in last.groupby("client")}
    pooled = table.pop("pooled", {})
    return {"round": int(last["round"].iloc[0]), "clients": table, "pooled": pooled}


def _privacy(metrics: pd.DataFrame, config: RunConfig) -> dict:
    """Each client's latest epsilon row (rows are appended in round order) and their maximum;
    {} without epsilon rows."""
    rows = metrics[metrics.metric == "epsilon"]
    if rows.empty:
        return {}
    latest = rows.groupby("client").value.last()
    return {"delta": config.privacy_delta, "clip_norm": config.clip_norm, "target_epsilon": config.target_epsilon,
            "clients": latest.to_dict(), "max_epsilon": float(latest.max())}


def _cost(metrics: pd.DataFrame) -> dict:
    """Per party, the sums over rounds of the COST_SUMS metrics."""
    parties = {}
    for party, rows in metrics[metrics.client != "pooled"].groupby("client"):
        totals = {name: float(rows[rows.metric.isin(parts)].value.sum()) for name, parts in COST_SUMS.items()
                  if rows.metric.isin(parts).any()}
        if totals:
            parties[party] = totals
    server = parties.pop("server", {})
    clients = {k: v for k, v in parties.items() if not k.startswith("node-")}
    mean = pd.DataFrame(clients.values()).mean().to_dict() if clients else {}
    return {"server": server, "clients": clients, "clients_mean": mean}


def _finite(value):
    """`value` with NaN and infinities replaced by None (JSON has neither)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
