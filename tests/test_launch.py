"""collafuse-run merges TOML overlays and key=value strings into what flwr run accepts, makes
output-dir absolute, and stops the local SuperLink its run started (and nothing else)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from flwr.common.config import parse_config_args

from collafuse_flwr.tools.launch import (
    absolute_path,
    absolute_paths,
    alive,
    descendants,
    end_processes,
    local_superlinks,
    merge_run_configs,
    own_clients_settings,
    process_table,
    stopping_local_superlink,
)


def test_overlay_and_strings_merge_later_wins(tmp_path):
    overlay = tmp_path / "x.toml"
    overlay.write_text('dataset = "celeba"\nt-zeta = 200\nunet-attention = true\nclient-lr = 0.0002\n')
    merged = merge_run_configs([str(overlay), "t-zeta=100 data-dir='/data/my faces' attribute-groups='a,b; c'"])
    assert parse_config_args([merged]) == {
        "dataset": "celeba", "t-zeta": 100, "unet-attention": True, "client-lr": 0.0002,
        "data-dir": "/data/my faces", "attribute-groups": "a,b; c",
    }


def test_a_string_with_a_single_quote_survives():
    assert parse_config_args([merge_run_configs(["data-dir=\"/data/o'brien\""])]) == {"data-dir": "/data/o'brien"}


def test_relative_paths_are_taken_from_the_launchers_directory(tmp_path, monkeypatch):
    """Not from the SuperLink's, which keeps the directory it was first started in."""
    monkeypatch.chdir(tmp_path)
    assert absolute_path("runs") == tmp_path / "runs"
    assert absolute_path(str(tmp_path / "a" / ".." / "b")) == tmp_path / "b"
    assert absolute_path("") is None and absolute_path("a\0b") is None  # the ServerApp refuses them
    project = Path(__file__).resolve().parents[1]
    config = absolute_paths({"data-dir": "../shared/data/x", "fid-weights": "", "t-zeta": 3}, project)
    assert config == {"data-dir": str(tmp_path.parent / "shared" / "data" / "x"), "fid-weights": "", "t-zeta": 3,
                      "output-dir": str(tmp_path / "results" / "runs")}  # the project's default, from here


def _fake_superlink(port: str) -> subprocess.Popen:
    """A process whose command line reads like the local SuperLink's on `port`, with a child."""
    code = ("import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)")
    return subprocess.Popen([sys.executable, "-c", code, "/bin/flower-superlink", "--port", port])


def _children(pid: int) -> set[int]:
    return descendants(process_table(), [pid]) - {pid}


def test_only_a_superlink_started_inside_the_block_is_stopped_with_what_it_started(tmp_path):
    env = {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "1"}  # no real SuperLink listens on port 1
    before = _fake_superlink("1")
    try:
        with stopping_local_superlink(env):
            started = _fake_superlink("1")
            other_port = _fake_superlink("2")
            deadline = time.monotonic() + 10
            while not (_children(started.pid) and _children(before.pid)) and time.monotonic() < deadline:
                time.sleep(0.05)
            table = process_table()
            child = table[next(iter(_children(started.pid)))].identity
            assert sorted(local_superlinks(table, env)) == sorted([before.pid, started.pid])
        assert started.wait(timeout=5) == -signal.SIGTERM and not alive([child])
        assert before.poll() is None and other_port.poll() is None
    finally:
        table = process_table()
        end_processes(table[pid].identity for pid in descendants(table, [before.pid, other_port.pid]))
        for process in (before, started, other_port):
            process.wait()


def test_a_launcher_gives_its_own_simulated_clients_the_runs_evaluator_and_weights(tmp_path):
    """The user runs every party of a simulation: its clients trust the run's evaluator and take
    the weights files the run config names (absolute), unless the user's environment says
    otherwise; nothing is given for keys the run config leaves empty, nor for a file that does
    not exist (the server stops such a run; passed on, it would reach a shared SuperLink's later
    runs)."""
    (tmp_path / "inception.pth").write_bytes(b"weights")
    run_config = {"fid-weights": str(tmp_path / "inception.pth"), "fcd-weights": "", "t-zeta": 20,
                  "text-weights": str(tmp_path / "none.safetensors")}
    assert own_clients_settings(run_config, {}) == {"trust-run-evaluator": "1",
                                                    "fid-weights": str(tmp_path / "inception.pth")}
    user = {"COLLAFUSE_TRUST_RUN_EVALUATOR": "0", "COLLAFUSE_FID_WEIGHTS": "/mine/inception.pth"}
    assert own_clients_settings(run_config, user) == {}
