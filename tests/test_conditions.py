"""Conditional CollaFuse: the condition spaces, classifier-free guidance, split sampling with a
condition on each side, and what the server receives of the clients' conditions."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Array, RecordDict

from collafuse_flwr import wire
from collafuse_flwr.config import ConfigError, RunConfig
from collafuse_flwr.data import client_data
from collafuse_flwr.data.clients import ClientData
from collafuse_flwr.diffusion.conditions import Conditioning, ConditionSpace, drop_conditions, guided_eps
from collafuse_flwr.diffusion.models import ConditionalUNet, Denoiser, build_denoiser
from collafuse_flwr.diffusion.sampling import SplitSampler, initial_noise
from collafuse_flwr.diffusion.schedule import CutSchedule
from collafuse_flwr.metrics.conditioning import blind_accuracy, conditioning_metric_names, conditioning_scores
from collafuse_flwr.outputs import DamagedFileError
from collafuse_flwr.run_dir import RunDirectory
from collafuse_flwr.strategies import collafuse
from collafuse_flwr.strategies.collafuse import CollaFuseStrategy
from collafuse_flwr.summary import summarise
from exchange import Grid, answer, send, send_train
from test_wire import RUN_KEY, client_context, train_metrics


def _net(dim: int = 3, seed: int = 0) -> ConditionalUNet:
    net = build_denoiser(8, 1, (8, 16), condition_dim=dim, seed=seed)
    with torch.no_grad():  # a trained network's output depends on c; make this one's visibly
        net.condition_projection.weight.normal_(0, 1, generator=torch.Generator().manual_seed(seed))
    return net


def _x_k(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 10, 50, 99])[:n]


def test_condition_spaces_encode_labels_attributes_and_senders():
    assert torch.equal(ConditionSpace("class", 4).encode(torch.tensor([2, 0])),
                       torch.tensor([[0.0, 0, 1, 0], [1, 0, 0, 0]]))
    assert torch.equal(ConditionSpace("client", 3).encode(torch.tensor([1])), torch.tensor([[0.0, 1, 0]]))
    # no attribute present is -1 everywhere, not the null condition 0
    attributes = ConditionSpace("attributes", 3).encode(torch.tensor([[0.0, 1, 0]]))
    assert torch.equal(attributes, torch.tensor([[-1.0, 1, -1]]))


@pytest.mark.parametrize("mode,server", [("none", None), ("client-id", ("client", 5)), ("full", ("class", 10))])
def test_server_condition_modes(mode, server):
    config = RunConfig(num_clients=5, condition="class", server_condition=mode)
    conditioning = Conditioning.of(config, num_classes=10, num_attributes=0)
    assert conditioning.client == ConditionSpace("class", 10)
    assert (conditioning.server and (conditioning.server.kind, conditioning.server.size)) == server
    assert conditioning.server_receives_conditions == (mode == "full")
    labels = torch.tensor([7, 7, 1])
    c = conditioning.server_conditions(3, labels, 3)
    if mode == "none":
        assert c is None
    else:
        expected = torch.full((3,), 3) if mode == "client-id" else labels
        assert torch.equal(c, conditioning.server.encode(expected))
        assert conditioning.server_conditions(3, None, 0).shape == (0, conditioning.server.size)


def test_the_null_condition_is_zero_and_the_condition_matters():
    net, (x, k) = _net(), _x_k()
    c = torch.eye(3)[[0, 1, 2, 0]]
    with torch.no_grad():
        assert torch.equal(net(x, k).sample, net(x, k, torch.zeros(4, 3)).sample)
        assert not torch.allclose(net(x, k, c).sample, net(x, k).sample)


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0])
def test_guidance_is_the_null_prediction_plus_w_times_the_difference(scale):
    net, (x, k) = _net(), _x_k()
    c = torch.eye(3)[[0, 1, 2, 0]]
    with torch.no_grad():
        conditional, null = net(x, k, c).sample, net(x, k).sample
        guided = guided_eps(net, x, k, c, scale)
    assert torch.allclose(guided, null + scale * (conditional - null), atol=1e-5)
    if scale == 1.0:  # one conditional pass, nothing else
        assert torch.equal(guided, conditional)


def test_an_unconditional_network_ignores_guidance():
    net, (x, k) = build_denoiser(8, 1, (8, 16)), _x_k()
    with torch.no_grad():
        assert torch.equal(guided_eps(net, x, k, None, 3.0), net(x, k).sample)


def test_condition_dropout_nulls_rows_at_its_rate_and_none_draws_nothing():
    c = torch.ones(20_000, 4)
    dropped = drop_conditions(c, 0.3, torch.Generator().manual_seed(0))
    nulled = (dropped == 0).all(1).float().mean()
    assert abs(float(nulled) - 0.3) < 0.015 and ((dropped == 0).all(1) | (dropped == 1).all(1)).all()
    assert torch.equal(drop_conditions(c, 0.0, torch.Generator().manual_seed(0)), c)
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    assert drop_conditions(None, 0.3, generator) is None and torch.equal(generator.get_state(), state)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
@pytest.mark.parametrize("t_zeta", [0, 40, 100])
def test_guided_split_sampling_equals_the_single_loop(kind, t_zeta):
    """The server's steps then the client's, each with guidance, equal one loop over all steps
    (the same network and condition on both sides); t_zeta = 0 and T use the same code."""
    sampler = SplitSampler.build(kind, CutSchedule(100, t_zeta), 10, True, 0.0, t_zeta, guidance_scale=2.5)
    net, c = _net(), torch.eye(3)[[0, 1, 2, 1]]
    x = initial_noise(4, (1, 8, 8), seed=3)
    split = sampler.run(net, sampler.run(net, x, sampler.server_steps, 9, c), sampler.client_steps, 9, c)
    assert torch.equal(split, sampler.run(net, x, sampler.all_steps, 9, c))
    assert not torch.equal(split, sampler.run(net, x, sampler.all_steps, 9, None))


def test_a_conditional_denoiser_is_saved_and_loaded_as_itself(tmp_path):
    denoiser = Denoiser(_net(dim=5), 1e-3, 0.9)
    denoiser.save(tmp_path / "d")
    loaded = Denoiser.load(tmp_path / "d", 1e-3, 0.9)
    (x, k), c = _x_k(), torch.eye(5)[[0, 1, 2, 4]]
    assert isinstance(loaded.net, ConditionalUNet) and loaded.net.config.condition_dim == 5
    with torch.no_grad():
        assert torch.equal(loaded.net(x, k, c).sample, denoiser.net(x, k, c).sample)


def test_a_saved_denoiser_naming_another_class_is_refused(tmp_path):
    Denoiser(_net(), 1e-3, 0.0).save(tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    (tmp_path / "d" / "config.json").write_text(json.dumps(dict(config, _class_name="AutoencoderKL")))
    with pytest.raises(DamagedFileError, match="names 'AutoencoderKL'"):
        Denoiser.load(tmp_path / "d", 1e-3, 0.0)


# ------------------------------------------------------------------ what crosses the wire
def test_conditions_round_trip_by_their_decoded_values():
    labels, requested = torch.tensor([3, 0, 9]), torch.tensor([1, 1])
    content = RecordDict({wire.CONDITIONS: wire.pack_conditions(labels, requested)})
    got, asked = wire.unpack_conditions(content, "class", 10, uploads=3, requested=2)
    assert torch.equal(got, labels) and torch.equal(asked, requested)
    attributes = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    content = RecordDict({wire.CONDITIONS: wire.pack_conditions(attributes, attributes[:1])})
    assert content[wire.CONDITIONS][wire.CONDITION_KEY].dtype == "uint8"
    got, asked = wire.unpack_conditions(content, "attributes", 2, uploads=2, requested=1)
    assert torch.equal(got, attributes) and torch.equal(asked, attributes[:1])


def _conditions(c_cut: np.ndarray, requested: np.ndarray | None = None, **extra) -> RecordDict:
    arrays = {wire.CONDITION_KEY: c_cut, wire.REQUESTED_KEY: np.zeros(2, np.int64) if requested is None else requested}
    record = wire.pack_conditions(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    for key in list(record.keys()):
        del record[key]
    for key, value in {**arrays, **extra}.items():
        record[key] = Array(value)
    return RecordDict({wire.CONDITIONS: record})


HOSTILE_CONDITIONS = {
    "label-out-of-range": _conditions(np.array([0, 10, 1])),
    "negative-label": _conditions(np.array([0, -1, 1])),
    "float-labels": _conditions(np.array([0.0, 1.0, 2.0])),
    "fewer-than-uploads": _conditions(np.array([0, 1])),
    "more-than-uploads": _conditions(np.array([0, 1, 2, 3])),
    "requested-count": _conditions(np.array([0, 1, 2]), np.zeros(3, np.int64)),
    "extra-array": _conditions(np.array([0, 1, 2]), eps=np.zeros(3, np.float32)),
    "no-record": RecordDict(),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CONDITIONS))
def test_hostile_conditions_are_rejected(case):
    with pytest.raises(wire.UploadRejected):
        wire.unpack_conditions(HOSTILE_CONDITIONS[case], "class", 10, uploads=3, requested=2)


def test_attributes_must_be_binary():
    record = wire.pack_conditions(torch.tensor([[0.0, 2.0]]), torch.tensor([[0.0, 1.0]]))
    content = RecordDict({wire.CONDITIONS: record})
    with pytest.raises(wire.UploadRejected, match=r"outside \[0, 1\]"):
        wire.unpack_conditions(content, "attributes", 2, uploads=1, requested=1)


# ------------------------------------------------------------------ the server's side
def _strategy(run_config: dict, tmp_path) -> CollaFuseStrategy:
    """A CollaFuse server of `run_config` (digits 8x8) with an untrained fd_classifier network."""
    from collafuse_flwr.metrics.classifier import FeatureClassifier
    from collafuse_flwr.metrics.features import FeatureNetwork

    config = RunConfig.from_flower(run_config)
    space = Conditioning.of(config, 10, 0).server
    net = build_denoiser(config.image_size, 1, config.block_channels, condition_dim=space.size if space else 0)
    classifier = FeatureNetwork("classifier", FeatureClassifier(1, 10), "fd_classifier", "kid_classifier", "untrained")
    return CollaFuseStrategy(config, RunDirectory(tmp_path), RUN_KEY, Denoiser(net, 1e-3, 0.0), (1, 8, 8),
                             [classifier], {})


def _upload(pid: int, labels: list[int] | None, requested: int = 8) -> RecordDict:
    content = wire.pack_uploads(torch.zeros(len(labels or [0, 0, 0]), 1, 8, 8), "float16",
                                train_metrics(pid, len(labels or [0, 0, 0])))
    if labels is not None:
        content[wire.CONDITIONS] = wire.pack_conditions(torch.tensor(labels), torch.arange(requested) % 10)
    return content


def _recording(monkeypatch) -> list:
    trained = []
    original = collafuse.train_for_images

    def recording(denoiser, data, num_images, batch_size, loss_fn, generator, conditions=None):
        trained.append((data.clone(), conditions))
        return original(denoiser, data, num_images, batch_size, loss_fn, generator, conditions)

    monkeypatch.setattr(collafuse, "train_for_images", recording)
    return trained


def test_under_full_the_server_trains_on_each_uploads_condition(tiny_run_config, tmp_path, task_identity,
                                                                monkeypatch):
    """The uploads' labels reach the server's loss aligned with the pool (partition order);
    a reply without them is rejected; what each client sent is counted."""
    trained = _recording(monkeypatch)
    run_config = dict(tiny_run_config, condition="class", **{"server-condition": "full"})
    strategy = _strategy(run_config, tmp_path)
    sent = send_train(strategy, [10, 11, 12])
    replies = [answer(sent[12], _upload(2, [5, 5])), answer(sent[10], _upload(0, [1, 2, 3])),
               answer(sent[11], _upload(1, None))]
    strategy.aggregate_train(1, replies)
    (pool, conditions), = trained
    assert pool.shape[0] == 5 and torch.equal(conditions, torch.eye(10)[[1, 2, 3, 5, 5]])
    assert torch.equal(strategy.requested[0], torch.arange(8) % 10) and sorted(strategy.requested) == [0, 2]
    metrics = pd.read_csv(tmp_path / "metrics.csv", dtype={"client": str})
    received = metrics[metrics["metric"] == "conditions-received"].set_index("client")["value"].to_dict()
    assert received == {"0": 3 + 8, "2": 2 + 8}
    assert metrics[metrics["metric"] == "train-fault-rejected"]["client"].tolist() == ["1"]


def test_under_client_id_no_condition_leaves_a_client(tiny_run_config, tmp_path, task_identity, monkeypatch):
    """The server conditions each upload on its sender; a reply carrying labels is rejected,
    and the clients' real replies carry none."""
    trained = _recording(monkeypatch)
    run_config = dict(tiny_run_config, condition="class", **{"server-condition": "client-id"})
    strategy = _strategy(run_config, tmp_path)
    sent = send_train(strategy, [10, 11])
    from collafuse_flwr import client_app

    honest = client_app.train(sent[10], client_context(run_config, tmp_path / "client"))
    assert set(honest.content.keys()) == {wire.UPLOADS, wire.METRICS}
    strategy.aggregate_train(1, [honest, answer(sent[11], _upload(1, [1, 2, 3]))])
    (pool, conditions), = trained
    assert sorted(strategy.uploads) == [0] and torch.equal(conditions, torch.eye(5)[[0] * len(pool)])


def test_a_clients_real_reply_under_full_carries_its_labels_and_requests(tiny_run_config, tmp_path, task_identity):
    run_config = dict(tiny_run_config, condition="class", **{"server-condition": "full"})
    strategy = _strategy(run_config, tmp_path)
    sent = send_train(strategy, [10])
    from collafuse_flwr import client_app

    reply = client_app.train(sent[10], client_context(run_config, tmp_path / "client", share_conditions=True))
    data = client_data(RunConfig.from_flower(run_config), 0)
    labels, requested = wire.unpack_conditions(reply.content, "class", 10, len(data.train), 8)
    assert torch.equal(labels, data.train_conditions)
    assert set(requested.tolist()) <= set(data.held_out_conditions.tolist())


def test_a_client_sends_its_conditions_only_when_it_allows_it(tiny_run_config, tmp_path, task_identity,
                                                             monkeypatch):
    """Under 'full' the server asks for every upload's label; the client decides (node config
    share-conditions, else $COLLAFUSE_SHARE_CONDITIONS, else no) and refuses before any work:
    nothing the server sets, the run config included, grants it."""
    from collafuse_flwr import client_app
    from collafuse_flwr.clients.state import ClientStateError

    run_config = dict(tiny_run_config, condition="class", **{"server-condition": "full"})
    sent = send_train(_strategy(run_config, tmp_path), [10])
    monkeypatch.delenv("COLLAFUSE_SHARE_CONDITIONS", raising=False)
    root = tmp_path / "client"
    with pytest.raises(ClientStateError, match="share-conditions=true"):
        client_app.train(sent[10], client_context(run_config, root))
    assert not (root / "partition-0" / "runs").exists()  # refused before training
    monkeypatch.setenv("COLLAFUSE_SHARE_CONDITIONS", "1")
    with pytest.raises(ClientStateError, match="share-conditions=true"):  # the node config wins
        client_app.train(sent[10], client_context(run_config, root, share_conditions="false"))
    with pytest.raises(ClientStateError, match="share-conditions='maybe': use true or false"):
        client_app.train(sent[10], client_context(run_config, root, share_conditions="maybe"))
    assert wire.CONDITIONS in client_app.train(sent[10], client_context(run_config, root)).content
    with pytest.raises(ConfigError, match=r"unknown run-config key\(s\) \['share-conditions'\]"):
        RunConfig.from_flower(dict(run_config, **{"share-conditions": True}))
    monkeypatch.delenv("COLLAFUSE_SHARE_CONDITIONS")
    client_run = dict(run_config, **{"server-condition": "client-id"})  # no condition leaves: nothing to allow
    reply = client_app.train(send_train(_strategy(client_run, tmp_path / "b"), [10])[10],
                             client_context(client_run, tmp_path / "client-b"))
    assert wire.CONDITIONS not in reply.content


def test_under_full_a_client_that_sent_no_requests_is_not_sampled_for(tiny_run_config, tmp_path, task_identity):
    run_config = dict(tiny_run_config, condition="class", **{"server-condition": "full"})
    strategy = _strategy(run_config, tmp_path)
    sent = send_train(strategy, [10, 11])
    strategy.aggregate_train(1, [answer(sent[10], _upload(0, [1, 2, 3]))])
    evaluate = send(strategy.configure_evaluate(1, None, None, Grid([10, 11])))
    assert sorted(evaluate) == [10]
    assert "client 1 sent no requested conditions yet" in (tmp_path / "log.txt").read_text()


# ------------------------------------------------------------------ conditioning metrics
class _Classifier:
    """Predicts the class (or attributes) it is told to, whatever the image."""

    def __init__(self, logits: torch.Tensor):
        self._logits = logits

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self._logits[: len(images)]


def _held_out(targets: torch.Tensor, conditions: torch.Tensor) -> ClientData:
    """A client whose held-out images (zeros) have these classifier targets and conditions."""
    images = torch.zeros(len(targets), 1, 8, 8)
    return ClientData(images, targets, images, targets, conditions, conditions)


def test_condition_accuracy_its_references_and_own_class_share():
    """Generated images (what the network says of them) against the requests; the same network
    on the real held-out images; the best image-blind answer (class 9, asked twice of four)."""
    images = torch.zeros(4, 1, 8, 8)
    classifier = _Classifier(torch.eye(10)[[1, 2, 3, 7]])
    names = conditioning_metric_names(RunConfig(condition="class"), 10)
    labels = torch.tensor([1, 2, 2, 3])
    scores = conditioning_scores(classifier, images, torch.tensor([1, 2, 9, 9]), _held_out(labels, labels), names)
    assert scores == {"condition-accuracy": 0.5, "condition-accuracy-real": 0.5, "condition-accuracy-blind": 0.5,
                      "own-class-share": 0.75}
    attributes = _Classifier(torch.tensor([[1.0, -1.0], [1.0, 1.0]]))
    names = conditioning_metric_names(RunConfig(dataset="celeba", condition="attributes"), 0)
    requested = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    scores = conditioning_scores(attributes, images[:2], requested, _held_out(requested, requested), names)
    assert scores == {"condition-accuracy": 0.75, "condition-accuracy-real": 0.75, "condition-accuracy-blind": 0.5}


def test_a_network_blind_to_the_images_scores_no_better_than_the_image_blind_reference():
    """A network that says 'absent' to every attribute of every image reaches exactly the
    image-blind reference when absence is the majority, whatever the images show."""
    requested = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, 0]])
    for columns, blind in ((None, 0.75), (torch.tensor([1.0, 1.0, 0.0]), 0.75)):
        assert blind_accuracy(requested, columns) == blind
        never = conditioning_scores(_Classifier(-torch.ones(4, 3)), torch.zeros(4, 3, 8, 8), requested,
                                    _held_out(requested, requested), ("condition-accuracy",), columns)
        assert never["condition-accuracy"] == never["condition-accuracy-real"] == blind
    assert blind_accuracy(torch.tensor([[1.0, 1.0], [1.0, 0.0]]), torch.tensor([0.0, 1.0])) == 0.5
    assert blind_accuracy(torch.tensor([4, 4, 4, 1])) == 0.75


@pytest.mark.parametrize("real,flagged", [(0.59, True), (0.664, True), (0.9, False)])
def test_the_summary_flags_a_condition_accuracy_the_network_cannot_judge(real, flagged):
    rows = [(4, "pooled", "condition-accuracy", 0.6), (4, "pooled", "condition-accuracy-real", real),
            (4, "pooled", "condition-accuracy-blind", 0.664), (4, "0", "condition-accuracy", 0.6)]
    metrics = pd.DataFrame(rows, columns=["round", "client", "metric", "value"])
    notes = summarise(metrics, RunConfig(dataset="celeba", condition="attributes"), {"conditions": "kept"})["notes"]
    assert notes["conditions"] == "kept"
    assert ("uninformative" in notes.get("condition-accuracy", "")) == flagged


@pytest.mark.parametrize("dataset,condition,classes,names", [
    ("digits", "none", 10, ("own-class-share",)),
    ("digits", "class", 10, ("own-class-share", "condition-accuracy", "condition-accuracy-real",
                             "condition-accuracy-blind")),
    ("celeba", "attributes", 0, ("condition-accuracy", "condition-accuracy-real", "condition-accuracy-blind")),
    ("celeba", "none", 0, ()),
    ("awa2", "attributes", 50, ("own-class-share",)),  # the network predicts classes, not predicates
])
def test_which_conditioning_metrics_a_reply_carries(dataset, condition, classes, names):
    assert conditioning_metric_names(RunConfig(dataset=dataset, condition=condition), classes) == names


def test_a_labelled_grid_is_written(tmp_path):
    from PIL import Image

    from collafuse_flwr.outputs import save_labelled_grid

    save_labelled_grid(torch.rand(10, 1, 8, 8) * 2 - 1, [str(i % 3) for i in range(10)], tmp_path / "g.png", ncol=5)
    with Image.open(tmp_path / "g.png") as image:
        assert image.width > image.height > 100


@pytest.mark.parametrize("mode", ["client-id", "full"])
def test_the_audit_of_a_conditional_server_uses_what_it_knows(mode, tiny_run_config, tmp_path, task_identity):
    """The server's own samples for a client are conditioned on its id, or on conditions drawn
    from its uploads' (null for a client that sent none); the attacks run with them."""
    run_config = dict(tiny_run_config, condition="class", **{"server-condition": mode, "disclosure-num-images": 4})
    strategy = _strategy(run_config, tmp_path)
    sent = send_train(strategy, [10, 11])
    labels = [1, 2, 3] if mode == "full" else None
    strategy.aggregate_train(1, [answer(sent[10], _upload(0, labels)), answer(sent[11], _upload(1, labels))])
    conditions = strategy._server_only_conditions(0, 1)
    if mode == "full":
        assert conditions.shape == (8, 10) and set(conditions.argmax(1).tolist()) <= {1, 2, 3}
        assert torch.equal(strategy._server_only_conditions(2, 1), torch.zeros(8, 10))
    else:
        assert torch.equal(conditions, torch.eye(5)[[0] * 8])
    rows = strategy._audit(1, list(range(5)))
    assert {c for _, c, m, _ in rows if m == "reconstruction-psnr-tweedie"} == {"0", "1"}
    assert {c for _, c, m, _ in rows if m == "server-only-fd_classifier"} == {"0", "1", "2", "3", "4", "pooled"}
    audited = {c for _, c, m, _ in strategy._audit(1, [1]) if m.startswith(("server-only", "reconstruction"))}
    assert audited == {"1", "pooled"}  # the evaluated clients only


def test_tweedie_uses_the_views_conditions():
    from collafuse_flwr.metrics import disclosure

    net, schedule = _net(dim=10), CutSchedule(100, 20)
    views = torch.randn(130, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    c = torch.eye(10)[torch.arange(130) % 10]
    estimate = disclosure.tweedie_estimate(net, schedule, views, 1, c)
    assert not torch.equal(estimate, disclosure.tweedie_estimate(net, schedule, views, 1))
    # in batches of 64, each view with its own condition
    part = disclosure.tweedie_estimate(net, schedule, views[100:106], 1, c[100:106])
    assert torch.allclose(estimate[100:106], part, atol=1e-5)


# ------------------------------------------------------------------ text conditions
def test_prompts_join_the_present_attributes():
    from collafuse_flwr.diffusion.text import prompts

    names = ("Black_Hair", "Smiling", "Young")
    assert prompts(torch.tensor([[1, 0, 1], [0, 0, 0]]), names) == ["Black Hair, Young", ""]


def test_the_text_tower_embeds_prompts_as_unit_vectors(standin_text_weights):
    from collafuse_flwr.diffusion.text import TextEncoder

    encoder = TextEncoder(standin_text_weights)
    embedded = encoder.encode(["Smiling", "Black Hair, Young", "Smiling"])
    assert embedded.shape == (3, 512) and torch.allclose(embedded.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.equal(embedded[0], embedded[2]) and not torch.allclose(embedded[0], embedded[1])
    space = ConditionSpace("text", 512, 3, lambda raw: encoder.encode([str(r.tolist()) for r in raw]))
    assert space.encode(torch.tensor([[1, 0, 1]])).shape == (1, 512)
    assert (space.raw_kind, space.raw_width) == ("attributes", 3)


def test_text_conditions_need_clip_weights_with_a_text_tower(standin_weights, tmp_path, monkeypatch):
    from collafuse_flwr.diffusion.text import text_encoder

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("COLLAFUSE_FCD_WEIGHTS", raising=False)
    with pytest.raises(ConfigError, match="condition='text' encodes prompts with CLIP.*text-weights.*fcd-weights"):
        text_encoder(RunConfig(dataset="celeba", condition="text"))
    _, visual_only = standin_weights
    with pytest.raises(ConfigError, match="fcd-weights: .*holds no CLIP ViT-B/32 text tower"):
        text_encoder(RunConfig(dataset="celeba", condition="text", fcd_weights=str(visual_only)))
    with pytest.raises(ConfigError, match="text-weights=.*holds no CLIP ViT-B/32 text tower"):
        text_encoder(RunConfig(dataset="celeba", condition="text", text_weights=str(visual_only)))
    with pytest.raises(ConfigError, match="text-weights='/nowhere/t.safetensors': no such file"):
        text_encoder(RunConfig(dataset="celeba", condition="text", text_weights="/nowhere/t.safetensors"))


def test_group_attributes_keep_only_the_clients_group(monkeypatch):
    """condition-attributes = "group": a client's conditions hold its group's attributes only
    (the authors' CelebA prompts); condition accuracy is judged on those attributes."""
    import numpy as np

    from collafuse_flwr.data import clients
    from collafuse_flwr.data.table import ImageTable

    rng = np.random.default_rng(0)
    table = ImageTable(rng.integers(0, 256, (60, 3, 8, 8), dtype=np.uint8), None, (),
                       rng.integers(0, 2, (60, 4)).astype(np.uint8), ("A", "B", "C", "D"), "fake")
    monkeypatch.setattr(clients, "load_table", lambda config: table)
    config = RunConfig(dataset="celeba", image_size=8, num_clients=2, attribute_groups="A; B,C",
                       condition="attributes", condition_attributes="group")
    for pid, kept in ((0, [1.0, 0, 0, 0]), (1, [0, 1.0, 1.0, 0])):
        data = clients.client_data(config, pid)
        assert torch.equal(clients.group_columns(config, pid), torch.tensor(kept))
        assert (data.train_conditions[:, torch.tensor(kept) == 0] == 0).all()
        assert data.train_conditions[:, torch.tensor(kept) == 1].sum() > 0
    requested = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    scores = conditioning_scores(_Classifier(torch.tensor([[1.0, 1.0, -1.0, 1.0]])), torch.zeros(1, 3, 8, 8),
                                 requested, _held_out(requested, requested), ("condition-accuracy",),
                                 torch.tensor([0.0, 1.0, 1.0, 0.0]))
    assert scores["condition-accuracy"] == 0.5  # B agrees, C does not; A and D are not asked for
    with pytest.raises(ConfigError, match="condition-attributes='group'.*partition='attribute-groups'"):
        RunConfig.from_flower({"dataset": "celeba", "partition": "iid", "condition": "attributes",
                               "condition-attributes": "group"})
