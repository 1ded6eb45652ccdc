"""The server's run directory: its layout, the next free index, the run key, the runs of a
configuration, and the record that tells the launcher which directory a Flower run wrote."""

from __future__ import annotations

import pytest

from collafuse_flwr.config import RunConfig
from collafuse_flwr.run_dir import RunDirectory


def test_the_layout(tmp_path):
    run_dir = RunDirectory(tmp_path / "runs" / "00004-digits-collafuse-tz200")
    assert RunDirectory(run_dir) == run_dir and str(run_dir) == str(run_dir.path)
    assert run_dir.handover_grid(4) == run_dir.path / "samples" / "round-004-handover.png"
    assert run_dir.server_only_grid(12) == run_dir.path / "samples" / "round-012-server-only.png"
    assert run_dir.checkpoint(3) == run_dir.path / "checkpoints" / "round-003"
    assert run_dir.feature_network_file("abc") == tmp_path / "runs" / ".cache" / "fd_classifier-abc.safetensors"
    assert run_dir.features_cache == tmp_path / "runs" / ".cache" / "features"
    assert [p.name for p in (run_dir.config_json, run_dir.metrics_csv, run_dir.log_txt, run_dir.summary_json,
                             run_dir.partition_csv, run_dir.partition_png, run_dir.run_key_file)] == [
        "config.json", "metrics.csv", "log.txt", "summary.json", "partition.csv", "partition.png", "run-key"]


def test_runs_are_numbered_and_named_after_their_config(tmp_path):
    config = RunConfig.from_flower({"output-dir": str(tmp_path / "out"), "t-zeta": 300})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "00007-cifar10-fedavg").mkdir()  # any run's index counts
    first, second = RunDirectory.create(config), RunDirectory.create(config)
    assert [first.name, second.name] == ["00008-digits-collafuse-tz300", "00009-digits-collafuse-tz300"]
    assert first.path.is_absolute() and first.root == tmp_path / "out"
    assert RunDirectory.name_for(RunConfig.from_flower({"strategy": "fedavg"})) == "digits-fedavg"


def test_the_runs_of_a_config_are_those_with_its_config_json_newest_first(tmp_path):
    config = RunConfig.from_flower({"output-dir": str(tmp_path)})
    older, unwritten, other, another_version, newer = (RunDirectory.create(config) for _ in range(5))
    for run_dir in (older, newer):
        run_dir.write_config(config.to_flower())
    other.write_config(dict(config.to_flower(), seed=7))
    another_version.write_config(dict(config.to_flower(), **{"a-key-of-another-version": 1}))
    assert not unwritten.config_json.exists()  # killed before its config was written: nothing to resume
    assert list(RunDirectory.runs_of(config)) == [newer, older]


def test_the_run_key_is_made_once_and_read_back(tmp_path):
    run_dir = RunDirectory(tmp_path)
    key = run_dir.run_key()
    assert len(key) == 32 and RunDirectory(tmp_path).run_key() == key
    run_dir.run_key_file.write_text("../../etc\n")
    with pytest.raises(RuntimeError, match="holds no run key"):
        run_dir.run_key()


def test_a_flower_run_records_its_run_directory_for_the_launcher(tmp_path):
    run_dir = RunDirectory.create(RunConfig.from_flower({"output-dir": str(tmp_path)}))
    run_dir.record_flower_run(1234567890123456789)
    assert RunDirectory.of_flower_run(tmp_path, "1234567890123456789") == run_dir
    assert RunDirectory.flower_run_file(tmp_path, 1) == tmp_path / ".runs" / "1"
    assert RunDirectory.of_flower_run(tmp_path, "1") is None  # failed before its run directory was known
