"""The embedded dataset and its partitions across clients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from collafuse_flwr.config import RunConfig
from collafuse_flwr.data import client_data, load_dataset, partition_indices


def test_digits_are_real_images_in_range():
    images, labels = load_dataset("digits", 16)
    assert images.shape == (1797, 1, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert sorted(labels.unique().tolist()) == list(range(10))


@pytest.mark.parametrize("scheme", ["label-groups", "dirichlet", "iid"])
def test_partitions_are_disjoint_covering_and_seeded(scheme):
    parts = partition_indices("digits", 16, 5, scheme, 2, 0.5, 0)
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == 1797
    again = partition_indices("digits", 16, 5, scheme, 2, 0.5, 0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition_indices("digits", 16, 5, scheme, 2, 0.5, 1)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_label_groups_give_each_client_its_own_digits():
    _, labels = load_dataset("digits", 16)
    parts = partition_indices("digits", 16, 5, "label-groups", 2, 0.5, 0)
    owned = [set(labels[p].tolist()) for p in parts]
    assert all(len(o) == 2 for o in owned)
    assert set().union(*owned) == set(range(10))


def test_held_out_split_is_disjoint_from_training():
    config = RunConfig()
    data = client_data(config, 3)
    train = {tuple(x.flatten().tolist()) for x in data.train}
    assert not any(tuple(x.flatten().tolist()) in train for x in data.held_out)
    total = data.train.shape[0] + data.held_out.shape[0]
    assert data.held_out.shape[0] == round(total * config.held_out_fraction)
