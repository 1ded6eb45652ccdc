"""Server checkpoints: atomic, keyed by the configuration, and what a resumed run keeps."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord

from collafuse_flwr.checkpoint import latest_checkpoint, resumable_run, save_checkpoint
from collafuse_flwr.config import ConfigError, RunConfig
from collafuse_flwr.diffusion.models import Denoiser, build_denoiser
from collafuse_flwr.run_dir import RunDirectory


def _model(seed: int = 0) -> Denoiser:
    return Denoiser(build_denoiser(8, 1, (8, 16), seed=seed), 1e-3, 0.99)


def test_identity_hash_ignores_only_operational_keys():
    base = RunConfig.from_flower({})
    assert RunConfig.from_flower({"output-dir": "/elsewhere", "resume": False,
                                  "round-timeout-seconds": 5.0}).identity_hash() == base.identity_hash()
    for change in ({"t-zeta": 300}, {"seed": 1}, {"num-server-rounds": 5}, {"noise-policy": "fresh"}):
        assert RunConfig.from_flower(change).identity_hash() != base.identity_hash()


def test_checkpoints_are_complete_or_absent_and_keep_two_rounds(tmp_path):
    config = RunConfig.from_flower({"num-server-rounds": 4})
    model = _model()
    for server_round in (1, 2, 3):
        save_checkpoint(RunDirectory(tmp_path), server_round, config, model, {"round": server_round})
    (tmp_path / "checkpoints" / "round-004.tmp").mkdir()  # a write cut off by a kill
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round-002", "round-003", "round-004.tmp"]
    checkpoint = latest_checkpoint(RunDirectory(tmp_path), config)
    assert checkpoint.server_round == 3 and checkpoint.strategy_state == {"round": 3}
    loaded = checkpoint.model
    for a, b in zip(loaded.net.parameters(), model.net.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_checkpoint_of_another_config_is_never_loaded(tmp_path):
    save_checkpoint(RunDirectory(tmp_path), 1, RunConfig.from_flower({"t-zeta": 200}), _model(), {})
    with pytest.raises(ConfigError, match="another configuration"):
        latest_checkpoint(RunDirectory(tmp_path), RunConfig.from_flower({"t-zeta": 300}))


def test_only_an_unfinished_run_of_the_same_config_is_resumed(tmp_path):
    config = RunConfig.from_flower({"num-server-rounds": 2, "output-dir": str(tmp_path)})
    finished, unfinished = (RunDirectory.create(config) for _ in range(2))
    assert finished.name == "00000-digits-collafuse-tz200" and unfinished.name == "00001-digits-collafuse-tz200"
    for run_dir, rounds in ((finished, 2), (unfinished, 1)):
        run_dir.write_config(config.to_flower())
        save_checkpoint(run_dir, rounds, config, _model(), {})
    newer_other = RunDirectory.create(config)
    newer_other.write_config(dict(config.to_flower(), seed=3))
    assert resumable_run(config) == unfinished
    save_checkpoint(unfinished, 2, config, _model(), {})
    assert resumable_run(config) is None


def test_truncated_metrics_keep_the_completed_rounds(tmp_path):
    run_dir = RunDirectory(tmp_path)
    run_dir.append_metrics([(0, "server", "feature-network-accuracy", 0.9)] +
                           [(r, "0", "train-loss", 1.0 / r) for r in (1, 2, 3)])
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("3,server,train-l")  # a row cut off by a kill
    run_dir.truncate_metrics(2)
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines == ["round,client,metric,value", "1,0,train-loss,1.0", "2,0,train-loss,0.5"]


def test_a_resumed_strategy_sees_the_runs_own_round_numbers(tiny_run_config, tmp_path, task_identity):
    """Flower's `start` counts the rounds of a resumed start from 1; the strategy's entry points
    get rounds_done + 1, ... (metrics.csv rows, checkpoint names)."""
    from collafuse_flwr.checkpoint import Checkpoint
    from collafuse_flwr.strategies.fedavg import FedAvgDiffusion

    config = RunConfig.from_flower(dict(tiny_run_config, strategy="fedavg", **{"num-server-rounds": 4}))
    strategy = FedAvgDiffusion(config, RunDirectory(tmp_path), "0" * 32, _model(), [], {})
    strategy.restore(Checkpoint(2, _model(), {}))
    # Flower's round 1 is the run's 3 of 4: not an evaluation round (only the last one is)
    assert strategy.configure_evaluate(1, strategy.initial_arrays(), ConfigRecord(), NoNodes()) == []
    strategy.aggregate_evaluate(1, [])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round-003"]


class NoNodes:
    def get_node_ids(self):
        return []
