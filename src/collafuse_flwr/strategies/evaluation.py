"""Reading the clients' evaluation replies on the server (every strategy): validated quality
and cost rows per client, the pooled quality row from the clients' feature moments, and
writing them. No image's features reach the server: each client sends per feature network the
mean and covariance of its held-out and of its generated images' features (wire.py) when it
releases them (clients/release.py), and the pooled Fréchet distances follow from those
(metrics/distances.py, `pooled_moments`, each client's weight capped: `pooled_quality`)."""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log

from collafuse_flwr import wire
from collafuse_flwr.config import RunConfig
from collafuse_flwr.data import condition_sizes
from collafuse_flwr.diffusion.text import text_weights_file
from collafuse_flwr.metrics.conditioning import conditioning_metric_names
from collafuse_flwr.metrics.distances import Moments, frechet_distance, pooled_moments
from collafuse_flwr.metrics.features import FeatureNetwork
from collafuse_flwr.run_dir import RunDirectory
from collafuse_flwr.strategies.parties import Parties
from collafuse_flwr.summary import write_summary
from collafuse_flwr.weights import BACKBONES, file_digest


def evaluation_rows(
    server_round: int, replies: Iterable[Message], parties: Parties, networks: list[FeatureNetwork],
    config: RunConfig, notes: dict,
) -> tuple[list[tuple], dict[str, list[float]]]:
    """metrics.csv rows of every accepted evaluation reply (then the pooled row) and each
    metric's values over the clients. A failed, invalid or missing reply gives one row
    `evaluate-fault-<kind>` (parties.py) and nothing else; a client that declined
    (`wire.DECLINE_REASONS`) one row `evaluate-declined-<reason>` and its explanation in the log
    and in `notes` ("evaluation-declined"); like a missing client it has no part in the pooled row.
    `notes` (summary.json's) gets "pooled-not-computable", {Fréchet distance: why}, when some
    pooled distance cannot be computed this round (`pooled_quality`), and loses it otherwise."""
    shares = conditioning_metric_names(config, condition_sizes(config)[0])
    received, rows = parties.receive(
        server_round, "evaluate", replies, lambda reply: _evaluation_reply(reply, parties, networks, config, shares),
    )
    declined = {str(reply.partition_id): reply.payload[1] for reply in received if reply.payload[0] is None}
    evaluated = [reply for reply in received if reply.payload[0] is not None]
    notes.pop("evaluation-declined", None)
    if declined:
        notes["evaluation-declined"] = {pid: _declined_note(reason, detail, networks) for pid, (reason, detail)
                                        in declined.items()}
    for pid, (reason, _) in declined.items():
        log(WARNING, "round %s: client %s declined to evaluate: %s", server_round, pid,
            notes["evaluation-declined"][pid])
        rows.append((server_round, pid, f"evaluate-declined-{reason}", 1.0))
    per_metric = {}
    for reply in evaluated:
        metrics, _ = reply.payload
        rows.append((server_round, str(reply.partition_id), "bytes-up-evaluation", float(reply.nbytes)))
        for key, value in metrics.items():
            if key != "partition-id":
                rows.append((server_round, str(reply.partition_id), key, float(value)))
                per_metric.setdefault(key, []).append(float(value))
    pooled, missing = pooled_quality(
        networks, {str(reply.partition_id): reply.payload[1] for reply in evaluated if config.pooled_metrics},
        config.eval_num_samples)
    notes.pop("pooled-not-computable", None)
    if missing:
        notes["pooled-not-computable"] = missing
    if config.pooled_metrics:  # every client generates eval-num-samples images: the pooled share is their mean
        pooled.update({name: sum(per_metric[name]) / len(per_metric[name]) for name in shares if per_metric.get(name)})
    rows += [(server_round, "pooled", k, v) for k, v in pooled.items()]
    return rows, per_metric


def _declined_note(reason: str, detail: str, networks: list[FeatureNetwork]) -> str:
    """The server's own words for a decline `reason` and what would lift it, then the client's
    `detail` (its text, validated: `wire.unpack_declined`)."""
    what = {
        "untrusted-evaluator": (
            f"it does not trust the fd_classifier network of SHA-256 {networks[0].identity}: it evaluates once the "
            "digest is in its node config trusted-evaluators or, in a simulation where one user runs every party, "
            "with COLLAFUSE_TRUST_RUN_EVALUATOR=1 in the environment the SuperLink starts in (docs/threat-model.md)"),
        "missing-weights": "it has no copy of a pretrained weights file the server named by SHA-256",
        "too-few-images": "its held-out or generated set is below the minimum of images it releases statistics of",
    }[reason]
    return f"{what} (the client: {detail!r})"


def _evaluation_reply(
    reply: Message, parties: Parties, networks: list[FeatureNetwork], config: RunConfig, shares: tuple[str, ...],
) -> tuple[int, tuple[dict, dict[str, Moments]]]:
    """The partition id, validated metrics (with the conditioning metrics `shares`) and feature
    moments ({"<network>-<real|generated>": Moments}, empty without pooled-metrics) of one
    evaluation reply (`wire.unpack_evaluation`); of a declining reply (`wire.unpack_declined`)
    the partition id, None and (reason, detail)."""
    declined = wire.unpack_declined(reply.content)
    if declined is not None:
        pid = parties.check_partition(reply.metadata.src_node_id, {"partition-id": declined[0]})
        return pid, (None, declined[1:])
    metrics, moments = wire.unpack_evaluation(
        reply.content, {n.name: (n.fd_name, n.kid_name, n.module.num_features) for n in networks},
        config.eval_num_samples, config.max_uploads_per_client, config.sampling_steps, config.pooled_metrics,
        shares,
    )
    pid = parties.check_partition(reply.metadata.src_node_id, metrics)
    counts = {"real": metrics["num-real"], "generated": metrics["num-generated"]}
    return pid, (metrics, {key: Moments(counts[key.rsplit("-", 1)[1]], mean, covariance)
                           for key, (mean, covariance) in moments.items()})


def feature_network_record(networks: list[FeatureNetwork]) -> ArrayRecord:
    """The fd_classifier network (the first of `networks`) as the ArrayRecord evaluate
    messages carry (`wire.FEATURE_NETWORK`): clients evaluate on it, never on a file the server
    names; counted as bytes-down-evaluation, not as protocol traffic (`Parties.address`)."""
    return wire.pack_weights(networks[0].module.state_dict())


def pooled_quality(
    networks: list[FeatureNetwork], moments: dict[str, dict[str, Moments]], cap: int
) -> tuple[dict[str, float], dict[str, str]]:
    """Quality over all clients from each client's `moments` ({client: {"<network>-<real|generated>":
    Moments}}): per feature network whose moments every client sent, the Fréchet distance
    between the pooled moments of all generated and of all held-out features, and the sample
    sizes behind it; and for each other network why its distance is not computable. Empty
    without clients. No pooled KID: it would need every image's features.

    Each client's counts are capped at `cap` (eval-num-samples, `pooled_moments`): the server
    cannot verify a client's num-real, so an uncapped client claiming 100,000 held-out images
    would set the pooled row alone; capped, its share of either pooled set is at most
    cap / (cap + the other clients' counts). Every client's generated set has exactly `cap`
    images, so that side is the exact union, and so is the held-out side while no client holds
    more than `cap` held-out images (beyond, each client's held-out set weighs as `cap` images,
    as its generated set does)."""
    if not moments:
        return {}, {}
    pooled, missing = {}, {}
    for network in networks:
        lacking = [client for client, m in moments.items() if f"{network.name}-real" not in m]
        if lacking:
            missing[network.fd_name] = (
                f"client(s) {', '.join(lacking)} released no moments of {network.name}'s "
                f"{network.module.num_features} features: a client releases them only of more images than features "
                "in both sets (or of fewer if its node config min-release-images allows)")
            continue
        real = pooled_moments([m[f"{network.name}-real"] for m in moments.values()], cap)
        fake = pooled_moments([m[f"{network.name}-generated"] for m in moments.values()], cap)
        pooled.update({network.fd_name: frechet_distance(real, fake), "num-generated": float(fake.count),
                       "num-real": float(real.count)})
    return pooled, missing


def evaluation_digests(config: RunConfig, networks: list[FeatureNetwork]) -> dict[str, str]:
    """What an evaluate message's config names besides the round: the SHA-256 of the file of
    each pretrained network the server evaluates with ("fid-weights-sha256", "fcd-weights-sha256";
    a client computes those metrics only on its own file of that digest, clients/release.py) and,
    under condition "text", of its text tower's file ("text-weights-sha256")."""
    digests = {f"{BACKBONES[n.name].config_key}-sha256": n.identity for n in networks[1:]}
    if config.condition == "text":
        digests["text-weights-sha256"] = file_digest(text_weights_file(config.text_weights, config.fcd_weights)[0])
    return digests


def write_evaluation(
    run_dir: RunDirectory, config: RunConfig, notes: dict, server_round: int, rows: list[tuple],
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
        run_dir.append_log(line)
    run_dir.append_metrics(rows)
    write_summary(run_dir, config, notes)
    return MetricRecord({k: sum(v) / len(v) for k, v in per_metric.items()}) if per_metric else None
