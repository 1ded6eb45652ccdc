"""A client's evaluation reply, for every client behaviour: its generated images saved below
its own state directory, their quality against its held-out images on every available feature
network, the cost of its sampling steps, and (pooled-metrics) per feature network the mean and
covariance of both sets' features for the server's pooled row: statistics of each set, never
one image's features; and whether the images show the requested conditions
(metrics/conditioning.py)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from diffusers import UNet2DModel
from flwr.app import MetricRecord, RecordDict

from collafuse_flwr import wire
from collafuse_flwr.clients.round import ClientRound
from collafuse_flwr.data import condition_sizes, group_columns, load_table, partition_key
from collafuse_flwr.metrics.classifier import FeatureClassifier, classifier_from_state
from collafuse_flwr.metrics.conditioning import conditioning_metric_names, conditioning_scores
from collafuse_flwr.metrics.cost import sampling_cost
from collafuse_flwr.metrics.distances import feature_moments, named_distances
from collafuse_flwr.metrics.features import cached_features, load_feature_networks, resolved_weights, weights_digest
from collafuse_flwr.outputs import save_grid, save_labelled_grid


def evaluation_reply(
    client: ClientRound, content: RecordDict, images: torch.Tensor, requested: torch.Tensor | None,
    net: UNet2DModel | None, steps: int, sample_seconds: float,
) -> RecordDict:
    """Save the client's generated `images` (n, C, H, W) in [-1, 1] as a grid and report their
    quality against the client's held-out images (on the fd_classifier network the evaluate
    message `content` carries, `wire.unpack_feature_network`, and the pretrained ones), how
    well they show the `requested` raw conditions they were generated for (None:
    unconditional), and the cost of the `steps` sampling steps the client ran with `net`
    (none when `net` is None). With pooled-metrics the reply adds,
    per feature network, the mean and covariance of the held-out and of the generated images'
    features (`wire.pack_moments`): statistics of each set, never a per-image feature."""
    config, partition_id = client.config, client.partition_id
    name = f"round-{client.server_round:03d}-client-{partition_id}"
    save_grid(images, client.samples_dir / f"{name}.png")
    if requested is not None:
        _save_labelled(client, images, requested, client.samples_dir / f"{name}-labelled.png")
    start = time.perf_counter()
    quality, moments = _quality(client, _feature_network(client, content), images, requested)
    metrics = {
        "partition-id": partition_id,
        "num-generated": int(images.shape[0]),
        "num-real": int(client.data.held_out.shape[0]),
        "client-sampling-steps": steps,
        "sample-seconds": sample_seconds,
        **(sampling_cost(net, client.image_shape, len(images), steps) if net is not None
           else {"nfe-sample": 0.0, "flops-sample": 0.0}),
        **quality,
        "eval-seconds": time.perf_counter() - start,
    }
    content = RecordDict({wire.METRICS: MetricRecord(metrics)})
    if config.pooled_metrics:
        content[wire.MOMENTS] = wire.pack_moments(moments)
    return content


def _save_labelled(client: ClientRound, images: torch.Tensor, requested: torch.Tensor, path: Path) -> None:
    """Up to 64 generated images, every requested label in turn, shown grouped by what they were
    generated for and labelled with it: the class name, or the requested attributes present
    (their first 24 characters)."""
    table = load_table(client.config)
    if requested.ndim == 1:
        labels = [table.class_names[int(y)] for y in requested]
    else:
        labels = [", ".join(n for n, a in zip(table.attribute_names, row) if a)[:24] or "(none)" for row in requested]
    rank, seen = [], {}
    for label in labels:  # the k-th image requested with its label
        rank.append(seen.get(label, 0))
        seen[label] = rank[-1] + 1
    shown = sorted(range(len(labels)), key=lambda i: (rank[i], labels[i]))[:64]  # every label in turn
    order = sorted(shown, key=lambda i: (labels[i], rank[i]))
    save_labelled_grid(images[order], [labels[i] for i in order], path)


def _feature_network(client: ClientRound, content: RecordDict) -> tuple[FeatureClassifier, str]:
    """The fd_classifier network of an evaluate message, validated, and its identity."""
    record = content.array_records.get(wire.FEATURE_NETWORK)
    if record is None:
        raise wire.UploadRejected(f"evaluate message without a {wire.FEATURE_NETWORK} record")
    state = wire.unpack_feature_network(record, client.image_shape[0])
    return classifier_from_state(state), weights_digest(state)


def _quality(
    client: ClientRound, classifier: tuple[FeatureClassifier, str], images: torch.Tensor, requested: torch.Tensor | None
) -> tuple[dict[str, float], dict[str, tuple]]:
    """Distances between the generated images and the held-out images on every available
    feature network (the held-out features are cached), the conditioning metrics on the
    fd_classifier network, and for the pooled row the moments {"<network>-<real|generated>":
    (mean (d,), covariance (d, d))} of both sets' features."""
    config = client.config
    weights = resolved_weights(config.fid_weights, config.fcd_weights)
    networks = load_feature_networks(*classifier, weights)
    cache_dir = client.state.directory / ".cache" / "features"
    key = f"{partition_key(config)}:client-{client.partition_id}:held-out"
    quality, moments = {}, {}
    for network in networks:
        real = cached_features(network, client.data.held_out, cache_dir, key)
        fake = network.features(images)
        quality.update(named_distances(network.fd_name, network.kid_name, real, fake))
        for kind, features in (("real", real), ("generated", fake)):
            m = feature_moments(features)
            moments[f"{network.name}-{kind}"] = (m.mean, m.covariance)
    names = conditioning_metric_names(config, condition_sizes(config)[0])
    columns = group_columns(config, client.group) if client.group is not None else None
    quality.update(conditioning_scores(networks[0].module, images, requested, client.data, names, columns))
    return quality, moments
