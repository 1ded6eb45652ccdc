"""Evaluation with an honest-but-curious server and possibly malicious clients: the feature
network learns from images no client holds, the pooled row comes from feature moments (never
one image's features), and every evaluation reply has an exact schema checked on its decoded
values."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from collafuse_flwr import client_app, wire
from collafuse_flwr.config import RunConfig
from collafuse_flwr.data import client_data, load_table
from collafuse_flwr.data.clients import MIN_HELD_OUT, client_indices, reference_images
from collafuse_flwr.data.report import partition_frame
from collafuse_flwr.diffusion.models import Denoiser, build_denoiser
from collafuse_flwr.metrics.classifier import load_classifier
from collafuse_flwr.metrics.distances import feature_moments, frechet_distance, named_distances
from collafuse_flwr.metrics.features import FeatureNetwork, load_feature_networks, pretrained_weights, weights_digest
from collafuse_flwr.metrics.manifold import manifold_metrics, manifold_names
from collafuse_flwr.run_dir import RunDirectory
from collafuse_flwr.strategies import setup
from collafuse_flwr.strategies.collafuse import CollaFuseStrategy
from exchange import Grid, answer, send
from test_wire import RUN_KEY, client_context

# ----------------------------------------------------------------- the feature network's data


def test_feature_network_learns_from_images_no_client_holds(tiny_run_config, monkeypatch):
    """Digits have no test split: a seeded share is kept aside before partitioning; the
    feature network is trained and checked on exactly those images, none of any client's."""
    config = RunConfig.from_flower(tiny_run_config)
    reference = reference_images(config)
    clients = np.concatenate([np.concatenate(split) for split in client_indices(config)])
    assert reference.kept_aside and not np.intersect1d(reference.indices, clients).size
    assert len(reference.indices) + len(clients) == len(load_table(config))
    assert len(reference.check) == round(config.held_out_fraction * len(reference.indices))
    seen = {}

    def spy(name, function):
        def call(first, images, *args):
            seen[name] = images
            return function(first, images, *args)
        monkeypatch.setattr(setup, function.__name__, call)

    spy("train", setup.cache_classifier)
    spy("check", setup.classifier_accuracy)
    setup.feature_network(config, RunDirectory.create(config))
    table = load_table(config)
    assert torch.equal(seen["train"], torch.from_numpy(table.images[reference.train]))
    assert torch.equal(seen["check"], torch.from_numpy(table.images[reference.check]))
    notes = setup.evaluation_notes(config, pretrained_weights("", ""))
    assert "kept aside from all clients" in notes["fd_classifier"]
    assert "no pooled KID" in notes["pooled"] and "labels" in notes["pooled"]


@pytest.mark.parametrize("dataset,kept_aside", [("cifar10", False), ("celeba", True), ("awa2", True)])
def test_fixtures_keep_their_clients_feasible(dataset, kept_aside, shared_data, tmp_path):
    """CIFAR-10's test split serves as is (the clients keep all training images); CelebA and
    AwA2 fixtures have no test split, and what the kept-aside share leaves still gives each of
    the default 5 clients training images and the 2 held-out images its distances need."""
    config = RunConfig(dataset=dataset, data_dir=str(shared_data / f"{dataset}-mini"), image_size=32,
                       num_clients=5, output_dir=str(tmp_path))
    config.validate()
    reference, splits = reference_images(config), client_indices(config)
    assert reference.kept_aside == kept_aside and len(splits) == 5
    assert all(len(train) >= 1 and len(held) >= MIN_HELD_OUT for train, held in splits)
    clients = sum(len(train) + len(held) for train, held in splits)
    if kept_aside:
        assert clients + len(reference.indices) == len(load_table(config))
    else:  # the official test split, beside the whole training split
        assert clients == len(load_table(config)) == 2000 and len(reference.indices) == 500
    images = partition_frame(config).query("kind == 'images'").set_index(["client", "split"])["count"]
    assert images.sum() == len(load_table(config))  # partition.csv accounts for every image
    assert images.get(("reference", "kept-aside"), 0) == (len(reference.indices) if kept_aside else 0)


# ----------------------------------------------------------------- the pooled row from moments

D = 4


class Pixels(torch.nn.Module):
    """A stand-in feature network of d = 4; the tests make up its features."""

    num_features = D


NETWORK = FeatureNetwork("pixels", Pixels(), "fd_pixels", "kid_pixels", "v1")
NODES = (10, 11, 12)  # given partitions 0, 1, 2; node 12 is the one under test


def _features(seed: int, n: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) + shift


REAL = {0: _features(0, 6), 1: _features(1, 7, 0.5), 2: _features(2, 6)}
FAKE = {0: _features(3, 8, 1.0), 1: _features(4, 8, -1.0), 2: _features(5, 8)}


def _content(pid: int) -> RecordDict:
    """What an honest client `pid` with held-out features REAL[pid] and generated features
    FAKE[pid] sends: 2 sampling steps per image, every metric, the moments of both sets."""
    real, fake = REAL[pid], FAKE[pid]
    metrics = {
        "partition-id": pid, "num-generated": len(fake), "num-real": len(real), "client-sampling-steps": 2,
        "sample-seconds": 0.5, "nfe-sample": 2.0 * len(fake), "flops-sample": 1e6,
        **named_distances(NETWORK.fd_name, NETWORK.kid_name, real, fake), "eval-seconds": 0.1,
        **manifold_metrics(NETWORK.name, real, fake),  # client 1's sets (7, 8) are large enough
        "own-class-share": 0.25 * (pid + 1),  # the digits have classes: always reported
    }
    moments = {f"pixels-{kind}": (m.mean, m.covariance)
               for kind, m in (("real", feature_moments(real)), ("generated", feature_moments(fake)))}
    return RecordDict({wire.METRICS: MetricRecord(metrics), wire.MOMENTS: wire.pack_moments(moments)})


def _evaluate(run_config: dict, tmp_path, contents: dict[int, RecordDict], networks=(NETWORK,)):
    """One evaluation round of a CollaFuse server on `contents` ({node: reply content}):
    (metrics.csv, summary.json, log.txt)."""
    config = RunConfig.from_flower(run_config)
    net = build_denoiser(config.image_size, 1, config.block_channels)
    strategy = CollaFuseStrategy(config, RunDirectory(tmp_path), RUN_KEY, Denoiser(net, 1e-3, 0.0), (1, 8, 8),
                                 list(networks), {})
    sent = send(strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), Grid(contents)))
    strategy.aggregate_evaluate(1, [answer(sent[node], content) for node, content in contents.items()])
    metrics = pd.read_csv(tmp_path / "metrics.csv", dtype={"client": str})
    return metrics, json.loads((tmp_path / "summary.json").read_text()), (tmp_path / "log.txt").read_text()


@pytest.fixture
def eval_config(tiny_run_config) -> dict:
    """t_zeta = T: the server hands over pure noise (it runs no sampler step), no attacks."""
    return dict(tiny_run_config, **{"t-zeta": tiny_run_config["timesteps"], "disclosure-num-images": 0,
                                    "max-uploads-per-client": 64})


def _pooled_fd(pids) -> float:
    real, fake = (feature_moments(torch.cat([sets[p] for p in pids])) for sets in (REAL, FAKE))
    return frechet_distance(real, fake)


def test_pooled_row_is_the_distance_of_all_clients_features_from_their_moments(eval_config, tmp_path,
                                                                                 task_identity):
    metrics, summary, _ = _evaluate(eval_config, tmp_path, {node: _content(pid) for pid, node in enumerate(NODES)})
    assert not metrics["metric"].str.contains("fault").any()
    pooled = metrics[metrics["client"] == "pooled"].set_index("metric")["value"]
    # no KID: it needs every image
    assert sorted(pooled.index) == ["fd_pixels", "num-generated", "num-real", "own-class-share"]
    assert pooled["fd_pixels"] == pytest.approx(_pooled_fd([0, 1, 2]), rel=1e-5)
    assert pooled["own-class-share"] == pytest.approx(0.5)  # the clients' mean: equal sample sizes
    assert pooled["num-real"] == 19 and pooled["num-generated"] == 24
    assert summary["quality"]["pooled"]["num-real"] == 19


def test_without_pooled_metrics_replies_carry_no_moments(eval_config, tmp_path, task_identity):
    run_config = dict(eval_config, **{"pooled-metrics": False})
    bare = _content(0)
    del bare[wire.MOMENTS]
    metrics, _, log = _evaluate(run_config, tmp_path, {10: bare, 11: _content(1)})
    faults = metrics[metrics["metric"].str.contains("fault")]
    assert faults[["client", "metric"]].values.tolist() == [["1", "evaluate-fault-rejected"]]
    assert "records ['metrics', 'moments']; expected ['metrics']" in log
    assert not (metrics["client"] == "pooled").any()


# ----------------------------------------------------------------- what a hostile reply can do


def _metric(key: str, value):
    def change(content: RecordDict) -> None:
        content[wire.METRICS][key] = value
    return change


def _without(key: str):
    def change(content: RecordDict) -> None:
        del content[wire.METRICS][key]
    return change


def _manifold(**values):
    """Claim 7 held-out images, which makes the four manifold metrics due, with `values`."""
    def change(content: RecordDict) -> None:
        content[wire.METRICS]["num-real"] = 7
        for name in manifold_names(NETWORK.name):
            content[wire.METRICS][name] = values.get(name.split("_")[0], 0.5)
    return change


def _array(key: str, value: np.ndarray | Array):
    def change(content: RecordDict) -> None:
        content[wire.MOMENTS][key] = value if isinstance(value, Array) else Array(value)
    return change


def _declared(declared: tuple[int, ...], carried: np.ndarray | bytes) -> Array:
    """An Array declaring float32 of shape `declared` whose bytes carry something else."""
    data = carried if isinstance(carried, bytes) else Array(carried).data
    return Array(dtype="float32", shape=declared, stype="numpy.ndarray", data=data)


def _one_column_short(content: RecordDict) -> None:
    moments = content[wire.MOMENTS]
    moments["pixels-real-mean"] = Array(moments["pixels-real-mean"].numpy()[:-1].copy())
    moments["pixels-real-covariance"] = Array(moments["pixels-real-covariance"].numpy()[:-1, :-1].copy())


def _covariance(change):
    def apply(content: RecordDict) -> None:
        covariance = content[wire.MOMENTS]["pixels-generated-covariance"].numpy().copy()
        change(covariance)
        content[wire.MOMENTS]["pixels-generated-covariance"] = Array(covariance)
    return apply


def _record(name: str, record):
    def change(content: RecordDict) -> None:
        content[name] = record
    return change


def _drop_moments(content: RecordDict) -> None:
    del content[wire.MOMENTS]


ROWS = REAL[2].numpy()
HOSTILE = {
    "moments one column short": (_one_column_short, "expected (4,) and (4, 4)"),
    "100,000 rows declared as a covariance": (
        _array("pixels-real-covariance", _declared((D, D), np.zeros((100_000, D), np.float32))), "exceeds"),
    "per-image rows declared as a mean": (_array("pixels-real-mean", _declared((D,), ROWS)), "at most 4"),
    "not .npy bytes": (_array("pixels-real-mean", _declared((D,), b"\x93NUMPY" + bytes(40))), "not a .npy"),
    "float64 moments": (_array("pixels-real-mean", np.zeros(D)), "float64"),
    "NaN in a mean": (_array("pixels-real-mean", np.full(D, np.nan, np.float32)), "non-finite"),
    "asymmetric covariance": (_covariance(lambda c: c.__setitem__((0, 1), c[0, 1] + 1)), "not symmetric"),
    "covariance not positive semi-definite": (_covariance(lambda c: c.__imul__(-1)), "not positive semi-definite"),
    "per-image rows beside the moments": (_array("pixels-real", ROWS), "unexpected ['pixels-real']"),
    "moments of an unknown network": (_array("inception-real-mean", np.zeros(D, np.float32)), "inception-real-mean"),
    "per-image feature rows (the old reply)": (
        _record("features", ArrayRecord({"pixels-real": Array(ROWS)})), "records ['features', 'metrics', 'moments']"),
    "a labels record": (_record("labels", ArrayRecord({"y": Array(np.zeros(6, np.int64))})), "records"),
    "no moments": (_drop_moments, "records ['metrics']"),
    "a disclosure figure": (_metric("linkage-top1", 0.0), "unexpected ['linkage-top1']"),
    "a reconstruction figure": (_metric("reconstruction-psnr-tweedie", -1e9), "reconstruction-psnr-tweedie"),
    "negative FLOPs": (_metric("flops-sample", -1.0), "flops-sample=-1.0"),
    "negative seconds": (_metric("sample-seconds", -5.0), "sample-seconds=-5.0"),
    "negative evaluation seconds": (_metric("eval-seconds", -0.1), "eval-seconds=-0.1"),
    "NFEs other than images x steps": (_metric("nfe-sample", 1.0), "nfe-sample=1.0"),
    "NaN Fréchet distance": (_metric("fd_pixels", math.nan), "fd_pixels=nan"),
    "negative Fréchet distance": (_metric("fd_pixels", -1.0), "fd_pixels=-1.0"),
    "infinite KID": (_metric("kid_pixels", math.inf), "kid_pixels=inf"),
    "negative KID std": (_metric("kid_pixels_std", -0.5), "kid_pixels_std=-0.5"),
    "list-valued metric": (_metric("fd_pixels", [1.0, 2.0]), "fd_pixels=[1.0, 2.0]"),
    "missing metric": (_without("eval-seconds"), "missing ['eval-seconds']"),
    "missing quality figure": (_without("kid_pixels_std"), "missing ['kid_pixels_std']"),
    "count as a float": (_metric("num-real", 6.0), "num-real=6.0"),
    "more generated images than asked": (_metric("num-generated", 9), "num-generated=9"),
    "held-out count above the cap": (_metric("num-real", 100_000), "num-real=100000"),
    "one held-out image": (_metric("num-real", 1), "num-real=1"),
    "more steps than the sampler's": (_metric("client-sampling-steps", 11), "client-sampling-steps=11"),
    "a share above 1": (_metric("own-class-share", 1.5), "own-class-share=1.5"),
    "no own-class share": (_without("own-class-share"), "missing ['own-class-share']"),
    "a conditioning figure of unconditional clients": (_metric("condition-accuracy", 1.0), "condition-accuracy"),
    "another node's partition": (_metric("partition-id", 0), "partition-id 0"),
    "precision of too few images": (_metric("precision_pixels", 0.5), "unexpected ['precision_pixels']"),
    "no manifold metrics of 7 images": (_metric("num-real", 7), "missing ['coverage_pixels', 'density_pixels'"),
    "a precision above 1": (_manifold(precision=1.5), "precision_pixels=1.5"),
    "a negative density": (_manifold(density=-0.1), "density_pixels=-0.1"),
    "a density above the held-out count": (_manifold(density=1e6), "density_pixels=1000000.0"),
    "a NaN coverage": (_manifold(coverage=math.nan), "coverage_pixels=nan"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_evaluation_replies_are_rejected_and_change_nothing_else(case, eval_config, tmp_path,
                                                                        task_identity):
    """Each hostile reply (node 12, partition 2) becomes one rejection with its reason; the round
    goes on, the other clients' rows and the pooled row are theirs alone, and nothing of the
    hostile reply reaches metrics.csv or summary.json (quality, disclosure or cost)."""
    change, reason = HOSTILE[case]
    hostile = _content(2)
    change(hostile)
    metrics, summary, log = _evaluate(eval_config, tmp_path, {10: _content(0), 11: _content(1), 12: hostile})
    faults = metrics[metrics["metric"].str.contains("fault")]
    assert faults[["client", "metric"]].values.tolist() == [["2", "evaluate-fault-rejected"]]
    rejection = next(line for line in log.splitlines() if "(node 12) rejected" in line)
    assert reason in rejection
    assert set(metrics[metrics["client"] == "2"]["metric"]) == {"bytes-down-sample", "bytes-down-evaluation",
                                                                "evaluate-fault-rejected"}  # what it was sent
    pooled = metrics[metrics["client"] == "pooled"].set_index("metric")["value"]
    assert pooled["fd_pixels"] == pytest.approx(_pooled_fd([0, 1]), rel=1e-5) and pooled["num-real"] == 13
    assert set(summary["quality"]["clients"]) == {"0", "1"} and summary["disclosure"] == {}
    assert set(summary["cost"]["clients"]["2"]) == {"bytes-down", "bytes-down-evaluation"}


# ----------------------------------------------------------------- what the server can learn


@pytest.fixture(scope="module")
def digits_feature_network(tmp_path_factory):
    """The digits (8x8) run config of t_zeta = 0 (clients run no sampler step) and the path of
    its feature network, trained on the kept-aside images (once for this module)."""
    from conftest import TINY

    output = tmp_path_factory.mktemp("feature-network")
    run_config = dict(TINY, **{"t-zeta": 0, "metric-classifier-epochs": 15, "disclosure-num-images": 0,
                               "output-dir": str(output)})
    config = RunConfig.from_flower(run_config)
    path, _, _ = setup.feature_network(config, RunDirectory.create(config))
    return run_config, path


@pytest.fixture
def honest_round(digits_feature_network, tmp_path, task_identity):
    """Every reply that clients 0 and 1 send in a real evaluation round, and the metrics.csv the
    server writes from them."""
    run_config, path = digits_feature_network
    config = RunConfig.from_flower(run_config)
    classifier = load_classifier(path)
    networks = load_feature_networks(classifier, weights_digest(classifier.state_dict()), pretrained_weights("", ""))
    net = build_denoiser(config.image_size, 1, config.block_channels)
    strategy = CollaFuseStrategy(config, RunDirectory(tmp_path), RUN_KEY, Denoiser(net, 1e-3, 0.0), (1, 8, 8),
                                 networks, {})
    sent = send(strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), Grid([10, 11])))
    context = client_context(run_config, tmp_path / "clients", trust_run_evaluator=True)
    replies = [client_app.evaluate(sent[node], context) for node in (10, 11)]
    strategy.aggregate_evaluate(1, replies)
    return config, path, replies, pd.read_csv(tmp_path / "metrics.csv", dtype={"client": str})


def test_honest_replies_pass_the_schema(honest_round):
    config, _, _, metrics = honest_round
    assert not metrics["metric"].str.contains("fault").any()
    pooled = metrics[metrics["client"] == "pooled"].set_index("metric")["value"]
    # each client's held-out set counts up to eval-num-samples images (`pooled_quality`)
    held_out = sum(min(len(client_data(config, pid).held_out), config.eval_num_samples) for pid in (0, 1))
    assert pooled["num-real"] == held_out and pooled["num-generated"] == 2 * config.eval_num_samples
    assert pooled["fd_classifier"] > 0


def test_the_server_cannot_recover_held_out_labels_from_an_evaluation_reply(honest_round):
    """The attack the server can run with its own feature network (it trained the classifier):
    label each held-out image by the classifier head on that image's features. Given per-image
    feature rows (what clients used to send) it recovers most labels of a 2-class client; the
    reply now holds only statistics of the whole set, which do not change when the images are
    reordered, so any per-image guess from it is one label for all: at best the majority class."""
    config, path, replies, _ = honest_round
    classifier = load_classifier(path)
    data = client_data(config, 0)
    labels = data.held_out_targets
    assert len(labels.unique()) == 2
    majority = float(labels.bincount().max()) / len(labels)

    def recover(arrays: dict[str, np.ndarray]) -> torch.Tensor:
        """One guess per held-out image from what the server received: each per-image row
        gets its own; a set statistic (the mean feature) gives one guess for every image."""
        with torch.no_grad():
            for values in arrays.values():
                if values.shape == (len(labels), classifier.num_features):
                    return classifier.head(torch.from_numpy(values)).argmax(1)
            mean = torch.from_numpy(arrays["classifier-real-mean"])
            return classifier.head(mean).argmax().repeat(len(labels))

    with torch.no_grad():
        rows = classifier(data.held_out)
    old_reply = {"classifier-real": rows.numpy()}
    assert float((recover(old_reply) == labels).float().mean()) > 0.8

    content = replies[0].content
    assert set(content.keys()) == {wire.METRICS, wire.MOMENTS}
    assert all(not isinstance(v, list) for v in content[wire.METRICS].values())
    arrays = {key: array.numpy() for key, array in content[wire.MOMENTS].items()}
    d = classifier.num_features
    assert {values.shape for values in arrays.values()} == {(d,), (d, d)}
    assert float((recover(arrays) == labels).float().mean()) <= majority
    # what was sent is the statistic of the set: the same for the images in any order
    shuffled = feature_moments(rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))])
    np.testing.assert_allclose(arrays["classifier-real-mean"], shuffled.mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(arrays["classifier-real-covariance"], shuffled.covariance.numpy(), rtol=1e-4, atol=1e-6)
