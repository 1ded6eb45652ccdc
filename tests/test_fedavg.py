"""The FedAvg baseline on the server: validation of replies, then Flower's weighted average."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from collafuse_flwr import wire
from collafuse_flwr.config import RunConfig
from collafuse_flwr.models import Denoiser, build_denoiser
from collafuse_flwr.strategies.fedavg import FedAvgDiffusion


def _reply(node: int, content: RecordDict) -> Message:
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node,
                  message_type="train")
    return Message(content, reply_to=msg)


def _strategy(run_config, tmp_path) -> FedAvgDiffusion:
    config = RunConfig.from_flower(dict(run_config, strategy="fedavg"))
    model = Denoiser(build_denoiser(config.image_size, 1, config.block_channels), 1e-3, 0.995)
    return FedAvgDiffusion(config, tmp_path, model, tmp_path / "f", [], {})


def _client_weights(reference: ArrayRecord, shift: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(int(shift * 100))
    return {k: v.numpy() + shift + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in reference.items()}


def _content(weights: dict, pid: int, n: int) -> RecordDict:
    metrics = {"partition-id": pid, "num-examples": n, "train-loss": 0.1, "images-seen": 64,
               "train-seconds": 1.0, "nfe-train": 64.0, "flops-train": 1e6}
    return RecordDict({wire.WEIGHTS: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()}),
                       wire.METRICS: MetricRecord(metrics)})


def test_aggregation_is_the_weighted_mean_of_the_accepted_clients(tiny_run_config, tmp_path, task_identity):
    strategy = _strategy(tiny_run_config, tmp_path)
    sent = strategy.initial_arrays()
    strategy.sent_weights = sent
    counts = {0: 10, 1: 30, 2: 60}
    weights = {pid: _client_weights(sent, 0.1 * (pid + 1)) for pid in counts}
    key = next(iter(sent.keys()))
    nan = dict(weights[0], **{key: np.full(sent[key].shape, np.nan, np.float32)})
    wrong_shape = dict(weights[0], **{key: np.zeros((3,), np.float32)})
    leaking = _content(weights[1], 4, 20)
    leaking["uploads"] = ArrayRecord({"x_cut": Array(np.zeros((2, 1, 8, 8), np.float16))})
    replies = [_reply(10 + pid, _content(w, pid, counts[pid])) for pid, w in weights.items()] + [
        _reply(13, _content(nan, 3, 500)),
        _reply(14, leaking),
        _reply(15, _content(wrong_shape, 3, 500)),
        _reply(16, _content(weights[2], 2, 60)),  # another node claims partition 2
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    total = sum(counts.values())
    for name in sent.keys():
        expected = sum(counts[pid] * weights[pid][name] for pid in counts) / total
        np.testing.assert_allclose(arrays[name].numpy(), expected, rtol=1e-5, atol=1e-6)
    state = strategy.model.state()
    np.testing.assert_allclose(state[key].numpy(), arrays[key].numpy())
    table = pd.read_csv(tmp_path / "metrics.csv", dtype={"client": str})
    assert sorted(table[table["metric"] == "train-fault-rejected"]["client"]) == ["node-13", "node-14", "node-15", "node-16"]
    assert sorted(table[table["metric"] == "bytes-up-train"]["client"]) == ["0", "1", "2"]


def test_evaluation_sends_the_averaged_ema_weights(tiny_run_config, tmp_path):
    strategy = _strategy(dict(tiny_run_config, **{"num-server-rounds": 1}), tmp_path)
    with torch.no_grad():
        for shadow in strategy.model.ema.shadow_params:
            shadow.add_(1.0)
    sampling = wire.pack_weights(strategy.model.sampling_state())
    state = strategy.model.state()
    for name, value in sampling.items():
        np.testing.assert_allclose(value.numpy(), state["ema." + name[4:]].numpy())
