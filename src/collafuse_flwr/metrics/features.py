"""Feature networks for the quality and disclosure metrics, and a cache of real-image features.

Every network maps images (n, C, H, W) in [-1, 1] (C = 1 or 3, any size) to features (n, d):
- `classifier`: the dataset's offline feature CNN (classifier.py), d = 64 -> fd_classifier, kid_classifier;
- `inception`: InceptionV3 pool features of torch-fidelity's FID network via torchmetrics,
  images as uint8 RGB resized to 299x299 inside the network, d = 2048 -> fid, kid;
- `clip`: OpenAI CLIP ViT-B/32 image embeddings via open_clip, images resized to 224x224
  (bicubic) and normalised with CLIP's mean and std, d = 512 -> fcd, kid_clip.
Grey images are repeated to three channels for the pretrained networks.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from collafuse_flwr.metrics.classifier import load_classifier
from collafuse_flwr.metrics.weights import Weights, resolve_weights

BATCH = 32


@dataclass
class FeatureNetwork:
    """A feature network, the names of the two distances on its features and an identity
    for caches (changes whenever its weights do)."""

    name: str
    module: nn.Module
    fd_name: str
    kid_name: str
    identity: str

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(n, d) float32 features of images (n, C, H, W) in [-1, 1], in batches."""
        self.module.eval()
        out = [self.module(batch.float()).float() for batch in images.split(BATCH)]
        return torch.cat(out) if out else torch.empty(0)


class InceptionFeatures(nn.Module):
    """torch-fidelity's FID InceptionV3 (via torchmetrics), 2048 pool features."""

    num_features = 2048

    def __init__(self, weights: Path):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        try:
            self.net = NoTrainInceptionV3("inception-v3-compat", ["2048"], str(weights))
        except Exception as err:  # a wrong file must not pass silently
            raise ValueError(f"{weights} is not torch-fidelity's InceptionV3 FID weights: {err}") from err

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(((_rgb(x).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))


class ClipFeatures(nn.Module):
    """The image tower of OpenAI's CLIP ViT-B/32 (QuickGELU) from an open_clip checkpoint
    (the full model or its `visual.*` weights, .safetensors or a torch pickle)."""

    num_features = 512

    def __init__(self, weights: Path):
        super().__init__()
        import open_clip
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        self.visual = open_clip.create_model("ViT-B-32", force_quick_gelu=True).visual
        state = _load_state(weights)
        visual = {k.removeprefix("module.").removeprefix("visual."): v for k, v in state.items()
                  if k.removeprefix("module.").startswith("visual.")}
        try:
            self.visual.load_state_dict(visual, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{weights} is not an open_clip CLIP ViT-B/32 checkpoint: {err}") from err
        self.register_buffer("mean", torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.visual.image_size
        resized = TF.resize(((_rgb(x) + 1) / 2).clamp(0, 1), list(size), antialias=True,
                            interpolation=TF.InterpolationMode.BICUBIC)
        return self.visual((resized.clamp(0, 1) - self.mean) / self.std)


def _rgb(x: torch.Tensor) -> torch.Tensor:
    """Images (n, C, H, W) with C = 1 repeated to 3 channels; RGB unchanged."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


def file_identity(path: Path) -> str:
    """A short digest of a weights file's path, size and modification time."""
    stat = Path(path).stat()
    return hashlib.sha256(f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def pretrained_weights(fid_weights: str, fcd_weights: str) -> dict[str, Weights]:
    """Resolved weights of InceptionV3 and CLIP (see weights.py); raises `ConfigError` for a
    configured path that does not exist."""
    return {"inception": resolve_weights("inception", fid_weights), "clip": resolve_weights("clip", fcd_weights)}


def load_feature_networks(classifier_path: Path, weights: dict[str, Weights]) -> list[FeatureNetwork]:
    """The classifier network and every pretrained network whose weights are available."""
    networks = [FeatureNetwork("classifier", load_classifier(classifier_path), "fd_classifier",
                               "kid_classifier", file_identity(classifier_path))]
    builders = {"inception": (InceptionFeatures, "fid", "kid"), "clip": (ClipFeatures, "fcd", "kid_clip")}
    for name, (build, fd_name, kid_name) in builders.items():
        if weights[name].available:
            networks.append(FeatureNetwork(name, build(weights[name].path), fd_name, kid_name,
                                           file_identity(weights[name].path)))
    return networks


def cached_features(network: FeatureNetwork, images: torch.Tensor, cache_dir: Path, key: str) -> torch.Tensor:
    """`network.features(images)`, stored once as `<cache_dir>/<network>-<digest>.npy`; the
    digest covers the network's identity and `key`, which must identify the images. Written
    atomically (a temporary file renamed into place)."""
    digest = hashlib.sha256(f"{network.identity}:{key}:{tuple(images.shape)}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{network.name}-{digest}.npy"
    if path.exists():
        return torch.from_numpy(np.load(path))
    features = network.features(images)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, features.numpy())
    os.replace(tmp, path)
    return features
