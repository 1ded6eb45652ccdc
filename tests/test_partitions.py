"""Partitions: disjoint, covering, reproducible by seed, different across seeds, non-IID."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from collafuse_flwr.config import ConfigError, RunConfig
from collafuse_flwr.data import client_data, load_table
from collafuse_flwr.data.partitions import attribute_group_names, partition
from collafuse_flwr.data.report import write_partition_report

FOLDERS = {"cifar10": "cifar10-mini", "celeba": "celeba-mini", "awa2": "awa2-mini"}


def config_for(shared_data, tmp_path, dataset, **overrides) -> RunConfig:
    values = dict(dataset=dataset, num_clients=5, output_dir=str(tmp_path / "runs"))
    if dataset in FOLDERS:
        values["data_dir"] = str(shared_data / FOLDERS[dataset])
    config = RunConfig(**dict(values, **overrides))
    config.validate()
    return config


CASES = [
    ("digits", {"partition": "label-groups"}),
    ("digits", {"partition": "dirichlet"}),
    ("digits", {"partition": "iid"}),
    ("cifar10", {"partition": "label-groups"}),
    ("cifar10", {"partition": "dirichlet", "dirichlet_alpha": 0.3}),
    ("cifar10", {"partition": "iid"}),
    ("celeba", {"partition": "attribute-groups"}),
    ("celeba", {"partition": "iid"}),
    ("awa2", {"partition": "label-groups", "classes_per_client": 10}),
    ("awa2", {"partition": "attribute-groups"}),
]


@pytest.mark.parametrize("dataset,overrides", CASES)
def test_disjoint_covering_seeded(shared_data, tmp_path, dataset, overrides):
    config = config_for(shared_data, tmp_path, dataset, **overrides)
    parts = partition(load_table(config), config)
    joined = np.concatenate(parts)
    assert len(parts) == 5 and all(len(p) for p in parts)
    assert len(joined) == len(np.unique(joined)) == len(load_table(config))
    again = partition(load_table(config), config)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = config_for(shared_data, tmp_path, dataset, seed=1, **overrides)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, partition(load_table(other), other)))


@pytest.mark.parametrize("clients,classes_per_client,owned_each", [(5, 0, 2), (5, 3, 3), (2, 0, 5), (3, 0, 4),
                                                                    (20, 0, 1)])
def test_label_groups_give_each_client_its_own_classes(clients, classes_per_client, owned_each):
    """classes-per-client 0 (the default): ceil(10 / clients), the fewest that give every class
    an owner, so any federation size covers the digits."""
    config = RunConfig(num_clients=clients, classes_per_client=classes_per_client)
    labels = load_table(config).labels
    owned = [set(labels[p].tolist()) for p in partition(load_table(config), config)]
    assert all(len(o) == owned_each for o in owned) and set().union(*owned) == set(range(10))


def test_celeba_clients_carry_their_group_attributes(shared_data, tmp_path):
    """Every image a client owns has an attribute of its group, unless it matches no group
    (then it is spread at random); the authors' overlap is gone: each image is in one client."""
    config = config_for(shared_data, tmp_path, "celeba", partition="attribute-groups")
    table = load_table(config)
    groups = attribute_group_names(config)
    names = list(table.attribute_names)
    in_group = lambda g: table.attributes[:, [names.index(a) for a in g]].any(axis=1)
    matches_any = np.stack([in_group(g) for g in groups], axis=1).any(axis=1)
    parts = partition(table, config)
    for group, part in zip(groups, parts):
        assert in_group(group)[part][matches_any[part]].all()
    assert groups[0] == ["Blond_Hair", "Brown_Hair", "Black_Hair", "Gray_Hair", "Bald"]
    assert sum(len(p) for p in parts) == 1000 and (~matches_any).sum() == 67


def test_awa2_habitat_groups_keep_whales_together(shared_data, tmp_path):
    config = config_for(shared_data, tmp_path, "awa2", partition="attribute-groups")
    table = load_table(config)
    parts = partition(table, config)
    owner = {table.class_names[table.labels[i]]: k for k, p in enumerate(parts) for i in p}
    assert owner["killer+whale"] == owner["blue+whale"] == 0  # group 0: arctic, coastal, ocean, water


@pytest.mark.parametrize("dataset,partition,message", [
    ("celeba", "label-groups", "has no class labels; use partition='attribute-groups' or 'iid'"),
    ("celeba", "dirichlet", "has no class labels"),
    ("cifar10", "attribute-groups", "dataset='cifar10' has no attributes"),
])
def test_partition_must_suit_the_dataset(dataset, partition, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_flower({"dataset": dataset, "partition": partition})


@pytest.mark.parametrize("groups,message", [
    ("Bald; Eyeglasses", "needs num-clients=5 non-empty groups"),
    ("Bald; Eyeglasses; Smiling; Male; Purple_Hair", r"unknown attribute\(s\) \['Purple_Hair'\]"),
])
def test_bad_attribute_groups(shared_data, tmp_path, groups, message):
    config = config_for(shared_data, tmp_path, "celeba", partition="attribute-groups", attribute_groups=groups)
    with pytest.raises(ConfigError, match=message):
        client_data(config, 0)


def test_dirichlet_that_starves_a_client_is_a_clear_error(shared_data, tmp_path):
    config = config_for(shared_data, tmp_path, "cifar10", num_clients=40, partition="dirichlet", dirichlet_alpha=0.001)
    with pytest.raises(ConfigError, match="could not give every client at least 2 images"):
        client_data(config, 0)


def test_held_out_split_is_disjoint_from_training():
    config = RunConfig(num_clients=5)
    data = client_data(config, 3)
    train = {tuple(x.flatten().tolist()) for x in data.train}
    assert not any(tuple(x.flatten().tolist()) in train for x in data.held_out)
    total = data.train.shape[0] + data.held_out.shape[0]
    assert data.held_out.shape[0] == round(total * config.held_out_fraction)


@pytest.mark.parametrize("dataset,overrides", [("cifar10", {}), ("celeba", {"partition": "attribute-groups"})])
def test_partition_report(shared_data, tmp_path, dataset, overrides):
    config = config_for(shared_data, tmp_path, dataset, **overrides)
    write_partition_report(tmp_path / "partition.csv", tmp_path / "partition.png", config)
    frame = pd.read_csv(tmp_path / "partition.csv")
    assert list(frame.columns) == ["client", "split", "kind", "name", "count"]
    images = frame[frame["kind"] == "images"]
    assert images["count"].sum() == len(load_table(config))
    held = images[images["split"] == "held-out"].set_index("client")["count"]
    assert held.tolist() == [len(client_data(config, k).held_out) for k in range(5)]
    if dataset == "cifar10":  # label-groups: two classes per client
        train_classes = frame[(frame["kind"] == "class") & (frame["count"] > 0)]
        assert train_classes.groupby(["client", "split"]).size().eq(2).all()
    else:
        assert set(frame["name"][frame["kind"] == "attribute"]) >= {"Bald", "Eyeglasses"}
    assert (tmp_path / "partition.png").stat().st_size > 10_000


def test_partition_report_lists_the_kept_aside_reference_images(tmp_path):
    """The digits have no test split: the images kept aside for the feature network are a row
    of their own, and the figure still draws the clients' classes."""
    config = RunConfig(num_clients=5, output_dir=str(tmp_path / "runs"))
    write_partition_report(tmp_path / "partition.csv", tmp_path / "partition.png", config)
    frame = pd.read_csv(tmp_path / "partition.csv", dtype={"client": str})
    images = frame[frame["kind"] == "images"]
    assert images["count"].sum() == len(load_table(config))
    assert images[images["client"] == "reference"]["split"].tolist() == ["kept-aside"]
    assert (tmp_path / "partition.png").stat().st_size > 10_000


@pytest.mark.parametrize("scale,overlay,folder,clients,reference", [
    ("cifar10-cpu", "data-cifar10-full", "cifar10-full", [(8000, 2000)] * 5, 9500),
    ("celeba-cpu", "data-celeba-10k", "celeba-10k", [(1245, 311), (1234, 308), (1209, 302), (1229, 307), (1228, 307)],
     1920),
])
def test_the_full_data_overlays_give_five_clients_thousands_of_images(shared_data, scale, overlay, folder, clients,
                                                                     reference):
    """simulations/data-cifar10-full.toml and data-celeba-10k.toml on their CPU scale: the
    launchers' 5 clients each hold thousands of images (training, held-out); the server's
    feature network learns from images none of them holds (CIFAR-10's test split; CelebA's
    kept-aside share)."""
    import tomllib
    from pathlib import Path

    from collafuse_flwr.data import client_indices
    from collafuse_flwr.data.clients import reference_images

    simulations = Path(__file__).resolve().parents[1] / "simulations"
    values = {**tomllib.loads((simulations / f"{scale}.toml").read_text()),
              **tomllib.loads((simulations / f"{overlay}.toml").read_text()), "data-dir": str(shared_data / folder)}
    config = RunConfig.from_flower(values).for_launchers()
    splits = client_indices(config)
    assert [(len(train), len(held)) for train, held in splits] == clients
    held_by_clients = np.concatenate([np.concatenate(pair) for pair in splits])
    found = reference_images(config)
    assert len(found.indices) == reference
    if found.kept_aside:  # drawn from the clients' own table: none of them holds one
        assert not set(found.indices.tolist()) & set(held_by_clients.tolist())
