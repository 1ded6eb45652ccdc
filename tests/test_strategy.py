"""The server side: which uploads reach the server's optimizer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from collafuse_flwr import wire
from collafuse_flwr.config import RunConfig
from collafuse_flwr.models import Denoiser, build_denoiser
from collafuse_flwr.strategies.collafuse import CollaFuseStrategy


def _reply(node: int, content: RecordDict) -> Message:
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node,
                  message_type="train")
    return Message(content, reply_to=msg)


def _strategy(run_config, tmp_path) -> CollaFuseStrategy:
    config = RunConfig.from_flower(run_config)
    net = build_denoiser(config.image_size, 1, config.block_channels)
    return CollaFuseStrategy(config, tmp_path, Denoiser(net, 1e-3, 0.0), (1, 8, 8), tmp_path / "f")


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
    assert summary["bytes-uploaded"] == 5 * 64 * 2
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    rejected = metrics[metrics["metric"] == "rejected"]["client"].tolist()
    assert sorted(rejected) == ["node-11", "node-12", "node-13"]
    server = metrics[metrics["client"] == "server"].set_index("metric")["value"]
    assert server["pool-size"] == 5 and server["images-seen"] == 64
    assert (tmp_path / "checkpoints" / "server" / "config.json").exists()
