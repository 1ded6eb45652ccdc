"""The protocol's promises held against a curious server: it plays with everything it holds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from flwr.common.serde import recorddict_to_proto

from collafuse_flwr import client_app
from collafuse_flwr.clients.round import ClientRound
from collafuse_flwr.config import RunConfig
from collafuse_flwr.diffusion.models import Denoiser, build_denoiser
from collafuse_flwr.run_dir import RunDirectory
from collafuse_flwr.seeds import public_seed
from collafuse_flwr.strategies.collafuse import CollaFuseStrategy
from collafuse_flwr.summary import read_metrics, summarise
from collafuse_flwr.tools.inprocess import client_reply
from exchange import send_train
from test_wire import RUN_KEY, client_context


def _play(run_config: dict, tmp_path: Path, node_config=None) -> tuple[CollaFuseStrategy, list[bytes]]:
    """Two rounds of five real clients (nodes 10 to 14, with `node_config[node]` in their node
    configs) and the server; every message serialised."""
    config = RunConfig.from_flower(run_config)
    net = build_denoiser(config.image_size, 1, config.block_channels)
    strategy = CollaFuseStrategy(config, RunDirectory(tmp_path / "server"), RUN_KEY, Denoiser(net, 1e-3, 0.0),
                                 (1, 8, 8), [], {})
    (tmp_path / "server").mkdir()
    wire_bytes = []
    for server_round in (1, 2):
        sent = send_train(strategy, range(10, 15), server_round)
        replies = [client_reply(client_app.train, msg, client_context(run_config, tmp_path / "clients",
                                                                      **(node_config or {}).get(node, {})))
                   for node, msg in sent.items()]
        wire_bytes += [recorddict_to_proto(m.content).SerializeToString()
                       for m in [*sent.values(), *replies] if m.has_content()]
        strategy.aggregate_train(server_round, replies)
    strategy.checkpoint(2)
    return strategy, wire_bytes


def _reconstruction(strategy: CollaFuseStrategy) -> dict[tuple[str, str], float]:
    server_only = dict.fromkeys(range(strategy.config.num_clients), torch.zeros(8, 1, 8, 8))
    rows = strategy.audit.measure(strategy.denoiser.for_sampling(), server_only)
    return {(client, metric): value for client, metric, value in rows if metric.startswith("reconstruction-psnr")}


@pytest.mark.parametrize("policy", ["once", "fresh"])
def test_a_curious_server_cannot_recompute_the_upload_noise(policy, tiny_run_config, tmp_path, task_identity):
    """With the run config, every message both ways and every server-side file, the server finds
    no client secret, and recomputing eps from every seed it can derive does no better than the
    Wiener attack."""
    run_config = dict(tiny_run_config, **{"num-server-rounds": 2, "noise-policy": policy,
                                          "disclosure-num-images": 32})
    strategy, wire_bytes = _play(run_config, tmp_path)
    server_files = [p.read_bytes() for p in (tmp_path / "server").rglob("*") if p.is_file()]
    assert server_files and any(b"config" in b for b in wire_bytes)
    secrets = [p.read_bytes() for p in (tmp_path / "clients").glob("partition-*/secret")]
    assert len(secrets) == 5
    for secret in secrets:
        assert not any(secret in blob for blob in wire_bytes + server_files)
    psnr = _reconstruction(strategy)
    for pid in map(str, range(5)):
        assert psnr[(pid, "reconstruction-psnr-recompute")] <= psnr[(pid, "reconstruction-psnr-wiener")]


def test_noise_derived_from_the_run_config_is_taken_off_by_the_recompute_attack(
        tiny_run_config, tmp_path, task_identity, monkeypatch):
    """The control: had a client derived its upload noise from the run config (as this project
    once did), the same attack recovers its images almost exactly."""
    run_config = dict(tiny_run_config, **{"num-server-rounds": 2, "disclosure-num-images": 32})
    config = RunConfig.from_flower(run_config)
    public = public_seed(config.seed, "upload", config.identity_hash(), "once")
    monkeypatch.setattr(ClientRound, "upload_noise", lambda self: torch.randn(
        self.data.train.shape, generator=torch.Generator().manual_seed(public)))
    strategy, _ = _play(run_config, tmp_path)
    psnr = _reconstruction(strategy)
    assert min(psnr[(str(pid), "reconstruction-psnr-recompute")] for pid in range(5)) > 40


def test_the_server_reports_each_clients_epsilon_every_round(tiny_run_config, tmp_path, task_identity):
    """epsilon rows per client and round (fresh: one more view each round) and summary.json's
    privacy section; the audit runs the membership attack on every client."""
    run_config = dict(tiny_run_config, **{"num-server-rounds": 2, "noise-policy": "fresh", "t-zeta": 90,
                                          "clip-norm": 2.0, "disclosure-num-images": 16})
    strategy, _ = _play(run_config, tmp_path)
    config, metrics = strategy.config, read_metrics(strategy.run_dir)
    epsilon = metrics[metrics.metric == "epsilon"].pivot(index="client", columns="round", values="value")
    assert list(epsilon.index) == [str(pid) for pid in range(5)]
    assert (epsilon[1] == config.upload_epsilon(90, 1)).all() and (epsilon[2] == config.upload_epsilon(90, 2)).all()
    assert 0 < config.upload_epsilon(90, 1) < config.upload_epsilon(90, 2) < math.inf
    privacy = summarise(metrics, config, {})["privacy"]
    assert privacy["clip_norm"] == 2.0 and privacy["max_epsilon"] == config.upload_epsilon(90, 2)
    server_only = dict.fromkeys(range(5), torch.zeros(8, 1, 8, 8))
    rows = strategy.audit.measure(strategy.denoiser.for_sampling(), server_only)
    auc = {client: value for client, metric, value in rows if metric == "membership-auc"}
    assert sorted(auc) == [str(pid) for pid in range(5)] and all(0 <= v <= 1 for v in auc.values())


def test_a_client_uploads_nothing_beyond_its_own_privacy_budget(tiny_run_config, tmp_path, task_identity):
    """A malicious server sets the cut point, clipping and noise policy; a client with a
    privacy budget (nodes 10 and 11) uploads the first view (within it) and refuses the second
    (beyond it): an error reply, recorded as a fault, its first upload kept in the pool."""
    run_config = dict(tiny_run_config, **{"num-server-rounds": 2, "noise-policy": "fresh", "t-zeta": 90})
    config = RunConfig.from_flower(run_config)
    budget = (config.upload_epsilon(90, 1) + config.upload_epsilon(90, 2)) / 2
    limited = {node: {"privacy_budget": f"{budget}, {config.privacy_delta}"} for node in (10, 11)}
    strategy, _ = _play(run_config, tmp_path, limited)
    metrics = read_metrics(strategy.run_dir)
    faults = metrics[metrics.metric.str.startswith("train-fault")]
    refused = {str(strategy.parties.partition_of[node]) for node in limited}
    assert set(faults[faults["round"] == 2].client) == refused and faults[faults["round"] == 1].empty
    assert len(strategy.uploads) == 5
    epsilon = metrics[metrics.metric == "epsilon"]
    assert (epsilon[epsilon.client.isin(refused)].value <= budget).all()
    assert set(epsilon[epsilon.client.isin(refused)]["round"]) == {1}
