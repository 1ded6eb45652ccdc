"""The offline feature network behind `fd_classifier` and `kid_classifier`.

A small CNN trained to classify the dataset's training images, or to predict their binary
attributes when the dataset has no classes (CelebA). It needs no downloaded weights, so it is
always available; its distances are NOT comparable to Inception FID and carry their own names.
It is used for evaluation only.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from collafuse_flwr.data.table import as_model_input
from collafuse_flwr.outputs import write_atomically


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
    written (`write_atomically`) first if the file is absent. A file lock serialises
    concurrent calls."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            trained = train_classifier(images, targets, epochs, seed)
            write_atomically(path, lambda tmp: save_file(trained.state_dict(), str(tmp)))
    return load_classifier(path)


def load_classifier(path: Path) -> FeatureClassifier:
    """Load a cached feature network; its sizes are read from the weights' shapes."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no fd_classifier feature network at {path}")
    return classifier_from_state(load_file(str(path)))


def classifier_from_state(state: dict[str, torch.Tensor]) -> FeatureClassifier:
    """A feature network from its weights; its sizes are read from their shapes."""
    num_classes, num_features = state["head.weight"].shape
    net = FeatureClassifier(state["body.0.weight"].shape[1], num_classes, num_features)
    net.load_state_dict(state)
    return net.eval()


def classifier_accuracy(
    net: FeatureClassifier, images: torch.Tensor, targets: torch.Tensor, columns: torch.Tensor | None = None
) -> float:
    """Top-1 accuracy on class labels (N,), or the mean per-attribute accuracy on (N, A), over
    the attributes where `columns` (A,) is 1 (None: all); images as in `train_classifier`."""
    keep = slice(None) if columns is None else columns.bool()
    correct = 0.0
    with torch.no_grad():
        for batch in torch.arange(len(images)).split(512):
            logits = net.logits(as_model_input(images[batch]))
            if targets.ndim == 2:
                correct += float(((logits > 0).float() == targets[batch])[:, keep].float().sum())
            else:
                correct += float((logits.argmax(1) == targets[batch]).float().sum())
    return correct / (targets.numel() if targets.ndim == 1 else targets[:, keep].numel())
