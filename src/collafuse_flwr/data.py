"""Datasets and their non-IID partitions across clients.

The embedded default is scikit-learn's digits (1,797 real 8x8 grey images of 10 digits,
shipped inside the package, so it works offline), resized to `image-size`. Images are
tensors (N, C, H, W) in [-1, 1]; labels stay on the client that owns the images.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from collafuse_flwr.config import ConfigError, RunConfig


@dataclass(frozen=True)
class ClientData:
    """One client's images: `train` (N, C, H, W) and `held_out` (M, C, H, W), labels beside."""

    train: torch.Tensor
    train_labels: torch.Tensor
    held_out: torch.Tensor
    held_out_labels: torch.Tensor


def load_digits_images(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn digits as (1797, 1, S, S) float32 in [-1, 1] and labels (1797,) int64.

    The 8x8 images (values 0..16) are upsampled bilinearly to S x S.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 2 - 1).contiguous(), torch.from_numpy(digits.target).long()


@lru_cache(maxsize=4)
def load_dataset(name: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All images and labels of dataset `name` (cached per process)."""
    if name == "digits":
        return load_digits_images(image_size)
    raise ConfigError(f"dataset={name!r}: unknown; allowed: digits")


def label_groups(labels: np.ndarray, num_clients: int, classes_per_client: int, seed: int):
    """Pathological non-IID split: classes are shuffled by `seed` and dealt out in turn,
    `classes_per_client` to each client; a class held by several clients is split evenly
    among them. Every image lands in exactly one client. Returns one index array per client.
    """
    classes = np.unique(labels)
    if num_clients * classes_per_client < len(classes):
        raise ConfigError(
            f"partition='label-groups' with num-clients={num_clients} and "
            f"classes-per-client={classes_per_client} covers only "
            f"{num_clients * classes_per_client} of the {len(classes)} classes; raise "
            "classes-per-client or num-clients, or use partition='dirichlet'"
        )
    if classes_per_client > len(classes):
        raise ConfigError(
            f"classes-per-client={classes_per_client}: the dataset has only {len(classes)} classes"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    owners: dict[int, list[int]] = {int(c): [] for c in classes}
    for client in range(num_clients):
        for j in range(classes_per_client):
            owners[int(order[(client * classes_per_client + j) % len(classes)])].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, holders in owners.items():
        members = rng.permutation(np.flatnonzero(labels == c))
        for holder, chunk in zip(holders, np.array_split(members, len(holders))):
            parts[holder].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def flower_partition(labels: np.ndarray, num_clients: int, scheme: str, alpha: float, seed: int):
    """Dirichlet(alpha) or IID split with flwr-datasets partitioners on an index+label table."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    order = np.random.default_rng(seed).permutation(len(labels))  # IidPartitioner splits in order
    table = Dataset.from_dict({"index": order, "label": labels[order]})
    if scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=alpha,
            min_partition_size=2,
            self_balancing=False,
            seed=seed,
        )
    else:
        partitioner = IidPartitioner(num_partitions=num_clients)
    partitioner.dataset = table
    try:
        with warnings.catch_warnings():  # its retries warn; the outcome is reported below
            warnings.simplefilter("ignore", UserWarning)
            return [
                np.sort(np.asarray(partitioner.load_partition(i)["index"]))
                for i in range(num_clients)
            ]
    except ValueError as err:
        raise ConfigError(
            f"partition='{scheme}' with dirichlet-alpha={alpha} and num-clients={num_clients} "
            f"could not give every client at least 2 images ({err}); raise dirichlet-alpha or "
            "lower num-clients"
        ) from err


@lru_cache(maxsize=4)
def partition_indices(
    dataset: str, image_size: int, num_clients: int, scheme: str, k: int, alpha: float, seed: int
) -> tuple[np.ndarray, ...]:
    """One array of dataset indices per client; disjoint, covering, reproducible by seed."""
    _, labels = load_dataset(dataset, image_size)
    labels = labels.numpy()
    if num_clients > len(labels):
        raise ConfigError(f"num-clients={num_clients}: more clients than images ({len(labels)})")
    if scheme == "label-groups":
        return tuple(label_groups(labels, num_clients, k, seed))
    return tuple(flower_partition(labels, num_clients, scheme, alpha, seed))


def client_data(config: RunConfig, partition_id: int) -> ClientData:
    """The training and held-out images of client `partition_id` under `config`."""
    if not 0 <= partition_id < config.num_clients:
        raise ConfigError(
            f"partition id {partition_id} is outside [0, num-clients={config.num_clients})"
        )
    images, labels = load_dataset(config.dataset, config.image_size)
    parts = partition_indices(
        config.dataset,
        config.image_size,
        config.num_clients,
        config.partition,
        config.classes_per_client,
        config.dirichlet_alpha,
        config.seed,
    )
    idx = np.random.default_rng([config.seed, partition_id]).permutation(parts[partition_id])
    n_held = max(1, int(round(len(idx) * config.held_out_fraction)))
    if len(idx) - n_held < 1:
        raise ConfigError(f"client {partition_id} has too few images ({len(idx)}) to hold some out")
    held, train = torch.from_numpy(np.sort(idx[:n_held])), torch.from_numpy(np.sort(idx[n_held:]))
    return ClientData(images[train], labels[train], images[held], labels[held])


def image_shape(config: RunConfig) -> tuple[int, int, int]:
    """(C, H, W) of the configured dataset's images."""
    images, _ = load_dataset(config.dataset, config.image_size)
    return tuple(images.shape[1:])
