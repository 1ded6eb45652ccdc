"""Evaluation is a release the client controls (clients/release.py): a malicious server sets
the held-out fraction, ships its own feature network and names weights paths in the run config;
the client releases statistics only of enough images, on networks it trusts, computed with its
own weights files, and one client's moments cannot set the pooled row."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from collafuse_flwr import client_app, wire
from collafuse_flwr.clients import evaluation
from collafuse_flwr.config import RunConfig
from collafuse_flwr.data import client_data
from collafuse_flwr.diffusion.conditions import run_conditioning
from collafuse_flwr.diffusion.models import Denoiser, build_denoiser
from collafuse_flwr.metrics.classifier import FeatureClassifier
from collafuse_flwr.metrics.distances import Moments, feature_moments, frechet_distance, pooled_moments
from collafuse_flwr.metrics.features import FeatureNetwork, weights_digest
from collafuse_flwr.metrics.manifold import manifold_names
from collafuse_flwr.run_dir import RunDirectory
from collafuse_flwr.strategies.collafuse import CollaFuseStrategy
from collafuse_flwr.tools.inprocess import client_reply
from collafuse_flwr.weights import file_digest, resolve_weights
from conftest import TINY
from exchange import Grid, answer, send
from test_evaluation_privacy import _content, _evaluate
from test_wire import RUN_KEY, client_context, server_message


@pytest.fixture
def default_minimum(monkeypatch):
    """The client's default minimum (conftest.py lowers it for the tiny fixtures), no trust
    given through the environment."""
    for variable in ("COLLAFUSE_MIN_RELEASE_IMAGES", "COLLAFUSE_TRUST_RUN_EVALUATOR", "COLLAFUSE_TRUSTED_EVALUATORS"):
        monkeypatch.delenv(variable, raising=False)


def _classifier(seed: int = 0) -> FeatureClassifier:
    torch.manual_seed(seed)
    return FeatureClassifier(1, 10).eval()


def _server(run_config: dict, tmp_path: Path, classifier: FeatureClassifier) -> CollaFuseStrategy:
    """A CollaFuse server of `run_config` evaluating on `classifier` alone."""
    config = RunConfig.from_flower(run_config)
    space = run_conditioning(config).server  # the sender's id under the default client-id
    net = build_denoiser(config.image_size, 1, config.block_channels, condition_dim=space.size if space else 0)
    network = FeatureNetwork("classifier", classifier, "fd_classifier", "kid_classifier",
                             weights_digest(classifier.state_dict()))
    (tmp_path / "server").mkdir(exist_ok=True)
    return CollaFuseStrategy(config, RunDirectory(tmp_path / "server"), RUN_KEY, Denoiser(net, 1e-3, 0.0),
                             (1, 8, 8), [network], {})


def _evaluate_messages(strategy: CollaFuseStrategy, nodes) -> dict:
    return send(strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), Grid(nodes)))


def _run_config(tmp_path: Path, **overrides) -> dict:
    """The tiny digits run at t_zeta = 0 (the clients run no sampler step), no attacks."""
    return dict(TINY, **{"t-zeta": 0, "disclosure-num-images": 0, "output-dir": str(tmp_path / "runs"), **overrides})


def _reason(reply, reason: str | None = None) -> str:
    """The explanation of a client's declining reply (`wire.unpack_declined`), whose reason code
    is `reason` when given."""
    assert not reply.has_error() and wire.DECLINED in reply.content.keys(), "the client released a reply"
    _, code, detail = wire.unpack_declined(reply.content)
    assert reason in (None, code)
    return detail


# ----------------------------------------------------------------- too few images


def test_two_held_out_images_are_never_released(tmp_path, task_identity, default_minimum, monkeypatch):
    """held-out-fraction = 1e-9 leaves each client 2 held-out images. A client with the default
    minimum refuses the evaluate message before computing anything on them, even though it trusts
    the run's evaluator; the server records a fault and holds nothing of that client. The control:
    a client whose own minimum allows 2 images releases the moments, and the mean and covariance
    of 2 feature vectors give both back exactly (x = mean +- sqrt(lambda / 2) u, lambda and u the
    covariance's one non-zero eigenpair), from which the server, which knows its network, inverts
    the images (47.5 dB in the probe)."""
    run_config = _run_config(tmp_path, **{"held-out-fraction": 1e-9})
    config = RunConfig.from_flower(run_config)
    held_out = client_data(config, 0).held_out
    assert len(held_out) == 2
    classifier = _classifier()
    strategy = _server(run_config, tmp_path, classifier)
    sent = _evaluate_messages(strategy, [10, 11])
    computed, features = [], evaluation.cached_features
    monkeypatch.setattr(evaluation, "cached_features", lambda *args: computed.append(args))
    reply = client_reply(client_app.evaluate, sent[10],
                         client_context(run_config, tmp_path / "clients", trust_run_evaluator=True))
    assert "statistics only of sets of at least 32 images" in _reason(reply, "too-few-images")
    assert "nothing was computed" in _reason(reply)
    assert computed == []

    monkeypatch.setattr(evaluation, "cached_features", features)  # the control: its own minimum allows 2 images
    context = client_context(run_config, tmp_path / "clients", trust_run_evaluator=True, min_release_images=2)
    control = client_app.evaluate(sent[11], context)
    strategy.aggregate_evaluate(1, [reply, control])
    metrics = pd.read_csv(tmp_path / "server" / "metrics.csv", dtype={"client": str})
    assert set(metrics[metrics["client"] == "0"]["metric"]) == {"bytes-down-sample", "bytes-down-evaluation",
                                                                "evaluate-declined-too-few-images"}
    assert metrics[(metrics["client"] == "pooled") & (metrics["metric"] == "num-real")]["value"].tolist() == [2]
    held_out = client_data(config, 1).held_out
    content = control.content
    mean = torch.from_numpy(content[wire.MOMENTS]["classifier-real-mean"].numpy()).double()
    covariance = torch.from_numpy(content[wire.MOMENTS]["classifier-real-covariance"].numpy()).double()
    values, vectors = torch.linalg.eigh(covariance)
    half = (values[-1] / 2).sqrt() * vectors[:, -1]
    recovered = torch.stack([mean + half, mean - half])
    with torch.no_grad():
        truth = classifier(held_out).double()
    if torch.dist(recovered[0], truth[0]) > torch.dist(recovered[0], truth[1]):
        recovered = recovered.flip(0)
    torch.testing.assert_close(recovered, truth, atol=1e-4, rtol=1e-4)


def test_moments_are_released_only_of_more_images_than_features(tmp_path, task_identity, default_minimum):
    """The default minimum with enough images for the figures (57 held-out, 40 generated per
    client) but fewer than the classifier's 64 features + 1: the replies carry every figure and
    no moments, the server accepts them and notes why the pooled row is not computable."""
    run_config = _run_config(tmp_path, **{"eval-num-samples": 40})
    strategy = _server(run_config, tmp_path, _classifier())
    sent = _evaluate_messages(strategy, [10, 11])
    context = client_context(run_config, tmp_path / "clients", trust_run_evaluator=True)
    replies = [client_app.evaluate(sent[node], context) for node in (10, 11)]
    assert all(len(r.content[wire.MOMENTS]) == 0 and "fd_classifier" in r.content[wire.METRICS] for r in replies)
    assert all(r.content[wire.METRICS]["num-real"] > 32 for r in replies)
    strategy.aggregate_evaluate(1, replies)
    metrics = pd.read_csv(tmp_path / "server" / "metrics.csv", dtype={"client": str})
    assert not metrics["metric"].str.contains("fault").any()
    assert set(metrics[metrics["client"] == "pooled"]["metric"]) == {"own-class-share"}
    summary = json.loads((tmp_path / "server" / "summary.json").read_text())
    note = summary["notes"]["pooled-not-computable"]["fd_classifier"]
    assert "released no moments of classifier's 64 features" in note


# ----------------------------------------------------------------- untrusted networks


def _constant_head(classifier: FeatureClassifier, k: int) -> FeatureClassifier:
    """`classifier` with a head that assigns every image to class k."""
    crafted = FeatureClassifier(1, 10)
    crafted.load_state_dict(classifier.state_dict())
    with torch.no_grad():
        crafted.head.weight.zero_()
        crafted.head.bias.copy_(10 * torch.nn.functional.one_hot(torch.tensor(k), 10).float())
    return crafted


def test_a_crafted_head_recovers_no_label_histogram_from_a_client_that_trusts_only_its_evaluator(
        tmp_path, task_identity, default_minimum):
    """Class-conditional clients, the default server conditioned on the sender (no label asked
    for). The server ships, in 10 evaluate messages, heads that put every image in class k
    = 0..9: a client that trusted any network would report condition-accuracy-real = the share
    of its held-out images of class k, the exact label histogram (the control). A client that
    lists only the run's honest evaluator in trusted-evaluators answers the honest message and
    refuses all 10 crafted ones, naming their digests: nothing is recovered."""
    run_config = _run_config(tmp_path, condition="class")
    config = RunConfig.from_flower(run_config)
    honest = _classifier()
    strategy = _server(run_config, tmp_path, honest)
    labels = client_data(config, 0).held_out_targets
    histogram = torch.bincount(labels, minlength=10).double() / len(labels)
    trusted = client_context(run_config, tmp_path / "clients", trusted_evaluators=weights_digest(honest.state_dict()),
                             min_release_images=2)
    trusting = client_context(run_config, tmp_path / "clients", trust_run_evaluator=True, min_release_images=2)
    assert wire.METRICS in client_reply(client_app.evaluate, _evaluate_messages(strategy, [10])[10], trusted).content
    recovered, control = [], []
    for k in range(10):
        crafted = _constant_head(honest, k)
        message = _evaluate_messages(strategy, [10])[10]
        message.content[wire.FEATURE_NETWORK] = wire.pack_weights(crafted.state_dict())
        reply = client_reply(client_app.evaluate, message, trusted)
        assert f"fd_classifier network (SHA-256 {weights_digest(crafted.state_dict())}) is not one" in \
            _reason(reply, "untrusted-evaluator")
        recovered += [reply.content[wire.METRICS]["condition-accuracy-real"]] if wire.METRICS in reply.content else []
        control.append(client_app.evaluate(message, trusting).content[wire.METRICS]["condition-accuracy-real"])
    assert recovered == []
    torch.testing.assert_close(torch.tensor(control, dtype=torch.float64), histogram)


def test_a_client_that_does_not_trust_the_evaluator_declines_and_the_run_goes_on(tmp_path, task_identity):
    """A client without trusted-evaluators or trust-run-evaluator (a plain `flwr run` of a fresh
    clone) answers with a declining reply: nothing computed, its reason and its words. The server
    records it as the client's answer, not a fault (a round of declines meets min-replies), and
    says in the log and summary.json what would lift it, naming the evaluator's digest."""
    run_config = _run_config(tmp_path)
    classifier = _classifier()
    strategy = _server(run_config, tmp_path, classifier)
    sent = _evaluate_messages(strategy, [10])
    reply = client_reply(client_app.evaluate, sent[10], client_context(run_config, tmp_path / "clients"))
    assert "is not one this client trusts" in _reason(reply, "untrusted-evaluator")
    strategy.aggregate_evaluate(1, [reply])
    metrics = pd.read_csv(tmp_path / "server" / "metrics.csv", dtype={"client": str})
    assert set(metrics[metrics["client"] == "0"]["metric"]) == {
        "bytes-down-sample", "bytes-down-evaluation", "evaluate-declined-untrusted-evaluator"}
    note = json.loads((tmp_path / "server" / "summary.json").read_text())["notes"]["evaluation-declined"]["0"]
    assert weights_digest(classifier.state_dict()) in note and "COLLAFUSE_TRUST_RUN_EVALUATOR=1" in note


@pytest.mark.parametrize("record", [
    {"partition-id": 0, "reason": "bored", "detail": "x"},
    {"partition-id": 0, "reason": "too-few-images"},
    {"partition-id": 0, "reason": "too-few-images", "detail": "x", "num-real": 3},
    {"partition-id": "0", "reason": "too-few-images", "detail": "x"},
    {"partition-id": 1, "reason": "too-few-images", "detail": "x"},
    {"partition-id": 0, "reason": "too-few-images", "detail": "x" * 1001},
    {"partition-id": 0, "reason": "too-few-images", "detail": "\x1b[2Jcleared"},
    {"partition-id": 0, "reason": "too-few-images", "detail": b"bytes"},
])
def test_a_malformed_decline_is_a_fault(record, tmp_path, task_identity):
    """A decline is validated by its decoded values like any reply: unknown reasons, missing or
    extra keys, another partition, an oversized or non-printable detail are rejected."""
    strategy = _server(_run_config(tmp_path), tmp_path, _classifier())
    sent = _evaluate_messages(strategy, [10, 11])
    hostile = answer(sent[10], RecordDict({wire.DECLINED: ConfigRecord(record)}))
    valid = answer(sent[11], wire.pack_declined(1, "too-few-images", "fewer than my minimum"))
    strategy.aggregate_evaluate(1, [hostile, valid])
    metrics = pd.read_csv(tmp_path / "server" / "metrics.csv", dtype={"client": str})
    assert "evaluate-fault-rejected" in set(metrics[metrics["client"] == "0"]["metric"])
    assert "evaluate-declined-too-few-images" in set(metrics[metrics["client"] == "1"]["metric"])


# ----------------------------------------------------------------- paths the run config names

_WATCHED: list[Path] = []  # the directory whose every access is recorded, while a test watches it
_ACCESSES: list[str] = []


def _audit(event: str, args) -> None:
    if _WATCHED and event in ("open", "os.listdir", "os.scandir") and args and \
            isinstance(args[0], (str, bytes, os.PathLike)) and str(os.fsdecode(args[0])).startswith(str(_WATCHED[0])):
        _ACCESSES.append(f"{event} {args[0]}")


sys.addaudithook(_audit)  # audit hooks cannot be removed: this one records only while `_WATCHED` is set


@pytest.fixture
def watched(tmp_path, monkeypatch):
    """A directory whose every open, listing and stat in this process is recorded (audit
    events, and `os.stat` / `os.lstat`, which pathlib's is_file and exists use)."""
    directory = tmp_path / "named-by-the-server"
    (directory / "existing").mkdir(parents=True)
    for name in WEIGHTS_FILES.values():  # a 14.8 MB header stalled a client 13 s in the probe
        (directory / "existing" / name).write_bytes(b"\x00" * 14_800_000)
    for name in ("stat", "lstat"):
        real = getattr(os, name)

        def recording(path, *args, real=real, name=name, **kwargs):
            if isinstance(path, (str, bytes, os.PathLike)) and str(os.fsdecode(path)).startswith(str(directory)):
                _ACCESSES.append(f"{name} {path}")
            return real(path, *args, **kwargs)
        monkeypatch.setattr(os, name, recording)
    _ACCESSES.clear()
    _WATCHED[:] = [directory]
    yield directory
    _WATCHED.clear()


WEIGHTS_FILES = {"fid-weights": "fid.pth", "fcd-weights": "clip.safetensors", "text-weights": "text.safetensors"}


def _paths(directory: Path, existing: bool) -> dict[str, str]:
    """Run-config weights keys naming files below the watched `directory`: existing ones (the
    `watched` fixture wrote them) or missing ones."""
    return {key: str(directory / ("existing" if existing else "missing") / name) for key, name in WEIGHTS_FILES.items()}


def _without_seconds(content: RecordDict) -> dict:
    """A reply's metrics without wall times, and its arrays' bytes."""
    metrics = {k: v for k, v in content[wire.METRICS].items() if not k.endswith("seconds")}
    return {"metrics": metrics, "arrays": {(name, key): array.data for name, record in content.array_records.items()
                                           for key, array in record.items()}}


def test_weights_paths_in_the_run_config_are_never_opened_by_a_client(tmp_path, task_identity, watched,
                                                                      monkeypatch):
    """A run config naming fid-weights, fcd-weights and text-weights files, which exist on the
    client's machine or not: the client neither opens nor stats them, and its train reply, its
    evaluation reply and its refusal of a message naming pretrained weights it lacks are the
    same either way (the server learns nothing of the client's files). The control: resolving
    the run config's weights as the server does is seen by the watch."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # this client has no weights of its own
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for variable in ("COLLAFUSE_FID_WEIGHTS", "COLLAFUSE_FCD_WEIGHTS", "COLLAFUSE_TEXT_WEIGHTS", "HF_HUB_CACHE"):
        monkeypatch.delenv(variable, raising=False)
    classifier = _classifier()
    handover = wire.pack_handover(torch.zeros(8, 1, 8, 8))
    replies = {}
    for existing in (True, False):
        run_config = _run_config(tmp_path, **_paths(watched, existing))
        context = client_context(run_config, tmp_path / "clients", trust_run_evaluator=True)
        train = client_app.train(server_message("train", 0), context).content
        evaluate = {"sample-seed": 1}
        answered = client_app.evaluate(server_message(
            "evaluate", 0, config=evaluate, handover=handover,
            **{wire.FEATURE_NETWORK: wire.pack_weights(classifier.state_dict())}), context).content
        named = dict(evaluate, **{"fid-weights-sha256": "ab" * 32})
        refused = client_reply(client_app.evaluate, server_message(
            "evaluate", 0, config=named, handover=handover,
            **{wire.FEATURE_NETWORK: wire.pack_weights(classifier.state_dict())}), context)
        reason = _reason(refused).split("\n")[0]
        replies[existing] = (_without_seconds(train), _without_seconds(answered), reason)
    assert _ACCESSES == []
    assert replies[True] == replies[False]
    assert "this client has no such file (its node config fid-weights, else $COLLAFUSE_FID_WEIGHTS" in replies[True][2]
    resolve_weights("inception", _paths(watched, True)["fid-weights"])  # the control
    assert _ACCESSES


def test_a_text_conditional_client_reads_its_own_text_tower(tmp_path, task_identity, watched, shared_data,
                                                            standin_text_weights, monkeypatch):
    """condition = "text": the run config names a text-weights file the client never touches;
    the client embeds its prompts with the text tower its own node config names, and in
    evaluation accepts the server's SHA-256 of that file and refuses any other, naming its key."""
    monkeypatch.delenv("COLLAFUSE_TEXT_WEIGHTS", raising=False)
    run_config = _run_config(tmp_path, **{"dataset": "celeba", "data-dir": str(shared_data / "celeba-mini"),
                                          "condition": "text", **_paths(watched, False)})
    context = client_context(run_config, tmp_path / "clients", trust_run_evaluator=True,
                             text_weights=str(standin_text_weights))
    assert wire.UPLOADS in client_app.train(server_message("train", 0), context).content
    config = RunConfig.from_flower(run_config)
    shape = client_data(config, 0).held_out.shape[1:]
    classifier = FeatureClassifier(shape[0], 40)
    handover = wire.pack_handover(torch.zeros(config.eval_num_samples, *shape))
    for digest, accepted in ((file_digest(standin_text_weights), True), ("0" * 64, False)):
        reply = client_reply(client_app.evaluate, server_message(
            "evaluate", 0, config={"sample-seed": 1, "text-weights-sha256": digest}, handover=handover,
            **{wire.FEATURE_NETWORK: wire.pack_weights(classifier.state_dict())}), context)
        assert (wire.METRICS in reply.content) == accepted
        if not accepted:
            assert f"text-weights file of SHA-256 {digest}; this client has no such file (its node config" \
                   in _reason(reply, "missing-weights")
    assert _ACCESSES == []


# ----------------------------------------------------------------- the pooled row


@pytest.fixture
def eval_config(tiny_run_config) -> dict:
    """t_zeta = T: the server hands over pure noise; no attacks; num-real up to 100,000."""
    return dict(tiny_run_config, **{"t-zeta": tiny_run_config["timesteps"], "disclosure-num-images": 0,
                                    "max-uploads-per-client": 100_000})


def test_one_client_claiming_100000_held_out_images_gets_no_more_than_its_capped_share(
        eval_config, tmp_path, task_identity):
    """Clients 0 and 1 honest; client 2 sends schema-valid moments of far-off features and claims
    num-real = 100,000 (max-uploads-per-client allows it). Counted as claimed, it would take
    99.9 % of the pooled held-out set and move the pooled FD to about its own (the control);
    capped at eval-num-samples (8), its share of the pooled held-out mean is 8 / (8 + 6 + 7) and
    the pooled FD is exactly the one of its moments at that weight."""
    hostile = _content(2)
    far = torch.randn(6, 4, generator=torch.Generator().manual_seed(9)) + 50.0
    m = feature_moments(far)
    hostile[wire.MOMENTS]["pixels-real-mean"] = wire.pack_moments({"x": (m.mean, m.covariance)})["x-mean"]
    hostile[wire.MOMENTS]["pixels-real-covariance"] = wire.pack_moments({"x": (m.mean, m.covariance)})["x-covariance"]
    hostile[wire.METRICS]["num-real"] = 100_000
    hostile[wire.METRICS].update({name: 0.5 for name in manifold_names("pixels")})  # due for 100,000 images
    metrics, _, _ = _evaluate(eval_config, tmp_path, {10: _content(0), 11: _content(1), 12: hostile})
    assert not metrics["metric"].str.contains("fault").any()
    pooled = metrics[metrics["client"] == "pooled"].set_index("metric")["value"]

    def sent(content: RecordDict, kind: str, count: int) -> Moments:
        arrays = content[wire.MOMENTS]
        return Moments(count, torch.from_numpy(arrays[f"pixels-{kind}-mean"].numpy()).double(),
                       torch.from_numpy(arrays[f"pixels-{kind}-covariance"].numpy()).double())

    contents, counts = [_content(0), _content(1), hostile], [6, 7, 100_000]
    fake = pooled_moments([sent(c, "generated", 8) for c in contents])
    uncapped = frechet_distance(pooled_moments([sent(c, "real", n) for c, n in zip(contents, counts)]), fake)
    capped_real = pooled_moments([sent(c, "real", n) for c, n in zip(contents, counts)], cap=8)
    honest = pooled_moments([sent(c, "real", n) for c, n in zip(contents[:2], counts[:2])])
    share = float((capped_real.mean - honest.mean).norm() / (m.mean - honest.mean).norm())
    assert share == pytest.approx(8 / (8 + 6 + 7), rel=1e-6)
    assert pooled["fd_pixels"] == pytest.approx(frechet_distance(capped_real, fake), rel=1e-5)
    assert pooled["num-real"] == 6 + 7 + 8
    own = frechet_distance(Moments(6, m.mean, m.covariance), fake)
    assert abs(uncapped - own) / own < 0.01 < abs(pooled["fd_pixels"] - own) / own  # the control
    assert np.isfinite(pooled["fd_pixels"])


def test_replies_carry_exactly_the_moments_the_release_rule_implies(eval_config, tmp_path, task_identity):
    """Networks with fewer features than both sets must come with moments; a reply without them
    is rejected. Moments of a network with as many features as images are allowed (a client's
    own min-release-images), and a pooled distance needs every counted client's."""
    short = _content(2)
    for key in list(short[wire.MOMENTS].keys()):
        del short[wire.MOMENTS][key]
    metrics, _, log = _evaluate(eval_config, tmp_path, {10: _content(0), 11: _content(1), 12: short})
    assert metrics[metrics["metric"].str.contains("fault")][["client", "metric"]].values.tolist() == [
        ["2", "evaluate-fault-rejected"]]
    assert "moments: missing ['pixels-generated-covariance'" in log
    few = {pid: _content(pid) for pid in (0, 1)}
    for content in few.values():  # 2 held-out images: d = 4 is not below both counts
        content[wire.METRICS]["num-real"] = 2
        for name in manifold_names("pixels"):  # nor are the manifold metrics due (client 1 had 7)
            content[wire.METRICS].pop(name, None)
    (tmp_path / "few").mkdir()
    metrics, summary, _ = _evaluate(eval_config, tmp_path / "few", {10: few[0], 11: few[1]})
    assert not metrics["metric"].str.contains("fault").any() and "fd_pixels" in set(metrics["metric"])
    del few[1][wire.MOMENTS]["pixels-real-mean"], few[1][wire.MOMENTS]["pixels-real-covariance"]
    del few[1][wire.MOMENTS]["pixels-generated-mean"], few[1][wire.MOMENTS]["pixels-generated-covariance"]
    (tmp_path / "partial").mkdir()
    metrics, summary, _ = _evaluate(eval_config, tmp_path / "partial", {10: _content(0), 11: few[1]})
    assert not metrics["metric"].str.contains("fault").any()
    assert not ((metrics["client"] == "pooled") & (metrics["metric"] == "fd_pixels")).any()
    assert summary["notes"]["pooled-not-computable"]["fd_pixels"].startswith("client(s) 1 released no moments")



@pytest.mark.parametrize("key,value,message", [
    ("trusted-evaluators", "abc123", "use comma-separated SHA-256 digests"),
    ("min-release-images", "1", "use a whole number of images, at least 2"),
    ("min-release-images", "ten", "use a whole number of images, at least 2"),
    ("trust-run-evaluator", "maybe", "use true or false"),
])
def test_a_malformed_release_setting_refuses_naming_it(key, value, message, tmp_path, task_identity):
    """A client's release settings are its node config's (else its environment's), checked
    before any work: a value it cannot read refuses the message, naming the key and the value."""
    run_config = _run_config(tmp_path)
    strategy = _server(run_config, tmp_path, _classifier())
    context = client_context(run_config, tmp_path / "clients", **{key.replace("-", "_"): value})
    reply = client_reply(client_app.evaluate, _evaluate_messages(strategy, [10])[10], context)
    assert reply.has_error() and f"node config {key}={value!r}: {message}" in reply.error.reason  # its own fault
