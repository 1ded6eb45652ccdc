"""Nothing is unpickled: a planted pickle in a checkpoint or passed as weights is refused with an
error naming the file, and the code in it never runs."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from collafuse_flwr.checkpoint import latest_checkpoint, save_checkpoint
from collafuse_flwr.config import ConfigError, RunConfig
from collafuse_flwr.diffusion.models import Denoiser, build_denoiser
from collafuse_flwr.metrics.features import InceptionFeatures, pretrained_weights
from collafuse_flwr.outputs import DamagedFileError
from collafuse_flwr.run_dir import RunDirectory


class Planted:
    """Unpickling this creates the marker file: a stand-in for code hidden in a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.fixture
def planted(tmp_path):
    """plant(path) writes a torch.save file at `path` whose unpickling creates `marker`; the
    first one is unpickled here once to show that it would."""
    marker = tmp_path / "marker"

    def plant(path: Path, raw: bool = False) -> Path:
        content = {"state": Planted(marker)}
        if raw:
            path.write_bytes(pickle.dumps(content))
        else:
            torch.save(content, path)
        return path

    probe = plant(tmp_path / "probe.pt")
    torch.load(probe, weights_only=False)
    assert marker.exists()
    marker.unlink()
    plant.marker = marker
    return plant


@pytest.fixture(autouse=True)
def free_of_environment(monkeypatch):
    for var in ("COLLAFUSE_FID_WEIGHTS", "COLLAFUSE_FCD_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)


def _model() -> Denoiser:
    return Denoiser(build_denoiser(8, 1, (8, 16)), 1e-3, 0.99)


def test_the_strategy_state_and_the_ema_load_without_unpickling(tmp_path):
    """What a CollaFuse checkpoint holds (RNG state, pool, audit views with (tensor, count)
    tuples and digests; AdamW and EMA states) comes back through weights_only loads."""
    config = RunConfig.from_flower({"num-server-rounds": 2})
    model = _model()
    loss = model.net(torch.randn(2, 1, 8, 8), torch.tensor([1, 5])).sample.square().mean()
    loss.backward()
    model.optimizer.step()
    model.after_step()
    state = {"generator": torch.Generator().manual_seed(3).get_state(), "uploads": {0: torch.randn(2, 1, 8, 8)},
             "audit": {"view_sum": {0: (torch.randn(2, 1, 8, 8).double(), 3)}, "last_digest": {0: "ab" * 32},
                       "views": {0: 3}}}
    save_checkpoint(RunDirectory(tmp_path), 1, config, model, state)
    checkpoint = latest_checkpoint(RunDirectory(tmp_path), config)
    assert torch.equal(checkpoint.strategy_state["generator"], state["generator"])
    assert checkpoint.strategy_state["audit"]["view_sum"][0][1] == 3
    assert checkpoint.strategy_state["audit"]["last_digest"] == state["audit"]["last_digest"]
    loaded = checkpoint.model
    assert loaded.ema.optimization_step == model.ema.optimization_step == 1
    for a, b in zip(loaded.ema.shadow_params, model.ema.shadow_params, strict=True):
        assert torch.equal(a, b)


def test_a_pickle_as_strategy_state_is_refused_and_never_run(tmp_path, planted):
    config = RunConfig.from_flower({"num-server-rounds": 2})
    save_checkpoint(RunDirectory(tmp_path), 1, config, _model(), {})
    strategy = planted(tmp_path / "checkpoints" / "round-001" / "strategy.pt")
    with pytest.raises(DamagedFileError, match=f"{re.escape(str(strategy))}: it holds objects other than tensors"):
        latest_checkpoint(RunDirectory(tmp_path), config)
    assert not planted.marker.exists()


@pytest.mark.parametrize("name", ["ema.pt", "optimizer.pt"])
@pytest.mark.parametrize("raw", [False, True], ids=["torch.save", "pickle.dumps"])
def test_a_pickle_in_a_saved_denoiser_is_refused_and_never_run(tmp_path, planted, name, raw):
    _model().save(tmp_path / "model")
    path = planted(tmp_path / "model" / name, raw=raw)
    with pytest.raises(DamagedFileError, match=f"{re.escape(str(path))}: it holds objects other than tensors"):
        Denoiser.load(tmp_path / "model", 1e-3, 0.99)
    assert not planted.marker.exists()


def test_a_pickle_as_fid_weights_is_a_config_error_and_never_run(tmp_path, planted):
    weights = planted(tmp_path / "inception.pth")
    message = f"fid-weights: {re.escape(str(weights))}: it holds objects other than tensors"
    with pytest.raises(ConfigError, match=message):
        pretrained_weights(str(weights), "")
    with pytest.raises(ValueError, match=re.escape(str(weights))):  # nor when the network is built from it
        InceptionFeatures(weights)
    assert not planted.marker.exists()


@pytest.mark.parametrize("name", ["open_clip_pytorch_model.bin", "clip.pt"])
def test_a_pickle_as_fcd_weights_is_a_config_error_and_never_run(tmp_path, planted, monkeypatch, name):
    weights = planted(tmp_path / name)
    message = f"fcd-weights: {re.escape(str(weights))}: it holds objects other than tensors"
    with pytest.raises(ConfigError, match=message):
        pretrained_weights("", str(weights))
    monkeypatch.setenv("COLLAFUSE_FCD_WEIGHTS", str(weights))
    with pytest.raises(ConfigError, match=f"COLLAFUSE_FCD_WEIGHTS: {re.escape(str(weights))}"):
        pretrained_weights("", "")
    assert not planted.marker.exists()


def _wrong_files(root: Path, standin: Path) -> dict[str, Path]:
    """Weights files of the wrong format, each named by what is wrong with it."""
    files = {}
    files["text"] = root / "notes.pth"
    files["text"].write_text("these are not weights\n")
    files["empty"] = root / "empty.bin"
    files["empty"].write_bytes(b"")
    files["not-a-state-dict"] = root / "list.pth"
    torch.save([torch.zeros(2)], files["not-a-state-dict"])
    files["wrong-keys"] = root / "keys.pth"
    torch.save({"conv.weight": torch.zeros(1)}, files["wrong-keys"])
    files["text-as-safetensors"] = root / "notes.safetensors"
    files["text-as-safetensors"].write_text("these are not weights either\n")
    files["cut-off"] = root / f"cut{standin.suffix}"
    data = standin.read_bytes()
    files["cut-off"].write_bytes(data[: len(data) // 2])
    return files


@pytest.mark.parametrize("damage", ["text", "empty", "not-a-state-dict", "wrong-keys", "text-as-safetensors",
                                    "cut-off", "wrong-shape"])
def test_fid_weights_of_the_wrong_format_are_a_config_error(tmp_path, standin_weights, damage):
    inception, _ = standin_weights
    files = _wrong_files(tmp_path, inception)
    files["wrong-shape"] = tmp_path / "shape.pth"
    state = torch.load(inception, weights_only=True)
    state["fc.weight"] = torch.zeros(10, 2048)
    torch.save(state, files["wrong-shape"])
    with pytest.raises(ConfigError, match=f"fid-weights: {re.escape(str(files[damage]))}"):
        pretrained_weights(str(files[damage]), "")


@pytest.mark.parametrize("damage", ["text", "empty", "not-a-state-dict", "wrong-keys", "text-as-safetensors",
                                    "cut-off", "wrong-shape", "inception-weights"])
def test_fcd_weights_of_the_wrong_format_are_a_config_error(tmp_path, standin_weights, damage):
    inception, clip = standin_weights
    files = _wrong_files(tmp_path, clip)
    from safetensors.torch import load_file

    state = load_file(str(clip))
    state["visual.proj"] = torch.zeros(768, 256)
    files["wrong-shape"] = tmp_path / "shape.safetensors"
    save_file(state, str(files["wrong-shape"]))
    files["inception-weights"] = inception
    with pytest.raises(ConfigError, match=f"fcd-weights: {re.escape(str(files[damage]))}"):
        pretrained_weights("", str(files[damage]))


def test_the_standin_weights_pass_the_check(standin_weights):
    inception, clip = standin_weights
    weights = pretrained_weights(str(inception), str(clip))
    assert weights["inception"].path == inception.resolve() and weights["clip"].path == clip.resolve()
