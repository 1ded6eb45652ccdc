"""Damaged state stops a resume with an error naming the damaged file (never a silent new run or a
silent step back); saved denoisers load from their directory only; every write is atomic."""

from __future__ import annotations

import json
import os
import re
import shutil
from unittest import mock

import numpy as np
import pytest
import torch

from collafuse_flwr.checkpoint import latest_checkpoint, resumable_run, save_checkpoint
from collafuse_flwr.config import ConfigError, RunConfig
from collafuse_flwr.diffusion.models import Denoiser, build_denoiser
from collafuse_flwr.metrics.features import FeatureNetwork, cached_features
from collafuse_flwr.outputs import DamagedFileError, write_atomically, write_directory_atomically
from collafuse_flwr.run_dir import RunDirectory


def _model() -> Denoiser:
    return Denoiser(build_denoiser(8, 1, (8, 16)), 1e-3, 0.99)


@pytest.fixture
def interrupted_run(tmp_path):
    """A run of 4 rounds stopped after round 2: its config and the checkpoints of rounds 1 and 2."""
    config = RunConfig.from_flower({"num-server-rounds": 4, "output-dir": str(tmp_path)})
    run_dir = RunDirectory.create(config)
    run_dir.write_config(config.to_flower())
    for server_round in (1, 2):
        save_checkpoint(run_dir, server_round, config, _model(), {"round": torch.tensor(server_round)})
    return config, run_dir


def _cut(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGE = {  # what is done to the newest checkpoint, the file the error must name
    "state.json empty": (lambda d: (d / "state.json").write_text(""), "state.json"),
    "state.json cut off": (lambda d: _cut(d / "state.json"), "state.json"),
    "state.json not JSON": (lambda d: (d / "state.json").write_text("round = 2\n"), "state.json"),
    "state.json missing a key": (lambda d: (d / "state.json").write_text('{"round": 2, "num_server_rounds": 4}'),
                                 "state.json"),
    "state.json of another round": (lambda d: (d / "state.json").write_text(
        json.dumps(dict(json.loads((d / "state.json").read_text()), round=3))), "state.json"),
    "state.json missing": (lambda d: (d / "state.json").unlink(), "state.json"),
    "model/ missing": (lambda d: shutil.rmtree(d / "model"), "model"),
    "model weights cut off": (lambda d: _cut(d / "model" / "diffusion_pytorch_model.safetensors"),
                              "model"),
    "model weights missing": (lambda d: (d / "model" / "diffusion_pytorch_model.safetensors").unlink(), "model"),
    "model config not JSON": (lambda d: _cut(d / "model" / "config.json"), "model"),
    "optimizer.pt cut off": (lambda d: _cut(d / "model" / "optimizer.pt"), "model/optimizer.pt"),
    "ema.pt empty": (lambda d: _cut(d / "model" / "ema.pt", 0), "model/ema.pt"),
    "strategy.pt cut off": (lambda d: _cut(d / "strategy.pt"), "strategy.pt"),
    "strategy.pt not a dict": (lambda d: torch.save([1, 2], d / "strategy.pt"), "strategy.pt"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_stops_the_resume_naming_the_file(interrupted_run, damage):
    config, run_dir = interrupted_run
    newest = run_dir.checkpoint(2)
    do, named = DAMAGE[damage]
    do(newest)
    assert resumable_run(config) == run_dir  # not a new run from round 0
    with pytest.raises(DamagedFileError, match=re.escape(str(newest / named))) as raised:
        latest_checkpoint(run_dir, config)
    assert "delete that directory to resume from the round before it, or run with resume=false" in str(raised.value)
    assert sorted(p.name for p in run_dir.root.iterdir()) == [run_dir.name]


CONFIG_DAMAGE = {  # what is done to the run's config.json, and what the error says about it
    "empty": (lambda f: f.write_text(""), "empty"),
    "cut off": (lambda f: _cut(f), "not JSON, cut off?"),
    "not a JSON object": (lambda f: f.write_text('["seed", 7]\n'), r"not a run config \(a JSON object\)"),
    "not UTF-8": (lambda f: f.write_bytes(b'{"seed": "\xff"}'), "cannot be read"),
    "missing beside checkpoints": (lambda f: f.unlink(), "cannot be read"),
}


@pytest.mark.parametrize("damage", CONFIG_DAMAGE)
def test_a_damaged_config_json_stops_the_resume_naming_the_file(interrupted_run, damage):
    """A run directory whose config.json cannot be read may be this configuration's run: the
    resume stops naming the file and what to do, never silently starting a new run beside it."""
    config, run_dir = interrupted_run
    do, reason = CONFIG_DAMAGE[damage]
    do(run_dir.config_json)
    before = {p: p.read_bytes() for p in run_dir.path.rglob("*") if p.is_file()}
    with pytest.raises(DamagedFileError, match=rf"{re.escape(str(run_dir.config_json))}: {reason}") as raised:
        resumable_run(config)
    assert "restore that file, move the directory out of the output-dir, or run with resume=false" in str(raised.value)
    assert sorted(p.name for p in run_dir.root.iterdir()) == [run_dir.name]
    assert {p: p.read_bytes() for p in run_dir.path.rglob("*") if p.is_file()} == before


def test_a_state_json_with_another_hash_stops_the_resume(interrupted_run):
    config, run_dir = interrupted_run
    state_json = run_dir.checkpoint(2) / "state.json"
    state_json.write_text(json.dumps(dict(json.loads(state_json.read_text()), config_hash="0" * 16)))
    assert resumable_run(config) == run_dir
    with pytest.raises(ConfigError, match=f"{re.escape(str(state_json))} was written by a run of another"):
        latest_checkpoint(run_dir, config)


def test_after_deleting_the_damaged_checkpoint_the_run_resumes_from_the_round_before(interrupted_run):
    config, run_dir = interrupted_run
    _cut(run_dir.checkpoint(2) / "strategy.pt")
    with pytest.raises(DamagedFileError):
        latest_checkpoint(run_dir, config)
    shutil.rmtree(run_dir.checkpoint(2))
    checkpoint = latest_checkpoint(run_dir, config)
    assert checkpoint.server_round == 1 and checkpoint.strategy_state["round"] == 1


def test_a_finished_run_is_not_resumed_even_if_its_last_checkpoint_is_damaged(interrupted_run):
    config, run_dir = interrupted_run
    for server_round in (3, 4):
        save_checkpoint(run_dir, server_round, config, _model(), {})
    (run_dir.checkpoint(4) / "state.json").write_text("")
    assert resumable_run(config) is None


@pytest.mark.parametrize("missing", ["directory", "config.json", "diffusion_pytorch_model.safetensors"])
def test_a_denoiser_loads_from_its_directory_only(tmp_path, missing):
    """No hub look-up (diffusers would try huggingface.co) and no pickle fallback
    (diffusion_pytorch_model.bin): a missing file is an error naming the directory."""
    directory = tmp_path / "model"
    if missing != "directory":
        _model().save(directory)
        (directory / missing).unlink()
        torch.save({}, directory / "diffusion_pytorch_model.bin")
    with pytest.raises(DamagedFileError, match=f"{re.escape(str(directory))}: not a saved denoiser"):
        Denoiser.load(directory, 1e-3, 0.99)
    assert not Denoiser.exists(directory)


def test_an_atomic_write_that_fails_midway_leaves_the_old_file(tmp_path):
    path = tmp_path / "summary.json"
    write_atomically(path, '{"old": 1}\n')

    def fail_midway(tmp):
        tmp.write_text('{"new": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, fail_midway)
    assert path.read_text() == '{"old": 1}\n' and os.listdir(tmp_path) == ["summary.json"]
    with mock.patch("os.replace", side_effect=OSError("power cut")), pytest.raises(OSError):
        write_atomically(path, '{"new": 2}\n')
    assert path.read_text() == '{"old": 1}\n' and os.listdir(tmp_path) == ["summary.json"]
    write_atomically(tmp_path / "f.npy", lambda tmp: np.save(tmp, np.arange(3)))  # np.save goes by the extension
    assert sorted(os.listdir(tmp_path)) == ["f.npy", "summary.json"]


def test_atomic_writes_are_fsynced_before_they_replace_the_old_content(tmp_path):
    synced = []
    real_fsync = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def fill(directory):
        (directory / "model").mkdir()
        (directory / "model" / "weights").write_text("w")
        (directory / "state.json").write_text("s")

    with mock.patch("os.fsync", side_effect=record):
        write_atomically(tmp_path / "config.json", "{}\n")
        assert synced[0].endswith(".tmp.json") and synced[1:] == [str(tmp_path)]
        synced.clear()
        write_directory_atomically(tmp_path / "round-001", fill)
        tmp = tmp_path / "round-001.tmp"
        assert synced == [str(tmp / "model" / "weights"), str(tmp / "model"), str(tmp / "state.json"), str(tmp),
                          str(tmp_path)]
        synced.clear()
        RunDirectory(tmp_path).append_metrics([(1, "0", "train-loss", 0.5)])
        assert synced == [str(tmp_path / "metrics.csv")]


def test_a_directory_write_that_fails_midway_leaves_the_old_directory(tmp_path):
    model = _model()
    model.save(tmp_path / "model")
    before = {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()}
    with mock.patch("torch.save", side_effect=OSError("disk full")), pytest.raises(OSError):
        _model().save(tmp_path / "model")
    assert {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_a_damaged_feature_cache_is_computed_again(tmp_path):
    network = FeatureNetwork("classifier", torch.nn.Flatten(), "fd_classifier", "kid_classifier", "net")
    images = torch.randn(3, 1, 2, 2)
    first = cached_features(network, images, tmp_path, "key")
    (cache,) = tmp_path.iterdir()
    _cut(cache)
    again = cached_features(network, images, tmp_path, "key")
    assert torch.equal(first, again) and np.array_equal(np.load(cache), first.numpy())
