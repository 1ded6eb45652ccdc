"""What one client holds: its training images and a held-out split for evaluation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from collafuse_flwr.config import ConfigError, RunConfig
from collafuse_flwr.data.loaders import data_root, load_table
from collafuse_flwr.data.partitions import partition
from collafuse_flwr.data.table import as_model_input


@dataclass(frozen=True)
class ClientData:
    """One client's images `train` (N, C, S, S) and `held_out` (M, C, S, S), float32 in
    [-1, 1], with the targets of the evaluation feature network beside them: class labels
    (N,) int64, or attributes (N, A) float32 for a dataset without classes (CelebA)."""

    train: torch.Tensor
    train_targets: torch.Tensor
    held_out: torch.Tensor
    held_out_targets: torch.Tensor


@lru_cache(maxsize=4)
def client_indices(config: RunConfig) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """(train, held-out) dataset indices of every client: the client's partition, shuffled by
    (seed, client), with round(held-out-fraction * n) images (at least 1) held out."""
    out = []
    for pid, part in enumerate(partition(load_table(config), config)):
        idx = np.random.default_rng([config.seed, pid]).permutation(part)
        n_held = max(1, int(round(len(idx) * config.held_out_fraction)))
        if len(idx) - n_held < 1:
            raise ConfigError(f"client {pid} has too few images ({len(idx)}) to hold some out")
        out.append((np.sort(idx[n_held:]), np.sort(idx[:n_held])))
    return tuple(out)


def client_data(config: RunConfig, partition_id: int) -> ClientData:
    """The training and held-out images of client `partition_id` under `config`."""
    if not 0 <= partition_id < config.num_clients:
        raise ConfigError(
            f"partition id {partition_id} is outside [0, num-clients={config.num_clients})"
        )
    table = load_table(config)
    train, held = client_indices(config)[partition_id]
    targets = table.targets()
    return ClientData(
        as_model_input(table.images[train]), targets[train],
        as_model_input(table.images[held]), targets[held],
    )


def training_images(config: RunConfig, partition_id: int, limit: int) -> torch.Tensor:
    """The first `limit` training images of client `partition_id`, (n, C, S, S) float32 in
    [-1, 1], in the order of `client_data(...).train` (and of the client's uploads)."""
    train, _ = client_indices(config)[partition_id]
    return as_model_input(load_table(config).images[train[:limit]])


def partition_key(config: RunConfig) -> str:
    """A string that changes whenever the images or the partition of any client can change."""
    return json.dumps(
        [config.dataset, str(data_root(config)), config.dataset_split, config.image_size,
         config.num_clients, config.partition, config.classes_per_client, config.dirichlet_alpha,
         config.attribute_groups, config.held_out_fraction, config.seed]
    )


def image_shape(config: RunConfig) -> tuple[int, int, int]:
    """(C, H, W) of the configured dataset's images."""
    return tuple(load_table(config).images.shape[1:])
