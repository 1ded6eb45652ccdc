"""Shared fixtures: tiny settings that keep every test fast on 2 CPU cores."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

TINY = {
    "num-server-rounds": 1,
    "num-clients": 5,
    "image-size": 8,
    "timesteps": 100,
    "t-zeta": 20,
    "unet-block-channels": "8,16",
    "batch-size": 32,
    "client-images-per-round": 64,
    "server-images-per-round": 64,
    "sampling-steps": 10,
    "eval-num-samples": 8,
    "metric-classifier-epochs": 1,
}


@pytest.fixture
def tiny_run_config(tmp_path) -> dict:
    """Flower-style run config (kebab-case keys) for a tiny run writing below tmp_path."""
    return dict(TINY, **{"output-dir": str(tmp_path / "runs")})


@pytest.fixture
def task_identity():
    """Messages can only be built inside a Flower task; pretend to be one."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
