"""Offline image-quality metrics on a small classifier's features: fd_classifier, kid_classifier.

No pretrained Inception or CLIP weights are available offline, so the features come from a
small CNN trained to classify the dataset's training images, or to predict their binary
attributes when the dataset has no classes (CelebA) (a stand-in for a public
pretrained network; it is used for evaluation only). The Fréchet distance and KID are
torchmetrics' FID and KID computed on these features, so the numbers are NOT comparable
to Inception FID: they are reported as `fd_classifier` and `kid_classifier`.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from collafuse_flwr.data.table import as_model_input


class FeatureClassifier(nn.Module):
    """CNN on (n, C, S, S) images in [-1, 1]; `forward` returns (n, num_features) features,
    `logits` the class (or attribute) scores used to train it."""

    def __init__(self, channels: int, num_classes: int, num_features: int = 64):
        super().__init__()
        self.num_features = num_features
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(64 * 16, num_features), nn.GELU(),
        )
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.float())

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_classifier(
    images: torch.Tensor, targets: torch.Tensor, epochs: int, seed: int
) -> FeatureClassifier:
    """Train a `FeatureClassifier` with Adam on images (N, C, S, S) (uint8, or float in
    [-1, 1]; converted batch by batch) and `targets`: class labels (N,) int64
    (cross-entropy) or binary attributes (N, A) float (per-attribute logistic loss)."""
    torch.manual_seed(seed)
    multi_label = targets.ndim == 2
    net = FeatureClassifier(images.shape[1], targets.shape[1] if multi_label else int(targets.max()) + 1)
    loss_fn = nn.functional.binary_cross_entropy_with_logits if multi_label else nn.functional.cross_entropy
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=generator).split(128):
            loss = loss_fn(net.logits(as_model_input(images[batch])), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


def cache_classifier(
    path: Path, images: torch.Tensor, targets: torch.Tensor, epochs: int, seed: int
) -> FeatureClassifier:
    """The feature network cached at `path` (safetensors); trained on (images, targets) and
    written atomically first if the file is absent. A file lock serialises concurrent calls."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            trained = train_classifier(images, targets, epochs, seed)
            tmp = path.with_suffix(".tmp")
            save_file(trained.state_dict(), str(tmp))
            os.replace(tmp, path)
    return load_classifier(path)


def load_classifier(path: Path) -> FeatureClassifier:
    """Load a cached feature network; its sizes are read from the weights' shapes."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no fd_classifier feature network at {path}")
    state = load_file(str(path))
    num_classes, num_features = state["head.weight"].shape
    net = FeatureClassifier(state["body.0.weight"].shape[1], num_classes, num_features)
    net.load_state_dict(state)
    return net.eval()


def classifier_accuracy(net: FeatureClassifier, images: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy on class labels (N,), or the mean per-attribute accuracy on (N, A);
    images as in `train_classifier`."""
    correct = 0.0
    with torch.no_grad():
        for batch in torch.arange(len(images)).split(512):
            logits = net.logits(as_model_input(images[batch]))
            predicted = (logits > 0).float() if targets.ndim == 2 else logits.argmax(1)
            correct += float((predicted == targets[batch]).float().sum())
    return correct / targets.numel()


def frechet_and_kid(
    extractor: nn.Module, real: torch.Tensor, fake: torch.Tensor
) -> dict[str, float]:
    """Fréchet distance and KID (mean, std) between two image sets (n, C, H, W) in [-1, 1]
    on `extractor`'s features (it needs an int attribute `num_features`).

    FD = |mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^{1/2}) (Heusel et al. 2017);
    KID = unbiased MMD^2 with the cubic polynomial kernel (Binkowski et al. 2018), over
    50 subsets of min(n_real, n_fake) samples, drawn from a fixed seed so that equal inputs
    give equal numbers.
    """
    fid = FrechetInceptionDistance(feature=extractor, normalize=True)
    subset = min(len(real), len(fake))
    kid = KernelInceptionDistance(feature=extractor, subset_size=subset, subsets=50, normalize=True)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)  # torchmetrics draws KID's subsets from the global generator
        for metric in (fid, kid):
            metric.update(real.float(), real=True)
            metric.update(fake.float(), real=False)
        kid_mean, kid_std = kid.compute()
        return {
            "fd_classifier": float(fid.compute()),
            "kid_classifier": float(kid_mean),
            "kid_classifier_std": float(kid_std),
        }
