"""Reading the clients' evaluation replies on the server (every strategy): validated quality
and cost rows per client, the pooled quality row from the clients' features, and writing them."""

from __future__ import annotations

from logging import INFO
from pathlib import Path
from typing import Iterable

import torch
from flwr.app import Message, MetricRecord
from flwr.common.logger import log

from collafuse_flwr import wire
from collafuse_flwr.config import RunConfig
from collafuse_flwr.metrics.distances import named_distances
from collafuse_flwr.metrics.features import FeatureNetwork
from collafuse_flwr.outputs import append_log, append_metrics
from collafuse_flwr.strategies.parties import Parties
from collafuse_flwr.summary import write_summary


def evaluation_rows(
    server_round: int, replies: Iterable[Message], parties: Parties, networks: list[FeatureNetwork],
    config: RunConfig,
) -> tuple[list[tuple], dict[str, list[float]]]:
    """metrics.csv rows of every accepted evaluation reply (then the pooled row) and each
    metric's values over the clients. A failed, invalid or missing reply gives one row
    `evaluate-fault-<kind>` (parties.py) and nothing else."""
    received, rows = parties.receive(
        server_round, "evaluate", replies, lambda reply: _evaluation_reply(reply, parties, networks, config),
    )
    per_metric = {}
    for reply in received:
        metrics, _ = reply.payload
        rows.append((server_round, str(reply.partition_id), "bytes-up-evaluation", float(reply.nbytes)))
        for key, value in metrics.items():
            if key != "partition-id":
                rows.append((server_round, str(reply.partition_id), key, float(value)))
                per_metric.setdefault(key, []).append(float(value))
    # in partition-id order: reply arrival order must not change KID's subsets
    pooled = pooled_quality(networks, [reply.payload[1] for reply in received])
    rows += [(server_round, "pooled", k, v) for k, v in pooled.items()]
    return rows, per_metric


def _evaluation_reply(
    reply: Message, parties: Parties, networks: list[FeatureNetwork], config: RunConfig
) -> tuple[int, tuple[dict, dict]]:
    """The partition id, validated metrics and features of one evaluation reply."""
    content = reply.content
    extra = set(content.keys()) - {wire.METRICS, wire.FEATURES}
    if extra or wire.METRICS not in content.metric_records:
        raise wire.UploadRejected(f"unexpected records {sorted(extra)} or no metrics record")
    metrics = content.metric_records[wire.METRICS]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()):
        raise wire.UploadRejected("metrics must be numbers")
    pid = metrics.get("partition-id")
    if pid is None or parties.partition_of.get(reply.metadata.src_node_id) != pid:
        raise wire.UploadRejected(f"partition-id {pid!r} is not the one this node reported in training")
    sizes = {n.name: n.module.num_features for n in networks}
    received = wire.unpack_features(content, sizes, config.eval_num_samples, config.max_uploads_per_client)
    return int(pid), (dict(metrics), received)


def pooled_quality(networks: list[FeatureNetwork], features: list[dict]) -> dict[str, float]:
    """Quality over all clients: generated vs held-out features, pooled (empty without features)."""
    pooled = {}
    for network in networks:
        real = [f[f"{network.name}-real"] for f in features if f"{network.name}-real" in f]
        fake = [f[f"{network.name}-generated"] for f in features if f"{network.name}-generated" in f]
        if real:
            pooled.update(named_distances(network.fd_name, network.kid_name, torch.cat(real), torch.cat(fake)))
            pooled["num-generated"], pooled["num-real"] = float(sum(map(len, fake))), float(sum(map(len, real)))
    return pooled


def write_evaluation(
    run_dir: Path, config: RunConfig, notes: dict, server_round: int, rows: list[tuple],
    per_metric: dict[str, list[float]],
) -> MetricRecord | None:
    """Log fd_classifier per client, append `rows` to metrics.csv, rewrite summary.json;
    return each metric's mean over the clients (None when no reply was accepted)."""
    if per_metric:
        fds = sorted((r[1], r[3]) for r in rows if r[2] == "fd_classifier" and r[1] != "pooled")
        line = f"round {server_round} evaluation | fd_classifier per client: " + ", ".join(
            f"{pid}: {fd:.2f}" for pid, fd in fds
        )
        log(INFO, line)
        append_log(run_dir, line)
    append_metrics(run_dir, rows)
    write_summary(run_dir, config, notes)
    return MetricRecord({k: sum(v) / len(v) for k, v in per_metric.items()}) if per_metric else None
