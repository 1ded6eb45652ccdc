"""The FedAvg baseline on the server: validation of replies, then Flower's weighted average."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from collafuse_flwr import wire
from collafuse_flwr.config import RunConfig
from collafuse_flwr.diffusion.models import Denoiser, build_denoiser
from collafuse_flwr.run_dir import RunDirectory
from collafuse_flwr.strategies.fedavg import FedAvgDiffusion
from exchange import answer, send_train
from test_wire import RUN_KEY, train_metrics


def _strategy(run_config, tmp_path) -> FedAvgDiffusion:
    config = RunConfig.from_flower(dict(run_config, strategy="fedavg"))
    model = Denoiser(build_denoiser(config.image_size, 1, config.block_channels), 1e-3, 0.995)
    return FedAvgDiffusion(config, RunDirectory(tmp_path), RUN_KEY, model, [], {})


def _client_weights(reference: ArrayRecord, shift: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(int(shift * 100))
    return {k: v.numpy() + shift + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in reference.items()}


def _content(weights: dict, pid: int, n: int, **metrics) -> RecordDict:
    metrics = train_metrics(pid, n, **metrics)
    return RecordDict({wire.WEIGHTS: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()}),
                       wire.METRICS: MetricRecord(metrics)})


def test_aggregation_is_the_weighted_mean_of_the_accepted_clients(tiny_run_config, tmp_path, task_identity):
    strategy = _strategy(dict(tiny_run_config, **{"num-clients": 8, "max-uploads-per-client": 1000}), tmp_path)
    sent = strategy.initial_arrays()
    messages = send_train(strategy, range(10, 18), arrays=sent)
    counts = {0: 10, 1: 30, 2: 60}
    weights = {pid: _client_weights(sent, 0.1 * (pid + 1)) for pid in counts}
    key = next(iter(sent.keys()))
    nan = dict(weights[0], **{key: np.full(sent[key].shape, np.nan, np.float32)})
    wrong_shape = dict(weights[0], **{key: np.zeros((3,), np.float32)})
    leaking = _content(weights[1], 4, 20)
    leaking["uploads"] = ArrayRecord({"x_cut": Array(np.zeros((2, 1, 8, 8), np.float16))})
    # declares the full shape and carries one value (broadcast into the average if trusted)
    declared = _content(weights[0], 6, 20)
    one = Array(np.full((1,), 999.99, np.float32))
    declared[wire.WEIGHTS][key] = Array(
        dtype="float32", shape=tuple(sent[key].shape), stype="numpy.ndarray", data=one.data
    )
    lacking = _content(weights[0], 7, 20)
    del lacking[wire.METRICS]["flops-train"]  # Flower's FedAvg would raise InconsistentMessageReplies
    replies = [answer(messages[10 + pid], _content(w, pid, counts[pid])) for pid, w in weights.items()] + [
        answer(messages[13], _content(nan, 3, 500)),
        answer(messages[14], leaking),
        answer(messages[15], _content(wrong_shape, 5, 500)),
        answer(messages[16], declared),
        answer(messages[17], lacking),
        answer(messages[15], _content(weights[2], 2, 60)),  # claims another node's partition
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    total = sum(counts.values())
    for name in sent.keys():
        expected = sum(counts[pid] * weights[pid][name] for pid in counts) / total
        np.testing.assert_allclose(arrays[name].numpy(), expected, rtol=1e-5, atol=1e-6)
    state = strategy.model.state()
    np.testing.assert_allclose(state[key].numpy(), arrays[key].numpy())
    table = pd.read_csv(tmp_path / "metrics.csv", dtype={"client": str})
    assert sorted(table[table["metric"] == "train-fault-rejected"]["client"]) == ["3", "4", "5", "5", "6", "7"]
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


def test_one_clients_share_of_the_average_is_bounded_by_the_cap(tiny_run_config, tmp_path, task_identity):
    """The server cannot see a client's data: num-examples is only bounded, by
    max-uploads-per-client = cap, so one client's share is at most cap / (cap + the others')."""
    cap = 100
    strategy = _strategy(dict(tiny_run_config, **{"max-uploads-per-client": cap}), tmp_path)
    sent = strategy.initial_arrays()
    messages = send_train(strategy, range(10, 15), arrays=sent)
    key = next(iter(sent.keys()))
    weights = {pid: _client_weights(sent, float(pid)) for pid in range(5)}
    claims = {0: 100_000, 1: cap, 2: 10, 3: 10, 4: 10}
    replies = [answer(messages[10 + pid], _content(weights[pid], pid, n)) for pid, n in claims.items()]
    arrays, _ = strategy.aggregate_train(1, replies)
    accepted = {pid: n for pid, n in claims.items() if n <= cap}
    expected = sum(n * weights[pid][key] for pid, n in accepted.items()) / sum(accepted.values())
    np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert cap / sum(accepted.values()) == cap / (cap + 30)  # the largest share a client can take
    table = pd.read_csv(tmp_path / "metrics.csv", dtype={"client": str})
    assert table[table["metric"] == "train-fault-rejected"]["client"].tolist() == ["0"]
