"""What one client holds (its training images and a held-out split for evaluation), and the
reference images that no client holds (the evaluation feature network's data)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from collafuse_flwr.config import ConfigError, RunConfig
from collafuse_flwr.data.loaders import data_root, load_table
from collafuse_flwr.data.partitions import attribute_group_names, partition
from collafuse_flwr.data.table import DatasetError, ImageTable, as_model_input
from collafuse_flwr.seeds import public_seed

# Share of the clients' split kept aside from all clients, before partitioning, when the
# dataset offers no official test split beside it (digits, AwA2, folders without splits).
KEPT_ASIDE_FRACTION = 0.2
# The distances need two held-out images per client.
MIN_HELD_OUT = 2


@dataclass(frozen=True)
class ClientData:
    """One client's images `train` (N, C, S, S) and `held_out` (M, C, S, S), float32 in
    [-1, 1], with the targets of the evaluation feature network beside them: class labels
    (N,) int64, or attributes (N, A) float32 for a dataset without classes (CelebA); and the
    images' raw conditions for the run's `condition` (`ImageTable.conditions`; None: "none"),
    with condition-attributes "group" only the attributes of the client's group (0 elsewhere)."""

    train: torch.Tensor
    train_targets: torch.Tensor
    held_out: torch.Tensor
    held_out_targets: torch.Tensor
    train_conditions: torch.Tensor | None = None
    held_out_conditions: torch.Tensor | None = None


@dataclass(frozen=True)
class ReferenceImages:
    """Labelled images that no client holds: the evaluation feature network is trained on
    `table.images[train]` and its accuracy measured on `table.images[check]` (sorted indices).

    kept_aside: True when they were taken out of the clients' own split before partitioning;
        False when `table` is the dataset's official test split (the clients' split is whole).
    description: where they come from, for summary.json's notes.
    """

    table: ImageTable
    train: np.ndarray
    check: np.ndarray
    kept_aside: bool
    description: str

    @property
    def indices(self) -> np.ndarray:
        """All reference images' indices into `table`, sorted."""
        return np.union1d(self.train, self.check)


@lru_cache(maxsize=4)
def reference_images(config: RunConfig) -> ReferenceImages:
    """The images the evaluation feature network learns from and is checked on.

    When the clients hold the training split (dataset-split "" or "train") and the dataset
    offers an official test split (CIFAR-10; CelebA with list_eval_partition.txt; an image
    folder whose `split` column has "test" rows), that whole split. Otherwise (digits, AwA2,
    CelebA or a folder without splits, dataset-split "valid", "test" or "all") a share
    KEPT_ASIDE_FRACTION of the clients' split, drawn with the run seed before partitioning,
    that no client gets (`client_indices`). Either way held-out-fraction of the reference
    images (at least 1) check the network's accuracy and the rest (at least 1) train it.
    With client-data "own" (a deployment: the clients hold their images, the server none of
    them), every image of the server's data-dir and split.
    """
    table = load_table(config)
    if config.client_data == "own":
        description = (f"the server's own {len(table)} images at data-dir={config.data_dir!r} "
                       f"(dataset-split={config.dataset_split!r}), which no client holds")
        return _reference(table, np.arange(len(table)), False, description, config)
    reason = f"dataset-split={config.dataset_split!r} is not the training split"
    if config.dataset_split in ("", "train"):
        try:
            test = load_table(dataclasses.replace(config, dataset_split="test"))
        except DatasetError as err:
            reason = f"no official test split beside the clients' images (asked for one: {err})"
        else:
            description = f"the official test split ({len(test)} images), which no client holds"
            return _reference(test, np.arange(len(test)), False, description, config)
    count = max(2, round(KEPT_ASIDE_FRACTION * len(table)))
    rng = np.random.default_rng(public_seed(config.seed, "reference", "kept-aside"))
    kept = rng.permutation(len(table))[:count]
    description = (
        f"{count} of the {len(table)} images ({KEPT_ASIDE_FRACTION:.0%}, drawn with seed={config.seed}) "
        f"kept aside from all clients before partitioning: {reason}"
    )
    return _reference(table, kept, True, description, config)


def _reference(
    table: ImageTable, indices: np.ndarray, kept_aside: bool, description: str, config: RunConfig
) -> ReferenceImages:
    """`indices` of `table` split at random (run seed) into the feature network's training
    images and, like a client's held-out images, held-out-fraction of them for its check."""
    order = np.random.default_rng(public_seed(config.seed, "reference", "check")).permutation(indices)
    n_check = max(1, round(config.held_out_fraction * len(order)))
    if len(order) - n_check < 1:
        raise DatasetError(f"the evaluation feature network's {len(order)} reference images are too few: {description}")
    return ReferenceImages(table, np.sort(order[n_check:]), np.sort(order[:n_check]), kept_aside, description)


@lru_cache(maxsize=4)
def client_indices(config: RunConfig) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """(train, held-out) dataset indices of every client: the client's partition of the
    images the reference set leaves (`reference_images`), shuffled by (seed, client), with
    round(held-out-fraction * n) images (at least MIN_HELD_OUT) held out."""
    table, reference = load_table(config), reference_images(config)
    kept = reference.indices if reference.kept_aside else np.empty(0, dtype=np.int64)
    out = []
    for pid, part in enumerate(partition(table, config, np.setdiff1d(np.arange(len(table)), kept))):
        idx = np.random.default_rng([config.seed, pid]).permutation(part)
        n_held = max(MIN_HELD_OUT, int(round(len(idx) * config.held_out_fraction)))
        if len(idx) - n_held < 1:
            raise ConfigError(
                f"client {pid} has too few images ({len(idx)}) to hold {MIN_HELD_OUT} out; lower num-clients"
            )
        out.append((np.sort(idx[n_held:]), np.sort(idx[:n_held])))
    return tuple(out)


def client_data(config: RunConfig, partition_id: int) -> ClientData:
    """The training and held-out images of client `partition_id` under `config`."""
    if not 0 <= partition_id < config.num_clients:
        raise ConfigError(
            f"partition id {partition_id} is outside [0, num-clients={config.num_clients})"
        )
    train, held = client_indices(config)[partition_id]
    return _share(config, load_table(config), train, held, simulated_group(config, partition_id))


def simulated_group(config: RunConfig, partition_id: int) -> int | None:
    """A simulated client's attribute group under condition-attributes "group": its partition
    id (client k holds group k of `attribute-groups`); None otherwise. A deployed client names
    its group in its node config (`clients.state.own_attribute_group`)."""
    return partition_id if config.condition_attributes == "group" else None


def own_client_data(config: RunConfig, group: int | None = None) -> ClientData:
    """A deployed client's images: every image of `config`'s data-dir (the client's own
    folder, see `clients.state.own_data_config`), shuffled with the run seed, with
    round(held-out-fraction * n) (at least MIN_HELD_OUT) held out. Under condition-attributes
    "group", `group` is the index of the client's attribute group in `attribute-groups`."""
    table = load_table(config)
    order = np.random.default_rng(public_seed(config.seed, "held-out")).permutation(len(table))
    n_held = max(MIN_HELD_OUT, int(round(len(order) * config.held_out_fraction)))
    if len(order) - n_held < 1:
        raise DatasetError(f"{table.source}: {len(order)} images are too few to hold {MIN_HELD_OUT} out "
                           "and train on the rest")
    return _share(config, table, np.sort(order[n_held:]), np.sort(order[:n_held]), group)


def _share(config: RunConfig, table: ImageTable, train: np.ndarray, held: np.ndarray, group: int | None) -> ClientData:
    """The images `train` and `held` (row indices) of `table` with their targets and raw
    conditions; with `group`, only the attributes of that attribute group (0 elsewhere)."""
    targets, conditions = table.targets(), table.conditions(config.condition)
    own = (None,) * 2
    if conditions is not None:
        mask = group_columns(config, group) if group is not None else 1
        own = conditions[train] * mask, conditions[held] * mask
    return ClientData(
        as_model_input(table.images[train]), targets[train],
        as_model_input(table.images[held]), targets[held], *own,
    )


def group_columns(config: RunConfig, group: int) -> torch.Tensor:
    """(A,) float32: 1 at the attributes of group `group` of `attribute-groups` (in simulation,
    client `group`'s), 0 elsewhere."""
    names, kept = load_table(config).attribute_names, set(attribute_group_names(config)[group])
    return torch.tensor([float(name in kept) for name in names])


def condition_sizes(config: RunConfig) -> tuple[int, int]:
    """(number of classes, number of attributes) of the configured dataset (0 where it has none)."""
    table = load_table(config)
    return len(table.class_names) if table.labels is not None else 0, len(table.attribute_names)


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
         config.attribute_groups, config.held_out_fraction, config.seed, KEPT_ASIDE_FRACTION, MIN_HELD_OUT]
    )


def image_shape(config: RunConfig) -> tuple[int, int, int]:
    """(C, H, W) of the configured dataset's images."""
    return tuple(load_table(config).images.shape[1:])
