"""Bad configuration fails with a clear message before any work starts."""

from __future__ import annotations

import re

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from collafuse_flwr import client_app, server_app
from collafuse_flwr.config import ConfigError, RunConfig
from collafuse_flwr.data import client_data
from collafuse_flwr.data.table import DatasetError
from collafuse_flwr.strategies.setup import FEDERATION_QUERY, federation_size
from collafuse_flwr.tools.inprocess import InProcessGrid


@pytest.mark.parametrize(
    "override,message",
    [
        ({"t-zeta": 1001}, r"t-zeta=1001: the cut point must lie in \[0, timesteps=1000\]"),
        ({"t-zeta": -1}, r"t-zeta=-1"),
        ({"dataset": "imagenet"}, r"dataset='imagenet': unknown; allowed: digits, cifar10, celeba, awa2"),
        ({"dataset-split": "val"}, r"dataset-split='val': unknown; allowed: , train, valid, test, all"),
        ({"partition": "labels"}, r"partition='labels': unknown; allowed: .*attribute-groups"),
        ({"download": "yes"}, r"download='yes': must be true or false"),
        ({"sampler": "euler"}, r"sampler='euler'"),
        ({"sampling-steps": 30}, r"sampling-steps=30: must divide timesteps=1000"),
        ({"unet-block-channels": "32,abc"}, r"unet-block-channels"),
        ({"t-zeta": "200"}, r"t-zeta='200': must be an integer"),
        ({"tzeta": 200}, r"unknown run-config key\(s\) \['tzeta'\]"),
        ({"condition": "class", "dataset": "celeba"}, r"condition='class': dataset='celeba' has no class labels"),
        ({"condition": "attributes"}, r"condition='attributes': dataset='digits' has no attributes"),
        ({"condition": "none", "server-condition": "full"},
         r"server-condition='full' sends each upload's condition, but condition='none'"),
    ],
)
def test_bad_values_name_key_value_and_allowed(override, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_flower(override)


# For every key with a range or a set of choices: a value outside it, and the message part that
# names what is allowed. The free-text keys are checked against the files at server start.
OUT_OF_RANGE = {
    "num-server-rounds": (0, ">= 1"), "num-clients": (-1, ">= 0"), "strategy": ("fedprox", "allowed: collafuse"),
    "clients-per-round": (6, r"\[0, num-clients=5\]"), "eval-clients": (-1, ">= 0"),
    "client-data": ("mine", "allowed: partition, own"),
    "dataset": ("mnist", "allowed: digits"), "dataset-split": ("val", "allowed: , train"),
    "image-size": (10, "divisible by"), "partition": ("shards", "allowed: label-groups"),
    "classes-per-client": (-1, ">= 0"), "dirichlet-alpha": (0.0, "> 0"), "held-out-fraction": (1.0, r"\(0, 1\)"),
    "seed": (-1, ">= 0"), "timesteps": (0, ">= 1"), "t-zeta": (1001, r"\[0, timesteps=1000\]"),
    "beta-schedule": ("cosine", "allowed: linear"), "unet-block-channels": ("12,24", "multiples of 8"),
    "unet-layers-per-block": (0, ">= 1"), "batch-size": (0, ">= 1"), "client-lr": (-1.0, "> 0"),
    "server-lr": (0.0, "> 0"), "client-images-per-round": (-1, ">= 0"), "server-images-per-round": (-1, ">= 0"),
    "ema-decay": (1.0, r"\[0, 1\)"), "server-loss-weighting": ("snr", "allowed: eps-prime"),
    "noise-policy": ("always", "allowed: once, fresh"), "upload-dtype": ("bfloat16", "allowed: float16"),
    "max-uploads-per-client": (0, ">= 1"), "sampler": ("euler", "allowed: ddpm"),
    "sampling-steps": (30, "divide timesteps"), "ddim-eta": (2.0, r"\[0, 1\]"), "eval-every": (-1, ">= 0"),
    "eval-num-samples": (1, r"\[2, max-uploads-per-client"), "metric-classifier-epochs": (0, ">= 1"),
    "disclosure-num-images": (1, "0 .* or >= 2"), "wait-for-clients-seconds": (0.0, "> 0"),
    "round-timeout-seconds": (-5.0, "> 0"),
    "min-replies": (6, r"\[1, 5\], the fewest clients a phase addresses \(num-clients=5"),
    "fault-injection": ("1:2:explode", "'<client>:<round>:<kind>'"),
    "server-device": ("gpu", "allowed: auto, cpu, cuda"), "client-device": ("cuda:x", "allowed: auto, cpu, cuda"),
    "condition": ("words", "allowed: none, class, attributes, text"),
    "server-condition": ("labels", "allowed: none, client-id"), "condition-attributes": ("some", "allowed: all, group"),
    "condition-dropout": (1.0, r"\[0, 1\)"), "guidance-scale": (-1.0, ">= 0"),
    "clip-norm": (-1.0, ">= 0"), "privacy-delta": (0.0, r"\(0, 1\)"), "target-epsilon": (-1.0, ">= 0"),
}
FREE_TEXT = {"data-dir", "attribute-groups", "fid-weights", "fcd-weights", "text-weights", "output-dir"}
BOOLEANS = {"download", "unet-attention", "clip-denoised", "pooled-metrics", "resume", "t-zeta-from-target"}


def test_every_key_is_validated():
    assert set(OUT_OF_RANGE) | FREE_TEXT | BOOLEANS == set(RunConfig().to_flower())


@pytest.mark.parametrize("key", sorted(OUT_OF_RANGE))
def test_out_of_range_values_name_key_value_and_allowed(key):
    value, allowed = OUT_OF_RANGE[key]
    with pytest.raises(ConfigError, match=rf"{key}={re.escape(repr(value))}: .*{allowed}"):
        RunConfig.from_flower({"num-clients": 5, key: value} if key != "num-clients" else {key: value})


def test_num_clients_zero_takes_the_federations_size_and_checks_what_depends_on_it():
    config = RunConfig.from_flower({"clients-per-round": 3, "min-replies": 2})  # 0 clients: not checked yet
    assert config.num_clients == 0
    assert config.for_federation(4).num_clients == 4
    with pytest.raises(ConfigError, match=r"clients-per-round=3: must lie in \[0, num-clients=2\]"):
        config.for_federation(2)
    with pytest.raises(ConfigError, match=r"^num-clients=0 takes .* set num-clients to the number of SuperNodes"):
        config.for_federation(None)  # a deployment's SuperNodes say nothing of the federation


def test_num_clients_the_federation_cannot_meet_names_the_fix():
    config = RunConfig.from_flower({"num-clients": 5})
    assert config.for_federation(5) == config and config.for_federation(None) == config
    with pytest.raises(ConfigError, match=r"num-clients=5 but the federation has 2 SuperNode\(s\): run with "
                                          r"--federation-config 'num-supernodes=5'") as raised:
        config.for_federation(2)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("key", sorted(RunConfig().to_flower()))
def test_wrong_types_name_key_and_value(key):
    default = RunConfig().to_flower()[key]
    wrong = 5 if isinstance(default, str) else "five"
    with pytest.raises(ConfigError, match=rf"{key}={re.escape(repr(wrong))}: must be"):
        RunConfig.from_flower({key: wrong})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(ConfigError, match="client-lr=.*must be a finite number"):
        RunConfig.from_flower({"client-lr": value})


def test_min_replies_cannot_exceed_the_clients_a_phase_addresses():
    for sampled in ({"clients-per-round": 2}, {"eval-clients": 2}):
        with pytest.raises(ConfigError, match=r"min-replies=3: must lie in \[1, 2\]"):
            RunConfig.from_flower({"num-clients": 5, "min-replies": 3, **sampled})
    assert RunConfig.from_flower({"num-clients": 5, "clients-per-round": 3, "min-replies": 3}).train_clients == 3


def test_too_few_clients_for_the_partition():
    config = RunConfig.from_flower({"num-clients": 3, "classes-per-client": 2})
    with pytest.raises(ConfigError, match="covers only 6 of the 10 classes"):
        client_data(config, 0)


@pytest.mark.parametrize("dataset,size,partition,condition,attributes", [
    ("digits", 16, "label-groups", "class", "all"), ("cifar10", 32, "label-groups", "class", "all"),
    ("celeba", 64, "attribute-groups", "attributes", "group"), ("awa2", 64, "attribute-groups", "class", "all"),
])
def test_defaults_follow_the_dataset(dataset, size, partition, condition, attributes):
    """Conditional as in the paper, the server on the sender (no label leaves a client)."""
    config = RunConfig.from_flower({"dataset": dataset})
    assert (config.image_size, config.partition) == (size, partition)
    assert (config.condition, config.server_condition, config.condition_attributes) == (
        condition, "client-id", attributes)
    assert RunConfig.from_flower({"dataset": dataset, "image-size": 8}).image_size == 8
    unconditional = RunConfig.from_flower({"dataset": dataset, "condition": "none"})
    assert (unconditional.server_condition, unconditional.condition_attributes) == ("none", "all")
    explicit = RunConfig.from_flower({"dataset": dataset, "condition": condition, "server-condition": "none"})
    assert explicit.server_condition == "none"


def test_celeba_attributes_of_a_partition_without_groups_are_all_of_them():
    config = RunConfig.from_flower({"dataset": "celeba", "partition": "iid"})
    assert (config.condition, config.condition_attributes) == ("attributes", "all")


@pytest.mark.parametrize(
    "override",
    [{"t-zeta": 5000}, {"classes-per-client": 1}, {"dataset": "celeba", "partition": "label-groups"},
     {"dataset": "cifar10", "data-dir": "/nonexistent", "download": False}, {"fid-weights": "/nonexistent.pth"},
     {"dataset": "celeba", "attribute-groups": "Smiling; Male"}, {"output-dir": "/proc/version"}],
)
def test_server_fails_before_writing_or_training(override, tiny_run_config, tmp_path, task_identity):
    """The ServerApp rejects the config before it makes a run directory or asks a client for
    any work: the one message it may send is the federation query (its size)."""

    class FederationOnlyGrid(InProcessGrid):
        def push_messages(self, messages):
            messages = list(messages)
            assert all(m.metadata.message_type == FEDERATION_QUERY for m in messages), (
                "the server must not reach the clients with a bad config")
            return super().push_messages(messages)

    run_config = dict(tiny_run_config, **override)
    grid = FederationOnlyGrid(run_config, tmp_path / "state", run_config["num-clients"])
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with pytest.raises((ConfigError, DatasetError), match="|".join(override)):
        server_app.main(grid, context)
    assert not (tmp_path / "runs").exists() or not any(p.name[0].isdigit() for p in (tmp_path / "runs").iterdir())


def test_pyproject_defaults_are_the_dataclass_defaults():
    """Every knob is in [tool.flwr.app.config] and means the same as the code's default."""
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    table = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    assert set(table) == set(RunConfig().to_flower())
    assert RunConfig.from_flower(table) == RunConfig()


def test_every_simulation_overlay_and_sweep_is_valid(tmp_path, monkeypatch):
    import tomllib
    from pathlib import Path

    from collafuse_flwr.tools.sweep import load_sweep

    project = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(project)  # sweeps name data directories relative to the project
    overlays = sorted((project / "simulations").glob("*.toml"))
    sweeps = [o for o in overlays if "sweep" in tomllib.loads(o.read_text())]
    assert sweeps and len(sweeps) < len(overlays)
    for overlay in overlays:
        if overlay in sweeps:
            assert load_sweep(overlay, tmp_path)[0]
        else:
            RunConfig.from_flower(tomllib.loads(overlay.read_text()))


@pytest.mark.parametrize("record,size", [
    ({"num-partitions": 3}, 3), ({}, None), (None, None), ({"num-partitions": "3"}, None),
    ({"num-partitions": True}, None), ({"num-partitions": 0}, None), ({"num-partitions": 1001}, None),
    ({"num-partitions": 2.0}, None), ({"num-partitions": [3]}, None),
])
def test_the_federation_size_a_client_reports_is_taken_only_as_one_integer_in_range(record, size, task_identity):
    """A malicious client's answer to the federation query is decoded, never trusted or fatal."""

    class OneNodeGrid:
        def get_node_ids(self):
            return [7]

        def send_and_receive(self, messages, *, timeout=None):
            (query,) = messages
            assert (query.metadata.message_type, query.metadata.dst_node_id) == (FEDERATION_QUERY, 7)
            query.metadata.__dict__["_message_id"] = "q"
            return [Message(RecordDict({} if record is None else {"federation": ConfigRecord(record)}),
                            reply_to=query)]

    assert federation_size(OneNodeGrid(), 5.0) == size


def test_the_client_app_reports_its_simulation_federation_and_nothing_in_a_deployment(task_identity, tmp_path):
    assert federation_size(InProcessGrid({"num-clients": 0}, tmp_path, 3), 5.0) == 3
    query = Message(RecordDict(), dst_node_id=1, message_type=FEDERATION_QUERY)
    query.metadata.__dict__["_message_id"] = "q"
    deployed = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = client_app.app(query, deployed)
    assert not reply.has_error() and dict(reply.content.config_records["federation"]) == {}
