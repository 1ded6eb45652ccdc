"""What a client sends, and what the server accepts."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from collafuse_flwr import client_app, wire
from collafuse_flwr.config import RunConfig
from collafuse_flwr.data import client_data
from collafuse_flwr.diffusion.schedule import CutSchedule

RUN_KEY = "5eed" * 8


def client_context(run_config: dict, state_root, **node_config) -> Context:
    """A simulated SuperNode's context whose private state lives below `state_root`, with
    `node_config` entries (kebab-case keys as keywords: share_conditions=True)."""
    extra = {key.replace("_", "-"): value for key, value in node_config.items()}
    return Context(
        run_id=1, node_id=1, state=RecordDict(), run_config=run_config,
        node_config={"num-partitions": run_config["num-clients"], "state-dir": str(state_root), **extra},
    )


def server_message(message_type: str, partition_id: int, server_round: int = 1, run_key: str = RUN_KEY,
                   **records) -> Message:
    """A message as the server sends it: the round, the assigned partition, the run key."""
    config = ConfigRecord({"server-round": server_round, "partition-id": partition_id, "run-key": run_key,
                           **records.pop("config", {})})
    return Message(RecordDict({"config": config, **records}), dst_node_id=1, message_type=message_type)


def train_metrics(partition_id: int = 0, n: int = 4, **overrides) -> dict:
    """A complete training reply's metrics."""
    return {"partition-id": partition_id, "num-examples": n, "train-loss": 0.5, "images-seen": 64,
            "train-seconds": 1.0, "nfe-train": 64.0, "flops-train": 1e6, **overrides}


def train_reply(run_config: dict, state_root, partition_id: int = 0, server_round: int = 1) -> Message:
    msg = server_message("train", partition_id, server_round)
    return client_app.train(msg, client_context(run_config, state_root))


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
    # the private model stays on the client's disk, below the root the client chose, and never
    # enters the reply
    assert (tmp_path / "partition-0" / "runs" / RUN_KEY / "round-001" / "config.json").exists()
    # the counted size is the serialised message content: the payload plus a small envelope
    assert x_cut.numpy().nbytes < wire.content_bytes(content) < x_cut.numpy().nbytes + 1024


@pytest.mark.parametrize("policy", ["once", "fresh"])
def test_noise_policy_once_resends_the_same_upload(policy, tiny_run_config, tmp_path, task_identity):
    run_config = dict(tiny_run_config, **{"num-server-rounds": 2, "noise-policy": policy})
    get = lambda r: r.content.array_records[wire.UPLOADS][wire.UPLOAD_KEY].numpy()
    first, second = (get(train_reply(run_config, tmp_path, server_round=r)) for r in (1, 2))
    assert np.array_equal(first, second) == (policy == "once")


def test_upload_noise_is_the_clients_secret(tiny_run_config, tmp_path, task_identity):
    """The same client state gives the same uploads; another client state (a fresh deployment
    of the same config) other noise; the secret is created on the client, readable by it alone,
    and is in no message."""
    get = lambda r: r.content.array_records[wire.UPLOADS][wire.UPLOAD_KEY].numpy()
    first = train_reply(tiny_run_config, tmp_path / "a")
    again = train_reply(tiny_run_config, tmp_path / "a")
    other = train_reply(tiny_run_config, tmp_path / "b")
    assert np.array_equal(get(first), get(again)) and not np.array_equal(get(first), get(other))
    secret = tmp_path / "a" / "partition-0" / "secret"
    assert len(secret.read_bytes()) == 32 and secret.stat().st_mode & 0o777 == 0o600
    from flwr.common.serde import recorddict_to_proto

    assert secret.read_bytes() not in recorddict_to_proto(first.content).SerializeToString()


@pytest.mark.parametrize("config,reason", [
    ({"run-key": "../../etc"}, "run-key"),
    ({"run-key": "/tmp/x" + "0" * 26}, "run-key"),
    ({"partition-id": 5}, "partition-id"),
    ({"partition-id": "0"}, "partition-id"),
    ({"server-round": 0}, "server-round"),
    ({"server-round": True}, "server-round"),
])
def test_client_checks_what_the_server_names(config, reason, tiny_run_config, tmp_path, task_identity):
    """A client's state lives below the root it chose: a message can name neither a path nor a
    partition or round outside the run's."""
    msg = server_message("train", 0)
    msg.content.config_records["config"].update(config)
    with pytest.raises(Exception, match=reason):
        client_app.train(msg, client_context(tiny_run_config, tmp_path / "state"))
    assert not list(tmp_path.glob("**/round-001"))


def test_local_only_sends_nothing(tiny_run_config, tmp_path, task_identity):
    config = dict(tiny_run_config, **{"t-zeta": tiny_run_config["timesteps"]})
    content = train_reply(config, tmp_path).content
    assert wire.UPLOADS not in content
    assert content.metric_records[wire.METRICS]["num-examples"] == 0


def _content(array: np.ndarray, declared: int, **extra) -> RecordDict:
    content = RecordDict(
        {
            wire.UPLOADS: ArrayRecord({wire.UPLOAD_KEY: Array(array)}),
            wire.METRICS: MetricRecord(train_metrics(n=declared)),
        }
    )
    for key, value in extra.items():
        content[key] = value
    return content


@pytest.mark.parametrize(
    "array,declared,extra,reason",
    [
        (np.zeros((4, 1, 8, 8), np.float32), 4, {}, "dtype"),
        (np.zeros((4, 3, 8, 8), np.float16), 4, {}, "shape|cap"),
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
        wire.unpack_uploads(_content(array, declared, **extra), (1, 8, 8), "float16", cap=8, images_per_round=64)


def test_server_accepts_a_valid_upload():
    x, metrics = wire.unpack_uploads(
        _content(np.ones((4, 1, 8, 8), np.float16), 4), (1, 8, 8), "float16", cap=8, images_per_round=64
    )
    assert x.dtype == torch.float32 and x.shape == (4, 1, 8, 8)
    assert metrics["num-examples"] == 4


def test_client_validates_the_handover():
    good = RecordDict({wire.HANDOVER: wire.pack_handover(torch.zeros(4, 1, 8, 8))})
    assert wire.unpack_handover(good, (1, 8, 8), max_count=4).shape == (4, 1, 8, 8)
    with pytest.raises(wire.UploadRejected, match="cap"):
        wire.unpack_handover(good, (1, 8, 8), max_count=2)
    with pytest.raises(wire.UploadRejected, match="shape"):
        wire.unpack_handover(good, (3, 8, 8), max_count=4)
    bad = RecordDict({wire.HANDOVER: wire.pack_handover(torch.full((4, 1, 8, 8), float("inf")))})
    with pytest.raises(wire.UploadRejected, match="non-finite"):
        wire.unpack_handover(bad, (1, 8, 8), max_count=4)


def _npy(shape: tuple, body: bytes, descr: str = "<f2", version: tuple = (1, 0)) -> Array:
    """An Array whose .npy bytes are a crafted header declaring `shape` of `descr`, then `body`."""
    header = io.BytesIO()
    write = {(1, 0): np.lib.format.write_array_header_1_0, (2, 0): np.lib.format.write_array_header_2_0}[version]
    write(header, {"descr": descr, "fortran_order": False, "shape": shape})
    return Array("float16", (4, 1, 8, 8), "numpy.ndarray", header.getvalue() + body)


@pytest.mark.parametrize("array,reason", [
    (_npy((2**35, 1, 8, 8), bytes(512)), "at most 512 values"),  # declares 4 TiB in a 512-byte body
    (_npy((2**62, 2**62, 1, 1), bytes(512)), "at most 512 values"),  # a product past int64
    (_npy((4, 1, 8, 8), bytes(100)), "100 bytes of values; .* needs 512"),  # fewer bytes than declared
    (_npy((2, 1, 8, 8), bytes(512)), "512 bytes of values; .* needs 256"),  # trailing bytes
    (_npy((-4, 1, 8, -8), bytes(512)), "at most 512 values"),  # negative dimensions
    (_npy((4, 1, 8, 8), bytes(512), descr="|O"), "dtype object"),  # a pickle
    (Array("float16", (4, 1, 8, 8), "numpy.ndarray", b"\x93NUMPY\x03\x00" + bytes(600)), "version"),
])
def test_declared_npy_sizes_are_checked_before_anything_is_allocated(array, reason):
    """A hostile reply's .npy header is checked against the cap and the bytes present before
    numpy allocates: a rejected upload (a recorded fault), never a MemoryError or a 4 TiB buffer."""
    content = RecordDict({wire.UPLOADS: ArrayRecord({wire.UPLOAD_KEY: array}),
                          wire.METRICS: MetricRecord(train_metrics(n=4))})
    tracemalloc.start()
    try:
        with pytest.raises(wire.UploadRejected, match=reason):
            wire.unpack_uploads(content, (1, 8, 8), "float16", cap=8, images_per_round=64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20
    good = _npy((4, 1, 8, 8), np.ones((4, 1, 8, 8), np.float16).tobytes(), version=(2, 0))
    assert wire.decode(good, "float16", 512, "x").tolist() == np.ones((4, 1, 8, 8)).tolist()


def test_fedavg_client_replies_with_its_trained_weights_only(tiny_run_config, tmp_path, task_identity):
    from collafuse_flwr.diffusion.models import Denoiser, build_denoiser

    run_config = dict(tiny_run_config, strategy="fedavg")
    config = RunConfig.from_flower(run_config)
    sent = wire.pack_weights(Denoiser(build_denoiser(config.image_size, 1, config.block_channels), 1e-3,
                                      config.ema_decay).state())
    context = client_context(run_config, tmp_path)

    def message(arrays):
        return server_message("train", 2, **{wire.WEIGHTS: arrays})

    content = client_app.train(message(sent), context).content
    received, metrics = wire.unpack_weights(content, sent, config.max_uploads_per_client,
                                            config.client_images_per_round)
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
                          wire.METRICS: MetricRecord(train_metrics(n=declared))})
    if extra_record:
        content["labels"] = ArrayRecord({"y": Array(np.zeros(4, np.int64))})
    with pytest.raises(wire.UploadRejected):
        wire.unpack_weights(content, sent, cap=100, images_per_round=64)
    ok = RecordDict({wire.WEIGHTS: sent, wire.METRICS: MetricRecord(train_metrics(n=4))})
    wire.unpack_weights(ok, sent, cap=100, images_per_round=64)


def _feature_network(**changes) -> ArrayRecord:
    from collafuse_flwr.metrics.classifier import FeatureClassifier

    state = {k: v.numpy() for k, v in FeatureClassifier(1, 10).state_dict().items()}
    for key, value in changes.items():
        if value is None:
            del state[key.replace("__", ".")]
        else:
            state[key.replace("__", ".")] = value
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


@pytest.mark.parametrize("changes,reason", [
    ({"head__weight": None}, "no head.weight"),
    ({"head__weight": np.zeros((2000, 64), np.float32)}, "K <= 1000"),
    ({"head__weight": np.zeros(640, np.float32)}, r"shape \(640,\)"),
    ({"body__0__weight": np.zeros((32, 3, 3, 3), np.float32)}, "expected"),  # 3 channels for grey images
    ({"body__0__bias": np.full(32, np.nan, np.float32)}, "non-finite"),
    ({"body__0__bias": np.zeros(32, np.float64)}, "dtype float64"),
    ({"head__bias": np.zeros(10, np.float32), "extra": np.zeros(1, np.float32)}, "unexpected"),
])
def test_the_client_checks_the_feature_network_it_is_sent(changes, reason):
    """Evaluate messages carry the fd_classifier network itself (no path to open): the client
    accepts exactly a FeatureClassifier's weights for its images, by their decoded values."""
    with pytest.raises(wire.UploadRejected, match=reason):
        wire.unpack_feature_network(_feature_network(**changes), channels=1)
    state = wire.unpack_feature_network(_feature_network(), channels=1)
    assert state["head.weight"].shape == (10, 64)
