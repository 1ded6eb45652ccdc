"""Pretrained feature networks: where their weights are found, the message without them, and
the stand-in files of the real formats (random weights: they test the code path, not the values)."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from collafuse_flwr.config import ConfigError
from collafuse_flwr.metrics.features import ClipFeatures, InceptionFeatures, load_feature_networks
from collafuse_flwr.weights import CLIP_REPO, INCEPTION_FILE, INCEPTION_URL, file_digest, resolve_weights


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """No weights anywhere: empty torch hub and Hugging Face caches, no environment variables."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("COLLAFUSE_FID_WEIGHTS", "COLLAFUSE_FCD_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_missing_weights_say_which_metrics_are_skipped_and_how_to_supply_them(empty_caches):
    inception, clip = resolve_weights("inception"), resolve_weights("clip")
    assert not inception.available and not clip.available
    message = inception.skip_message()
    assert message.startswith("fid, kid skipped")
    for needed in ("fid-weights", "COLLAFUSE_FID_WEIGHTS", INCEPTION_URL, f"hub/checkpoints/{INCEPTION_FILE}"):
        assert needed in message
    message = clip.skip_message()
    assert message.startswith("fcd, kid_clip skipped")
    for needed in ("fcd-weights", "COLLAFUSE_FCD_WEIGHTS", CLIP_REPO):
        assert needed in message


def test_a_configured_path_that_does_not_exist_is_a_config_error(empty_caches, monkeypatch):
    with pytest.raises(ConfigError, match="fid-weights='/nowhere/w.pth': no such file"):
        resolve_weights("inception", "/nowhere/w.pth")
    monkeypatch.setenv("COLLAFUSE_FCD_WEIGHTS", "/nowhere/clip.bin")
    with pytest.raises(ConfigError, match="COLLAFUSE_FCD_WEIGHTS='/nowhere/clip.bin'"):
        resolve_weights("clip")


def test_weights_are_found_in_config_environment_and_standard_caches(empty_caches, standin_weights, monkeypatch):
    inception_file, clip_file = standin_weights
    assert resolve_weights("inception", str(inception_file)).found_in == "fid-weights"
    monkeypatch.setenv("COLLAFUSE_FCD_WEIGHTS", str(clip_file))
    assert resolve_weights("clip").path == clip_file.resolve()
    cache = empty_caches / "torch" / "hub" / "checkpoints" / INCEPTION_FILE
    cache.parent.mkdir(parents=True)
    cache.symlink_to(inception_file)
    found = resolve_weights("inception")
    assert found.found_in == "cache" and found.path == cache


def test_standin_files_load_as_the_real_networks(standin_weights, tmp_path):
    inception_file, clip_file = standin_weights
    grey = torch.rand(3, 1, 16, 16) * 2 - 1
    assert InceptionFeatures(inception_file)(grey).shape == (3, 2048)
    assert ClipFeatures(clip_file)(grey).shape == (3, 512)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="not torch-fidelity's InceptionV3"):
        InceptionFeatures(wrong)
    with pytest.raises(ValueError, match="not an open_clip CLIP ViT-B/32"):
        ClipFeatures(wrong)


def test_feature_networks_are_the_classifier_plus_what_has_weights(empty_caches, standin_weights, tmp_path):

    from collafuse_flwr.metrics.classifier import FeatureClassifier

    classifier = FeatureClassifier(1, 10)
    names = lambda ws: [(n.name, n.fd_name, n.kid_name) for n in load_feature_networks(classifier, "id", ws)]
    none = {"inception": resolve_weights("inception"), "clip": resolve_weights("clip")}
    assert names(none) == [("classifier", "fd_classifier", "kid_classifier")]
    both = {"inception": resolve_weights("inception", str(standin_weights[0])),
            "clip": resolve_weights("clip", str(standin_weights[1]))}
    assert names(both)[1:] == [("inception", "fid", "kid"), ("clip", "fcd", "kid_clip")]


def test_a_weights_files_digest_is_the_sha256_of_its_bytes_and_follows_every_change(tmp_path):
    """What pins pretrained weights between server and clients: the SHA-256 of the file, cached
    by path, size and modification time, so a rewritten file is hashed again."""
    path = tmp_path / "weights.pth"
    path.write_bytes(b"inception")
    assert file_digest(path) == hashlib.sha256(b"inception").hexdigest()
    path.write_bytes(b"incePtion")  # the same size
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000_000))
    assert file_digest(path) == hashlib.sha256(b"incePtion").hexdigest()
