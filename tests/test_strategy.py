"""The server side: which uploads reach the server's optimizer, and client faults."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

from collafuse_flwr import wire
from collafuse_flwr.config import RunConfig
from collafuse_flwr.diffusion.models import Denoiser, build_denoiser
from collafuse_flwr.run_dir import RunDirectory
from collafuse_flwr.strategies import collafuse
from collafuse_flwr.strategies.collafuse import CollaFuseStrategy
from collafuse_flwr.strategies.parties import RoundFailed
from exchange import answer, send_train
from test_wire import RUN_KEY, train_metrics


def _strategy(run_config, tmp_path, networks=()) -> CollaFuseStrategy:
    config = RunConfig.from_flower(run_config)
    net = build_denoiser(config.image_size, 1, config.block_channels)
    return CollaFuseStrategy(
        config, RunDirectory(tmp_path), RUN_KEY, Denoiser(net, 1e-3, 0.0), (1, 8, 8), list(networks), {}
    )


def _upload(pid: int, n: int = 5, value: float = 0.0, dtype: str = "float16", **metrics) -> RecordDict:
    return wire.pack_uploads(torch.full((n, 1, 8, 8), value), dtype, train_metrics(pid, n, **metrics))


def _carrying(payload: np.ndarray | bytes) -> RecordDict:
    """An upload that declares five float16 images (5, 1, 8, 8) and carries `payload`."""
    data = payload if isinstance(payload, bytes) else Array(payload).data
    content = _upload(1)
    content[wire.UPLOADS][wire.UPLOAD_KEY] = Array(
        dtype="float16", shape=(5, 1, 8, 8), stype="numpy.ndarray", data=data
    )
    return content


def _without(metric: str) -> RecordDict:
    content = _upload(1)
    del content[wire.METRICS][metric]
    return content


def _with(record: str, value) -> RecordDict:
    content = _upload(1)
    content[record] = value
    return content


def _with_array(key: str, array: np.ndarray) -> RecordDict:
    content = _upload(1)
    content[wire.UPLOADS][key] = Array(array)
    return content


def _declaring(n: int, sent: int) -> RecordDict:
    content = _upload(1, n=sent)
    content[wire.METRICS]["num-examples"] = n
    return content


HOSTILE = {
    "wrong-shape": wire.pack_uploads(torch.zeros(5, 3, 8, 8), "float16", train_metrics(1, 5)),
    "wrong-dtype": _upload(1, dtype="float32"),
    "nan": _upload(1, value=float("nan")),
    "inf": _upload(1, value=float("inf")),
    "out-of-range": _upload(1, value=50.0),
    "more-than-declared": _declaring(3, sent=5),
    "above-cap": _upload(1, n=9),
    "eps-record": _with("eps", ArrayRecord({"eps": Array(np.zeros((5, 1, 8, 8), np.float32))})),
    "t-record": _with("t", MetricRecord({"t": [20] * 5})),
    "labels-record": _with("labels", MetricRecord({"labels": [0, 1, 0, 1, 0]})),
    "eps-beside-x_cut": _with_array("eps", np.zeros((5, 1, 8, 8), np.float16)),
    "labels-metric": _upload(1, labels=[0, 1, 0, 1, 0]),
    "another-node's-partition": _upload(0, n=3),
    "partition-out-of-range": _upload(7),
    # what an array declares is not what it carries: checks read the decoded values
    **{f"declared-float16-carries-{kind}": _carrying(np.zeros((5, 1, 8, 8), kind))
       for kind in ("float32", "int8", "bool")},
    "declared-5-carries-500": _carrying(np.zeros((500, 1, 8, 8), np.float16)),
    "declared-1-channel-carries-3": _carrying(np.zeros((5, 3, 8, 8), np.float16)),
    "not-npy-bytes": _carrying(b"\x93NUMPY garbage"),
    # every metric required, a finite number of its kind, in range
    "no-images-seen": _without("images-seen"),
    "no-train-loss": _without("train-loss"),
    "list-metric": _upload(1, **{"train-loss": [0.5, 0.5]}),
    "nan-metric": _upload(1, **{"train-loss": float("nan")}),
    "inf-metric": _upload(1, **{"flops-train": float("inf")}),
    "negative-metric": _upload(1, **{"train-seconds": -1.0}),
    "float-count": _upload(1, **{"images-seen": 64.0}),
    "over-budget": _upload(1, **{"images-seen": 10**6}),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_uploads_never_reach_the_server_optimizer(case, tiny_run_config, tmp_path, task_identity,
                                                          monkeypatch):
    """Each kind of broken or hostile upload is rejected and logged for its client; the server
    trains on exactly the valid upload."""
    trained_on = []
    original = collafuse.train_for_images

    def recording(denoiser, data, *args):
        trained_on.append(data.clone())
        return original(denoiser, data, *args)

    monkeypatch.setattr(collafuse, "train_for_images", recording)
    strategy = _strategy(dict(tiny_run_config, **{"max-uploads-per-client": 8}), tmp_path)
    sent = send_train(strategy, [10, 11])
    good = _upload(0, value=0.25)
    _, summary = strategy.aggregate_train(1, [answer(sent[10], good), answer(sent[11], HOSTILE[case])])
    assert sorted(strategy.uploads) == [0] and summary["clients-accepted"] == 1
    assert len(trained_on) == 1 and torch.equal(trained_on[0], torch.full((5, 1, 8, 8), 0.25))
    assert 5 * 64 * 2 < summary["bytes-uploaded"] < 5 * 64 * 2 + 1024  # float16 payload + envelope
    metrics = pd.read_csv(tmp_path / "metrics.csv", dtype={"client": str})
    faults = metrics[metrics["metric"].str.contains("fault")]
    assert faults[["client", "metric"]].values.tolist() == [["1", "train-fault-rejected"]]
    assert "node 11) rejected" in (tmp_path / "log.txt").read_text()
    server = metrics[metrics["client"] == "server"].set_index("metric")["value"]
    assert server["pool-size"] == 5 and server["images-seen"] == 64


def test_client_faults_do_not_stop_a_round(tiny_run_config, tmp_path, task_identity):
    """A client that raised and one that never replied (timed out, vanished) are logged with
    their reasons and recorded; the round goes on with the replies it has (min-replies = 2)."""
    strategy = _strategy(dict(tiny_run_config, **{"min-replies": 2}), tmp_path)
    sent = send_train(strategy, [10, 11, 12, 13])
    replies = [answer(sent[10], _upload(0)), answer(sent[11], _upload(1)),
               Message(Error(code=0, reason="CUDA out of memory"), reply_to=sent[12])]
    _, summary = strategy.aggregate_train(1, replies)
    assert summary["clients-accepted"] == 2 and sorted(strategy.uploads) == [0, 1]
    metrics = pd.read_csv(tmp_path / "metrics.csv", dtype={"client": str})
    faults = metrics[metrics["metric"].str.contains("fault")]
    assert sorted(faults[["client", "metric"]].values.tolist()) == [
        ["2", "train-fault-raised"], ["3", "train-fault-missing"]]
    log = (tmp_path / "log.txt").read_text()
    assert "CUDA out of memory" in log and "no reply within round-timeout-seconds" in log


def test_a_reply_the_superlink_makes_for_an_offline_node_counts_that_node_missing(
        tiny_run_config, tmp_path, task_identity):
    """In a deployment the SuperLink answers the message of a node it considers offline with an
    error reply from its own node id (1) that names the message: the node it speaks for is
    missing (with the SuperLink's reason), not "node-1" rejected, and the others count."""
    strategy = _strategy(dict(tiny_run_config, **{"min-replies": 1}), tmp_path)
    sent = send_train(strategy, [10, 11])
    offline = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node is not available."), reply_to=sent[11])
    offline.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
    _, summary = strategy.aggregate_train(1, [answer(sent[10], _upload(0)), offline])
    assert summary["clients-accepted"] == 1 and sorted(strategy.uploads) == [0]
    assert _faults(tmp_path) == [["1", "train-fault-missing"]]
    assert "client 1 (node 11) missing: the SuperLink answered for it: Node is not available." in (
        tmp_path / "log.txt").read_text()


def test_too_few_replies_stop_the_run(tiny_run_config, tmp_path, task_identity):
    strategy = _strategy(dict(tiny_run_config, **{"min-replies": 3}), tmp_path)
    sent = send_train(strategy, [10, 11, 12])
    with pytest.raises(RoundFailed, match="2 accepted replies, min-replies=3"):
        strategy.aggregate_train(1, [answer(sent[10], _upload(0)), answer(sent[11], _upload(1))])


@pytest.mark.parametrize("policy,views", [("once", 1), ("fresh", 3)])
def test_views_per_image_that_left_each_client_are_counted(policy, views, tiny_run_config, tmp_path, task_identity):
    """Three rounds of client 0's real training replies: under `once` every upload is the same
    view (1 per image), under `fresh` each round adds one; the effective SNR is
    K abar_r / (1 - abar_r). Counted with the attacks switched off too."""
    from collafuse_flwr import client_app
    from test_wire import client_context

    run_config = dict(tiny_run_config, **{"noise-policy": policy, "disclosure-num-images": 0, "num-server-rounds": 3})
    strategy = _strategy(run_config, tmp_path)
    for server_round in (1, 2, 3):
        sent = send_train(strategy, [10], server_round)
        reply = client_app.train(sent[10], client_context(run_config, tmp_path / "client"))
        strategy.aggregate_train(server_round, [reply])
    abar = float(strategy.protocol.schedule.alpha_bar[strategy.config.t_zeta])
    rows = dict(((client, metric), value) for client, metric, value in strategy.audit.view_rows())
    assert rows[("0", "views-per-image")] == views
    assert rows[("0", "effective-snr")] == pytest.approx(views * abar / (1 - abar))


def _faults(tmp_path) -> list[list[str]]:
    metrics = pd.read_csv(tmp_path / "metrics.csv", dtype={"client": str})
    return sorted(metrics[metrics["metric"].str.contains("fault")][["client", "metric"]].values.tolist())


def test_a_node_keeps_the_partition_assigned_in_its_first_message(tiny_run_config, tmp_path, task_identity):
    """The server assigns partitions with its first message; a squatter claiming another
    node's partition, even answering first, is rejected, and the honest node keeps its own in
    every later round."""
    strategy = _strategy(dict(tiny_run_config, **{"num-server-rounds": 2}), tmp_path)
    for server_round in (1, 2):
        sent = send_train(strategy, [30, 20], server_round)
        assert {n: m.content.config_records["config"]["partition-id"] for n, m in sent.items()} == {20: 0, 30: 1}
        assert all(m.content.config_records["config"]["run-key"] == RUN_KEY for m in sent.values())
        replies = [answer(sent[30], _upload(0, value=0.5)), answer(sent[20], _upload(0, value=0.25))]
        strategy.aggregate_train(server_round, replies)
        assert torch.equal(strategy.uploads[0], torch.full((5, 1, 8, 8), 0.25)) and sorted(strategy.uploads) == [0]
    assert _faults(tmp_path) == [["1", "train-fault-rejected"]] * 2


def test_replies_to_messages_not_sent_are_rejected(tiny_run_config, tmp_path, task_identity):
    """A reply from a node that was sent nothing, a reply to last round's message, and a second
    reply from one node are each rejected; the node's own reply counts once."""
    strategy = _strategy(dict(tiny_run_config, **{"num-server-rounds": 2}), tmp_path)
    first = send_train(strategy, [10, 11], 1)
    strategy.aggregate_train(1, [answer(first[10], _upload(0)), answer(first[11], _upload(1))])
    second = send_train(strategy, [10, 11], 2)
    stranger = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=99, message_type="train")
    stranger.metadata.__dict__["_message_id"] = "forged"
    replies = [answer(second[10], _upload(0, value=0.5)), answer(second[10], _upload(0, value=0.75)),
               answer(first[11], _upload(1, value=0.5)), answer(stranger, _upload(1, value=0.5))]
    _, summary = strategy.aggregate_train(2, replies)
    assert summary["clients-accepted"] == 1
    assert torch.equal(strategy.uploads[0], torch.full((5, 1, 8, 8), 0.5))
    assert torch.equal(strategy.uploads[1], torch.zeros(5, 1, 8, 8))  # its round-1 upload
    log = (tmp_path / "log.txt").read_text()
    assert "a second reply" in log and log.count("answers no message sent to this node") == 2
    assert ["1", "train-fault-missing"] in _faults(tmp_path)
