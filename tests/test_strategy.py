"""The server side: which uploads reach the server's optimizer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from collafuse_flwr import wire
from collafuse_flwr.config import RunConfig
from collafuse_flwr.metrics.distances import feature_distances
from collafuse_flwr.metrics.features import FeatureNetwork
from collafuse_flwr.models import Denoiser, build_denoiser
from collafuse_flwr.strategies.collafuse import CollaFuseStrategy


def _reply(node: int, content: RecordDict) -> Message:
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node,
                  message_type="train")
    return Message(content, reply_to=msg)


def _strategy(run_config, tmp_path, networks=()) -> CollaFuseStrategy:
    config = RunConfig.from_flower(run_config)
    net = build_denoiser(config.image_size, 1, config.block_channels)
    return CollaFuseStrategy(
        config, tmp_path, Denoiser(net, 1e-3, 0.0), (1, 8, 8), tmp_path / "f", list(networks), {}
    )


def test_only_valid_uploads_are_pooled_and_trained_on(tiny_run_config, tmp_path, task_identity):
    strategy = _strategy(tiny_run_config, tmp_path)
    good = wire.pack_uploads(torch.zeros(5, 1, 8, 8), "float16", {
        "partition-id": 0, "num-examples": 5, "train-loss": 0.5, "images-seen": 64, "train-seconds": 1.0})
    wrong_dtype = wire.pack_uploads(torch.zeros(5, 1, 8, 8), "float32", {
        "partition-id": 1, "num-examples": 5, "train-loss": 0.5, "images-seen": 64, "train-seconds": 1.0})
    leaking = wire.pack_uploads(torch.zeros(5, 1, 8, 8), "float16", {
        "partition-id": 2, "num-examples": 5, "train-loss": 0.5, "images-seen": 64, "train-seconds": 1.0})
    leaking["eps"] = ArrayRecord({"eps": Array(np.zeros((5, 1, 8, 8), np.float32))})
    stolen_id = wire.pack_uploads(torch.zeros(3, 1, 8, 8), "float16", {
        "partition-id": 0, "num-examples": 3, "train-loss": 0.5, "images-seen": 64, "train-seconds": 1.0})
    replies = [_reply(10, good), _reply(11, wrong_dtype), _reply(12, leaking), _reply(13, stolen_id)]
    _, summary = strategy.aggregate_train(1, replies)
    assert sorted(strategy.uploads) == [0] and strategy.uploads[0].shape == (5, 1, 8, 8)
    assert 5 * 64 * 2 < summary["bytes-uploaded"] < 5 * 64 * 2 + 1024  # float16 payload + envelope
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    rejected = metrics[metrics["metric"] == "rejected"]["client"].tolist()
    assert sorted(rejected) == ["node-11", "node-12", "node-13"]
    server = metrics[metrics["client"] == "server"].set_index("metric")["value"]
    assert server["pool-size"] == 5 and server["images-seen"] == 64
    assert (tmp_path / "checkpoints" / "server" / "config.json").exists()


class Pixels(torch.nn.Module):
    num_features = 16


def test_evaluation_replies_are_validated_and_pooled(tiny_run_config, tmp_path, task_identity):
    network = FeatureNetwork("pixels", Pixels(), "fd_pixels", "kid_pixels", "v1")
    strategy = _strategy(dict(tiny_run_config, **{"disclosure-num-images": 0}), tmp_path, [network])
    strategy.parties.partition_of = {10: 0, 11: 1, 12: 2, 13: 3}
    g = torch.Generator().manual_seed(0)
    feats = lambda n, d=16: torch.randn(n, d, generator=g)

    def reply(node, pid, features):
        content = RecordDict({wire.METRICS: MetricRecord({"partition-id": pid, "fd_pixels": 1.0})})
        content[wire.FEATURES] = wire.pack_features(features)
        return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type="evaluate"))

    first = {"pixels-real": feats(6), "pixels-generated": feats(8)}
    second = {"pixels-real": feats(7), "pixels-generated": feats(8) + 1}
    replies = [
        reply(10, 0, first), reply(11, 1, second),
        reply(12, 2, {"pixels-real": feats(6, 15), "pixels-generated": feats(8, 15)}),  # wrong size
        reply(13, 0, first),  # claims another node's partition
        reply(13, 3, {"pixels-real": feats(6), "pixels-generated": feats(9)}),  # more than eval-num-samples
    ]
    strategy.aggregate_evaluate(1, replies)
    metrics = pd.read_csv(tmp_path / "metrics.csv", dtype={"client": str})
    assert sorted(metrics[metrics["metric"] == "evaluation-rejected"]["client"]) == ["2", "3", "3"]
    pooled = metrics[metrics["client"] == "pooled"].set_index("metric")["value"]
    expected = feature_distances(torch.cat([first["pixels-real"], second["pixels-real"]]),
                                 torch.cat([first["pixels-generated"], second["pixels-generated"]]))
    assert pooled["num-generated"] == 16 and pooled["num-real"] == 13
    assert abs(pooled["fd_pixels"] - expected["fd"]) < 1e-4 * expected["fd"]
    assert (tmp_path / "summary.json").exists()
