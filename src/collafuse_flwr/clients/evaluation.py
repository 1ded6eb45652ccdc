"""A client's evaluation reply, for every client behaviour: its generated images saved below
its own state directory, their quality against its held-out images on every available feature
network, the cost of its sampling steps, and (pooled-metrics) per feature network the mean and
covariance of both sets' features for the server's pooled row: statistics of each set, never
one image's features; and whether the images show the requested conditions
(metrics/conditioning.py). What it releases, of how many images and on which networks, is the
client's decision, settled before any work (clients/release.py)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DModel
from flwr.app import Context, Message, MetricRecord, RecordDict

from collafuse_flwr import wire
from collafuse_flwr.clients.release import Release, evaluation_release, own_context
from collafuse_flwr.clients.round import ClientRound
from collafuse_flwr.data import condition_sizes, group_columns, load_table, partition_key
from collafuse_flwr.metrics.conditioning import conditioning_metric_names, conditioning_scores
from collafuse_flwr.metrics.cost import sampling_cost
from collafuse_flwr.metrics.distances import feature_moments, named_distances
from collafuse_flwr.metrics.features import cached_features, load_feature_networks
from collafuse_flwr.metrics.manifold import manifold_metrics
from collafuse_flwr.outputs import save_grid, save_labelled_grid


@dataclass(frozen=True)
class EvaluationRound(ClientRound):
    """The round context of an evaluate message: a `ClientRound` (built on the run config as
    this client reads it, `own_context`) with what the client releases (`Release`)."""

    release: Release

    @classmethod
    def from_message(cls, msg: Message, context: Context) -> EvaluationRound:
        """`ClientRound.from_message`, then this client's `evaluation_release` for the message:
        an untrusted feature network, pretrained weights it lacks or too few images refuse here,
        before any sampling or statistic."""
        client = ClientRound.from_message(msg, own_context(context))
        fields = {field.name: getattr(client, field.name) for field in dataclasses.fields(client)}
        return cls(**fields, release=evaluation_release(context.node_config, client, msg.content))


def evaluation_reply(
    client: EvaluationRound, images: torch.Tensor, requested: torch.Tensor | None,
    net: UNet2DModel | None, steps: int, sample_seconds: float,
) -> RecordDict:
    """Save the client's generated `images` (n, C, H, W) in [-1, 1] as a grid and report their
    quality against the client's held-out images (on the networks of `client.release`: the
    fd_classifier network of the evaluate message, trusted, and the client's own pretrained
    ones the server named), how well they show the `requested` raw conditions they were
    generated for (None: unconditional), and the cost of the `steps` sampling steps the client
    ran with `net` (none when `net` is None). Refused (`ClientStateError`, nothing computed)
    when either set is below the client's minimum (`Release.check_counts`). With pooled-metrics
    the reply adds, per feature network whose moments the client releases
    (`Release.releases_moments`), the mean and covariance of the held-out and of the generated
    images' features (`wire.pack_moments`): statistics of each set, never a per-image feature."""
    config, partition_id = client.config, client.partition_id
    client.release.check_counts(len(client.data.held_out), len(images))
    name = f"round-{client.server_round:03d}-client-{partition_id}"
    save_grid(images, client.samples_dir / f"{name}.png")
    if requested is not None:
        _save_labelled(client, images, requested, client.samples_dir / f"{name}-labelled.png")
    start = time.perf_counter()
    quality, moments = _quality(client, images, requested)
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


def _quality(
    client: EvaluationRound, images: torch.Tensor, requested: torch.Tensor | None
) -> tuple[dict[str, float], dict[str, tuple]]:
    """Distances between the generated images and the held-out images on every network of the
    client's release (the held-out features are cached) and their precision, recall, density
    and coverage (metrics/manifold.py: four numbers, of sets large enough), the conditioning
    metrics on the fd_classifier network, and for the pooled row the moments {"<network>-<real|generated>":
    (mean (d,), covariance (d, d))} of both sets' features of each network whose moments the
    client releases."""
    config, release = client.config, client.release
    networks = load_feature_networks(release.classifier, release.classifier_digest, release.weights)
    cache_dir = client.state.directory / ".cache" / "features"
    key = f"{partition_key(config)}:client-{client.partition_id}:held-out"
    quality, moments = {}, {}
    for network in networks:
        real = cached_features(network, client.data.held_out, cache_dir, key)
        fake = network.features(images)
        quality.update(named_distances(network.fd_name, network.kid_name, real, fake))
        quality.update(manifold_metrics(network.name, real, fake))
        if release.releases_moments(network.module.num_features, len(real), len(fake)):
            for kind, features in (("real", real), ("generated", fake)):
                m = feature_moments(features)
                moments[f"{network.name}-{kind}"] = (m.mean, m.covariance)
    names = conditioning_metric_names(config, condition_sizes(config)[0])
    columns = group_columns(config, client.group) if client.group is not None else None
    quality.update(conditioning_scores(networks[0].module, images, requested, client.data, names, columns))
    return quality, moments
