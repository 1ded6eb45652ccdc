"""A sample of the clients per round (clients-per-round) and a subset evaluated (eval-clients):
drawn reproducibly from the seed, absent clients' uploads kept, whole runs played in process."""

from __future__ import annotations

import pandas as pd
import pytest

from collafuse_flwr.config import RunConfig
from collafuse_flwr.data import client_data
from collafuse_flwr.run_dir import RunDirectory
from collafuse_flwr.seeds import public_seed
from collafuse_flwr.strategies.collafuse import CollaFuseStrategy
from collafuse_flwr.strategies.parties import drawn_partitions
from collafuse_flwr.summary import read_metrics, reproducible_metrics
from collafuse_flwr.tools.inprocess import run_in_process


def test_draws_are_reproducible_uniform_and_change_every_round():
    draws = [drawn_partitions(5, 2, public_seed(0, "clients", r)) for r in range(1, 2001)]
    assert draws[:3] == [drawn_partitions(5, 2, public_seed(0, "clients", r)) for r in (1, 2, 3)]
    assert all(len(set(d)) == 2 and d == sorted(d) and set(d) <= set(range(5)) for d in draws)
    assert len({tuple(d) for d in draws[:10]}) > 1
    shares = [sum(pid in d for d in draws) / len(draws) for pid in range(5)]
    assert all(abs(share - 0.4) < 0.04 for share in shares)  # each client drawn 2/5 of the rounds
    assert drawn_partitions(5, 5, 123) == list(range(5))


def _sampled(tiny_run_config, tmp_path, **overrides) -> dict:
    return dict(tiny_run_config, **{"num-server-rounds": 3, "clients-per-round": 2, "eval-clients": 3,
                                    "eval-every": 1, "output-dir": str(tmp_path / "runs"), **overrides})


def _clients(metrics: pd.DataFrame, server_round: int, metric: str) -> set[int]:
    rows = metrics[(metrics["round"] == server_round) & (metrics["metric"] == metric)]
    return {int(c) for c in rows["client"] if c.isdigit()}


@pytest.mark.parametrize("strategy", ["collafuse", "fedavg"])
def test_a_round_addresses_its_drawn_clients_and_the_pool_keeps_the_absent(strategy, tiny_run_config, tmp_path):
    run_config = _sampled(tiny_run_config, tmp_path, strategy=strategy)
    config = RunConfig.from_flower(run_config)
    run_dir = run_in_process(run_config, tmp_path / "clients")
    metrics = read_metrics(run_dir)
    evaluated = drawn_partitions(5, 3, public_seed(config.seed, "eval-clients"))
    trained = set()
    for r in (1, 2, 3):
        drawn = set(drawn_partitions(5, 2, public_seed(config.seed, "clients", r)))
        trained |= drawn
        assert _clients(metrics, r, "bytes-down-train") == drawn == _clients(metrics, r, "images-seen")
        # FedAvg's global model serves any client; a CollaFuse client needs its own denoiser
        ready = set(evaluated) if strategy == "fedavg" else trained & set(evaluated)
        assert _clients(metrics, r, "fd_classifier") == ready
        if strategy == "collafuse":
            pool = metrics[(metrics["round"] == r) & (metrics["metric"] == "pool-size")]["value"].item()
            assert pool == sum(len(client_data(config, pid).train) for pid in trained)  # absent clients' stay
            assert _clients(metrics, r, "views-per-image") == trained
            assert _clients(metrics, r, "server-only-fd_classifier") == set(evaluated)  # the audit: evaluated only
    log = run_dir.log_txt.read_text()
    assert ("was never drawn for training" in log) == (strategy == "collafuse" and not set(evaluated) <= trained)
    assert "2/2 clients accepted" in log or strategy == "fedavg"


def _gap_seed() -> int:
    """A seed whose round 3 draws a client that round 1 drew and round 2 did not."""
    for seed in range(100):
        rounds = [set(drawn_partitions(5, 2, public_seed(seed, "clients", r))) for r in (1, 2, 3)]
        if (rounds[0] - rounds[1]) & rounds[2]:
            return seed
    raise AssertionError("no such seed below 100")


def test_a_run_cut_off_after_its_clients_trained_resumes_to_the_same_metrics(tiny_run_config, tmp_path,
                                                                            monkeypatch):
    """Round 3 is cut off after its clients trained and saved; the resumed round 3 starts each
    client from its own previous denoiser (round 1's for one that round 2 did not draw), so the
    resumed run ends with exactly the metrics of an uninterrupted one."""
    run_config = _sampled(tiny_run_config, tmp_path, seed=_gap_seed(), **{"eval-every": 0, "disclosure-num-images": 0})
    whole = run_in_process(run_config, tmp_path / "clients")  # the same clients (their secrets) in both runs

    original = CollaFuseStrategy._train_server
    cut = {"done": False}

    def cut_off(self, server_round):
        if server_round == 3 and not cut["done"]:
            cut["done"] = True
            raise KeyboardInterrupt("cut off")
        return original(self, server_round)

    resumed_config = dict(run_config, **{"output-dir": str(tmp_path / "resumed")})
    monkeypatch.setattr(CollaFuseStrategy, "_train_server", cut_off)
    with pytest.raises(KeyboardInterrupt):
        run_in_process(resumed_config, tmp_path / "clients")
    resumed_dir = run_in_process(resumed_config, tmp_path / "clients")
    assert "resumed after round 2 of 3" in resumed_dir.log_txt.read_text()
    pd.testing.assert_frame_equal(reproducible_metrics(resumed_dir), reproducible_metrics(whole))


def test_run_directory_of_a_run_in_process_is_the_servers(tiny_run_config, tmp_path):
    run_dir = run_in_process(dict(tiny_run_config, **{"disclosure-num-images": 0}), tmp_path / "clients")
    assert isinstance(run_dir, RunDirectory) and run_dir.summary_json.exists()
    assert sorted(p.name for p in (tmp_path / "clients").iterdir()) == [f"partition-{k}" for k in range(5)]
    assert not list((tmp_path / "runs").rglob("partition-*"))  # the clients' state is below their own root


def test_torch_threads_of_the_clients_change_no_result(tiny_run_config, tmp_path):
    """Clients on one or two torch threads (a simulation's actors get one per CPU) end with the
    same metrics; a raising client is the fault Flower records."""
    run_config = dict(tiny_run_config, **{"fault-injection": "1:1:raise", "disclosure-num-images": 0})
    runs = [run_in_process(dict(run_config, **{"output-dir": str(tmp_path / f"runs-{threads}")}), tmp_path / "clients",
                           client_threads=threads) for threads in (1, 2)]
    pd.testing.assert_frame_equal(*(reproducible_metrics(run) for run in runs))
    assert read_metrics(runs[1]).query("metric == 'train-fault-raised'")["client"].tolist() == ["1"]
    assert "fault-injection: client 1 raises in round 1" in runs[1].log_txt.read_text()
