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
import threading
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.common.logger import log
from torch import nn
from torchvision.transforms.v2 import functional as TF

from collafuse_flwr.config import ConfigError
from collafuse_flwr.outputs import write_atomically
from collafuse_flwr.weights import Weights, file_digest, read_weights, resolve_weights

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
    """torch-fidelity's FID InceptionV3 (via torchmetrics), 2048 pool features. The weights are
    read here (`read_weights`) and handed to torch-fidelity as tensors: it never opens the file."""

    num_features = 2048

    def __init__(self, weights: Path):
        super().__init__()
        self.net = _inception_v3(weights, read_weights(weights))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(((_rgb(x).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))


class ClipFeatures(nn.Module):
    """The image tower of OpenAI's CLIP ViT-B/32 (QuickGELU) from an open_clip checkpoint
    (the full model or its `visual.*` weights, .safetensors or torch's format; `read_weights`)."""

    num_features = 512

    def __init__(self, weights: Path):
        super().__init__()
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        self.visual = _clip_visual(weights, read_weights(weights))
        self.register_buffer("mean", torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.visual.image_size
        resized = TF.resize(((_rgb(x) + 1) / 2).clamp(0, 1), list(size), antialias=True,
                            interpolation=TF.InterpolationMode.BICUBIC)
        return self.visual((resized.clamp(0, 1) - self.mean) / self.std)


_FIDELITY_LOADER = threading.Lock()


def _inception_v3(path: Path, state: dict[str, torch.Tensor]) -> nn.Module:
    """torchmetrics' `NoTrainInceptionV3` (torch-fidelity's FID network) on the current default
    device, with `state` as its weights (strict: every key and shape). torch-fidelity's
    constructor loads its weights itself (a URL, or `torch.load` of a path); it is given the
    tensors instead, by standing in for its URL loader while it is built. ValueError naming
    `path` if `state` does not fit."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity
    from torchmetrics.image.fid import NoTrainInceptionV3

    with _FIDELITY_LOADER:
        url_loader = fidelity.load_state_dict_from_url
        fidelity.load_state_dict_from_url = lambda *args, **kwargs: state
        try:
            return NoTrainInceptionV3("inception-v3-compat", ["2048"], None)
        except RuntimeError as err:
            raise _not_weights_of(path, "torch-fidelity's InceptionV3 FID weights", err) from None
        finally:
            fidelity.load_state_dict_from_url = url_loader


def _clip_visual(path: Path, state: dict[str, torch.Tensor]) -> nn.Module:
    """open_clip's ViT-B/32 (QuickGELU) image tower on the current default device, with the
    `visual.*` tensors of `state` as its weights (strict). ValueError naming `path` if they do
    not fit."""
    import open_clip

    visual = open_clip.create_model("ViT-B-32", force_quick_gelu=True, device=torch.get_default_device()).visual
    weights = {k.removeprefix("module.").removeprefix("visual."): v for k, v in state.items()
               if k.removeprefix("module.").startswith("visual.")}
    try:
        visual.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise _not_weights_of(path, "an open_clip CLIP ViT-B/32 checkpoint", err) from None
    return visual


def _not_weights_of(path: Path, network: str, err: RuntimeError) -> ValueError:
    """The error for weights that do not fit a network: load_state_dict's message, its list
    of missing keys cut short."""
    message = str(err)
    return ValueError(f"{path} is not {network}: {message[:400] + ' ...' if len(message) > 400 else message}")


NETWORK_OF_WEIGHTS = {"inception": _inception_v3, "clip": _clip_visual}


def _rgb(x: torch.Tensor) -> torch.Tensor:
    """Images (n, C, H, W) with C = 1 repeated to 3 channels; RGB unchanged."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """The SHA-256 (64 hex digits) of a network's weights (names, shapes and float32 values):
    its identity for caches, the same on the server and on a client that received them, and
    what a client pins an evaluator by (node config trusted-evaluators, clients/release.py)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        values = state[name].detach().float().contiguous().cpu().numpy()
        digest.update(f"{name}:{values.shape}".encode())
        digest.update(values.tobytes())
    return digest.hexdigest()


def pretrained_weights(fid_weights: str, fcd_weights: str) -> dict[str, Weights]:
    """Where the server's InceptionV3 and CLIP weights are (the run config's `fid_weights`,
    `fcd_weights`, else the environment, else the caches: collafuse_flwr/weights.py), each
    checked against its network before any is built: the file's names and shapes are read (not
    its data) and loaded into the network on the "meta" device. `ConfigError` naming the key (or
    the environment variable, or the cache) and the file for a configured path that does not
    exist, or a file that is cut off, a pickle, or not that network's weights."""
    weights = {"inception": resolve_weights("inception", fid_weights), "clip": resolve_weights("clip", fcd_weights)}
    for name, found in weights.items():
        if found.available:
            try:
                with torch.device("meta"):
                    NETWORK_OF_WEIGHTS[name](found.path, read_weights(found.path, shapes_only=True))
            except ValueError as err:
                source = found.found_in if found.found_in != "cache" else f"the cached {name} weights"
                raise ConfigError(f"{source}: {err}; {found.backbone.how_to_get}") from None
    return weights


def load_feature_networks(classifier: nn.Module, classifier_identity: str,
                          weights: dict[str, Weights]) -> list[FeatureNetwork]:
    """The classifier network (its identity: a digest of its weights) and every pretrained
    network whose weights are available (its identity: the SHA-256 of its file, `file_digest`)."""
    networks = [FeatureNetwork("classifier", classifier, "fd_classifier", "kid_classifier", classifier_identity)]
    builders = {"inception": (InceptionFeatures, "fid", "kid"), "clip": (ClipFeatures, "fcd", "kid_clip")}
    for name, (build, fd_name, kid_name) in builders.items():
        if weights[name].available:
            networks.append(FeatureNetwork(name, build(weights[name].path), fd_name, kid_name,
                                           file_digest(weights[name].path)))
    return networks


def cached_features(network: FeatureNetwork, images: torch.Tensor, cache_dir: Path, key: str) -> torch.Tensor:
    """`network.features(images)`, stored once as `<cache_dir>/<network>-<digest>.npy`; the
    digest covers the network's identity and `key`, which must identify the images. Written
    atomically and fsync'd (`write_atomically`); a cached file that cannot be read as (n, d)
    float32 features of these n images is computed again and replaced, with a logged line."""
    digest = hashlib.sha256(f"{network.identity}:{key}:{tuple(images.shape)}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{network.name}-{digest}.npy"
    if path.exists():
        try:
            cached = np.load(path, allow_pickle=False)
            if cached.dtype == np.float32 and cached.ndim == 2 and len(cached) == len(images):
                return torch.from_numpy(cached)
            reason = f"features of shape {cached.shape} and type {cached.dtype}"
        except (OSError, ValueError, EOFError) as err:
            reason = str(err)
        log(WARNING, "feature cache %s is damaged (%s); computing it again", path, reason)
    features = network.features(images)
    write_atomically(path, lambda tmp: np.save(tmp, features.numpy()))
    return features
