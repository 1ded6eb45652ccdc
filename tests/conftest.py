"""Shared fixtures: tiny settings that keep every test fast on 2 CPU cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")  # every flwr process would ask the internet
# One thread per torch process: the tiny models gain nothing from more, and with two pytest
# workers each running a simulation on 2 cores, two tiny runs side by side took 83-86 s each
# with torch's default threads (166-171 CPU-s per pair, most likely OpenMP threads waiting on
# busy cores) and 54-63 s with one. Inherited by every process a test starts.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The tiny fixtures' clients hold a few held-out images each and generate eval-num-samples = 8:
# under a client's default minimum (32 images per statistic, more than d = 64 for the classifier's
# moments; clients/release.py) every evaluation would be refused. Simulated clients inherit this;
# the tests of the minimum set their own.
os.environ.setdefault("COLLAFUSE_MIN_RELEASE_IMAGES", "2")

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
    "condition": "none",  # unconditional unless a test conditions (the default is the dataset's condition)
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


def pytest_collection_modifyitems(items) -> None:
    """Mark every test that uses the real dataset subsets `shared_data` (select them with
    `-m shared_data`, leave them out with `-m "not shared_data"`)."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared_data)


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures are set up
def pytest_runtest_setup(item) -> None:
    """Under `--dist loadgroup` a test of an `xdist_group` carries its group in its node id
    (pytest-xdist schedules by it). Without it the group's tests are spread over the workers and
    each worker sets up the group's shared run again (the deployment: 7 minutes) with no test
    failing: fail them instead."""
    if getattr(item.config.option, "loadgroup", False) and item.get_closest_marker("xdist_group") \
            and "@" not in item.nodeid:
        pytest.fail(f"pytest-xdist did not group {item.nodeid}: pytest {pytest.__version__} and this "
                    "pytest-xdist do not work together (see the pin in pyproject.toml)")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real dataset fixtures beside the checkout (../shared/data), or $COLLAFUSE_SHARED_DATA.

    Their terms forbid redistribution, so they are read in place and never copied into the
    repository."""
    root = Path(os.environ.get("COLLAFUSE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not (root / "cifar10-mini" / "labels.csv").is_file():
        pytest.skip(f"real dataset subsets not found in {root} (set COLLAFUSE_SHARED_DATA to run these)")
    return root


@pytest.fixture(scope="session")
def standin_weights(tmp_path_factory) -> tuple[Path, Path]:
    """Weights files in the formats users supply, with random values: torch-fidelity's
    InceptionV3 state dict (.pth) and an open_clip ViT-B/32 image tower (.safetensors, float16).
    They exercise the FID and FCD code paths; their numbers mean nothing."""
    from unittest import mock

    import open_clip
    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("weights")
    with mock.patch.object(fidelity, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        inception = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(inception.state_dict(), root / "weights-inception-standin.pth")
    visual = open_clip.create_model("ViT-B-32", force_quick_gelu=True).visual
    save_file({f"visual.{k}": v.half().contiguous() for k, v in visual.state_dict().items()},
              str(root / "open_clip_model.safetensors"))
    return root / "weights-inception-standin.pth", root / "open_clip_model.safetensors"


@pytest.fixture(scope="session")
def standin_text_weights(tmp_path_factory) -> Path:
    """An open_clip ViT-B/32 checkpoint with the text tower only (what condition='text' reads;
    .safetensors, float16, random values): it exercises the code path, its embeddings mean nothing."""
    import open_clip
    from safetensors.torch import save_file

    model = open_clip.create_model("ViT-B-32", force_quick_gelu=True)
    path = tmp_path_factory.mktemp("text-weights") / "open_clip_model.safetensors"
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items() if not k.startswith("visual.")},
              str(path))
    return path
