"""What a client sends, and what the server accepts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from collafuse_flwr import client_app, wire
from collafuse_flwr.config import RunConfig
from collafuse_flwr.data import client_data
from collafuse_flwr.schedule import CutSchedule


def train_reply(run_config: dict, run_dir, partition_id: int = 0, server_round: int = 1) -> Message:
    msg = Message(
        RecordDict({"config": ConfigRecord({"server-round": server_round, "run-dir": str(run_dir)})}),
        dst_node_id=1,
        message_type="train",
    )
    context = Context(
        run_id=1, node_id=1, state=RecordDict(), run_config=run_config,
        node_config={"partition-id": partition_id, "num-partitions": run_config["num-clients"]},
    )
    return client_app.train(msg, context)


def test_train_reply_holds_only_cut_point_uploads(tiny_run_config, tmp_path, task_identity):
    reply = train_reply(tiny_run_config, tmp_path)
    content = reply.content
    assert set(content.keys()) == {wire.UPLOADS, wire.METRICS}
    assert list(content.array_records[wire.UPLOADS].keys()) == [wire.UPLOAD_KEY]
    assert set(content.metric_records[wire.METRICS]) <= wire.TRAIN_METRIC_KEYS
    assert not content.config_records

    config = RunConfig.from_flower(tiny_run_config)
    data = client_data(config, 0)
    x_cut = content.array_records[wire.UPLOADS][wire.UPLOAD_KEY]
    assert x_cut.dtype == "float16"
    assert tuple(x_cut.shape) == tuple(data.train.shape)  # (n, C, H, W), one per image
    assert content.metric_records[wire.METRICS]["num-examples"] == data.train.shape[0]

    # the uploads are at the cut-point noise level: (x_cut - sqrt(abar_r) x0) / sqrt(1 - abar_r)
    # is standard normal noise, and the clean images are not recoverable from them alone
    abar = float(CutSchedule(config.timesteps, config.t_zeta).alpha_bar[config.t_zeta])
    residual = (torch.from_numpy(x_cut.numpy()).double() - abar**0.5 * data.train) / (1 - abar) ** 0.5
    assert abs(residual.mean()) < 0.05
    assert abs(residual.std() - 1) < 0.05
    # the private model stays on the client's disk and never enters the reply
    assert (tmp_path / "clients" / "client-0" / "round-001" / "config.json").exists()
    # the counted size is the serialised message content: the payload plus a small envelope
    assert x_cut.numpy().nbytes < wire.content_bytes(content) < x_cut.numpy().nbytes + 1024


def test_noise_policy_once_resends_the_same_upload(tiny_run_config, tmp_path, task_identity):
    first = train_reply(tiny_run_config, tmp_path, server_round=1)
    second = train_reply(tiny_run_config, tmp_path, server_round=2)
    get = lambda r: r.content.array_records[wire.UPLOADS][wire.UPLOAD_KEY].numpy()
    assert np.array_equal(get(first), get(second))
    fresh = dict(tiny_run_config, **{"noise-policy": "fresh"})
    third = train_reply(fresh, tmp_path / "fresh", server_round=3)
    assert not np.array_equal(get(first), get(third))


def test_local_only_sends_nothing(tiny_run_config, tmp_path, task_identity):
    config = dict(tiny_run_config, **{"t-zeta": tiny_run_config["timesteps"]})
    content = train_reply(config, tmp_path).content
    assert wire.UPLOADS not in content
    assert content.metric_records[wire.METRICS]["num-examples"] == 0


def _content(array: np.ndarray, declared: int, **extra) -> RecordDict:
    content = RecordDict(
        {
            wire.UPLOADS: ArrayRecord({wire.UPLOAD_KEY: Array(array)}),
            wire.METRICS: MetricRecord({"partition-id": 0, "num-examples": declared}),
        }
    )
    for key, value in extra.items():
        content[key] = value
    return content


@pytest.mark.parametrize(
    "array,declared,extra,reason",
    [
        (np.zeros((4, 1, 8, 8), np.float32), 4, {}, "dtype"),
        (np.zeros((4, 3, 8, 8), np.float16), 4, {}, "shape"),
        (np.zeros((4, 1, 8), np.float16), 4, {}, "shape"),
        (np.full((4, 1, 8, 8), np.nan, np.float16), 4, {}, "non-finite"),
        (np.full((4, 1, 8, 8), 100, np.float16), 4, {}, "exceeds"),
        (np.zeros((4, 1, 8, 8), np.float16), 3, {}, "declared"),
        (np.zeros((9, 1, 8, 8), np.float16), 9, {}, "cap"),
        (np.zeros((4, 1, 8, 8), np.float16), 4, {"eps": ArrayRecord({"eps": Array(np.zeros(2))})}, "unexpected"),
        (np.zeros((4, 1, 8, 8), np.float16), 4, {"labels": MetricRecord({"y": 1})}, "unexpected"),
    ],
)
def test_server_rejects_malformed_uploads(array, declared, extra, reason):
    with pytest.raises(wire.UploadRejected, match=reason):
        wire.unpack_uploads(_content(array, declared, **extra), (1, 8, 8), "float16", cap=8)


def test_server_accepts_a_valid_upload():
    x, metrics = wire.unpack_uploads(
        _content(np.ones((4, 1, 8, 8), np.float16), 4), (1, 8, 8), "float16", cap=8
    )
    assert x.dtype == torch.float32 and x.shape == (4, 1, 8, 8)
    assert metrics["num-examples"] == 4


def test_client_validates_the_handover():
    good = RecordDict({wire.HANDOVER: wire.pack_handover(torch.zeros(4, 1, 8, 8))})
    assert wire.unpack_handover(good, (1, 8, 8), max_count=4).shape == (4, 1, 8, 8)
    with pytest.raises(wire.UploadRejected, match="at most 2"):
        wire.unpack_handover(good, (1, 8, 8), max_count=2)
    with pytest.raises(wire.UploadRejected, match="shape"):
        wire.unpack_handover(good, (3, 8, 8), max_count=4)
    bad = RecordDict({wire.HANDOVER: wire.pack_handover(torch.full((4, 1, 8, 8), float("inf")))})
    with pytest.raises(wire.UploadRejected, match="non-finite"):
        wire.unpack_handover(bad, (1, 8, 8), max_count=4)


def test_fedavg_client_replies_with_its_trained_weights_only(tiny_run_config, tmp_path, task_identity):
    from collafuse_flwr.models import Denoiser, build_denoiser

    run_config = dict(tiny_run_config, strategy="fedavg")
    config = RunConfig.from_flower(run_config)
    sent = wire.pack_weights(Denoiser(build_denoiser(config.image_size, 1, config.block_channels), 1e-3,
                                      config.ema_decay).state())
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config=run_config,
                      node_config={"partition-id": 2, "num-partitions": config.num_clients})

    def message(arrays):
        return Message(RecordDict({wire.WEIGHTS: arrays, "config": ConfigRecord(
            {"server-round": 1, "run-dir": str(tmp_path)})}), dst_node_id=1, message_type="train")

    content = client_app.train(message(sent), context).content
    received, metrics = wire.unpack_weights(content, sent, config.max_uploads_per_client)
    assert set(content.keys()) == {wire.WEIGHTS, wire.METRICS} and not content.config_records
    assert metrics["num-examples"] == client_data(config, 2).train.shape[0]
    assert metrics["images-seen"] == config.client_images_per_round
    changed = [k for k in sent.keys() if not np.array_equal(sent[k].numpy(), received[k].numpy())]
    assert len(changed) > len(sent) // 2
    # what arrives on the client is checked before it is loaded
    key = next(iter(sent.keys()))
    for bad in (np.zeros((2,), np.float32), np.full(sent[key].shape, np.inf, np.float32),
                sent[key].numpy().astype(np.float16)):
        tampered = ArrayRecord({k: (Array(bad) if k == key else v) for k, v in sent.items()})
        with pytest.raises(wire.UploadRejected):
            client_app.train(message(tampered), context)


@pytest.mark.parametrize("change", ["missing", "extra", "shape", "dtype", "nan", "huge", "count", "record"])
def test_fedavg_replies_are_checked_against_the_sent_weights(change):
    sent = ArrayRecord({"net.a": Array(np.zeros((3, 2), np.float32)), "ema.a": Array(np.zeros((3, 2), np.float32))})
    arrays = {k: v.numpy().copy() for k, v in sent.items()}
    declared, extra_record = 4, False
    if change == "missing":
        arrays.pop("ema.a")
    elif change == "extra":
        arrays["eps"] = np.zeros((3, 2), np.float32)
    elif change == "shape":
        arrays["net.a"] = np.zeros((2, 3), np.float32)
    elif change == "dtype":
        arrays["net.a"] = np.zeros((3, 2), np.float64)
    elif change == "nan":
        arrays["net.a"][0, 0] = np.nan
    elif change == "huge":
        arrays["net.a"][0, 0] = 2 * wire.MAX_ABS_WEIGHT
    elif change == "count":
        declared = 0
    else:
        extra_record = True
    content = RecordDict({wire.WEIGHTS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          wire.METRICS: MetricRecord({"partition-id": 0, "num-examples": declared})})
    if extra_record:
        content["labels"] = ArrayRecord({"y": Array(np.zeros(4, np.int64))})
    with pytest.raises(wire.UploadRejected):
        wire.unpack_weights(content, sent, cap=100)
    ok = RecordDict({wire.WEIGHTS: sent, wire.METRICS: MetricRecord({"partition-id": 0, "num-examples": 4})})
    wire.unpack_weights(ok, sent, cap=100)
