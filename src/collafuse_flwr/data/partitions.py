"""Non-IID partitions of a dataset across clients: which image indices each client owns.

Every scheme is deterministic given the seed and puts each image in exactly one client:
    label-groups      pathological: `classes-per-client` classes per client (0: ceil(classes / clients))
    dirichlet         per-class client shares ~ Dirichlet(alpha) (flwr-datasets)
    iid               uniform (flwr-datasets)
    attribute-groups  client k owns images carrying an attribute of its group k
"""

from __future__ import annotations

import warnings

import numpy as np

from collafuse_flwr.config import ConfigError, RunConfig
from collafuse_flwr.data.table import ImageTable

# The authors' five CelebA clients (hair colour, jewellery, hair style, eyebrows, eyes) and a
# habitat split of the AwA2 classes; groups are separated by ";", attributes by ",".
DEFAULT_ATTRIBUTE_GROUPS = {
    "celeba": "Blond_Hair,Brown_Hair,Black_Hair,Gray_Hair,Bald; Wearing_Necklace,Wearing_Earrings; "
    "Wavy_Hair,Straight_Hair,Bangs; Bushy_Eyebrows,Arched_Eyebrows; "
    "Eyeglasses,Narrow_Eyes,Bags_Under_Eyes",
    "awa2": "arctic,coastal,ocean,water; jungle,tree,cave; forest,mountains; "
    "plains,fields,bush,desert; domestic",
}


def partition(table: ImageTable, config: RunConfig, pool: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """One sorted array of indices into `table` per client, drawn from `pool` (the sorted
    indices of the images clients may hold; default: all); disjoint and covering `pool`.
    `config` is validated: label schemes only for datasets with classes, attribute groups
    only for datasets with attributes."""
    pool = np.arange(len(table)) if pool is None else np.asarray(pool)
    n, k = len(pool), config.num_clients
    if k > n:
        raise ConfigError(f"num-clients={k}: more clients than images to share among them ({n})")
    if config.partition == "attribute-groups":
        parts = attribute_groups(table.attributes[pool], table.attribute_names, attribute_group_names(config),
                                 config.seed)
    elif config.partition == "iid":
        parts = flower_partition(np.zeros(n, dtype=np.int64), k, "iid", 1.0, config.seed)
    elif config.partition == "label-groups":
        parts = label_groups(table.labels[pool], k, config.classes_per_client, config.seed)
    else:
        parts = flower_partition(table.labels[pool], k, "dirichlet", config.dirichlet_alpha, config.seed)
    return tuple(pool[part] for part in parts)


def label_groups(labels: np.ndarray, num_clients: int, classes_per_client: int, seed: int):
    """Pathological non-IID split: classes are shuffled by `seed` and dealt out in turn,
    `classes_per_client` to each client (0: ceil(C / num_clients) of the C classes, the fewest
    that give every class an owner); a class held by several clients is split evenly among
    them. Returns one index array per client.
    """
    classes = np.unique(labels)
    classes_per_client = classes_per_client or -(-len(classes) // num_clients)
    if classes_per_client > len(classes):
        raise ConfigError(
            f"classes-per-client={classes_per_client}: the dataset has only {len(classes)} classes"
        )
    if num_clients * classes_per_client < len(classes):
        raise ConfigError(
            f"partition='label-groups' with num-clients={num_clients} and "
            f"classes-per-client={classes_per_client} covers only "
            f"{num_clients * classes_per_client} of the {len(classes)} classes; raise "
            "classes-per-client or num-clients, or use partition='dirichlet'"
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
    return _non_empty([np.sort(np.concatenate(p)) for p in parts], "label-groups")


def flower_partition(labels: np.ndarray, num_clients: int, scheme: str, alpha: float, seed: int):
    """Dirichlet(alpha) or IID split with flwr-datasets partitioners on an index+label table
    (images never enter Arrow). A Dirichlet draw that leaves a client with fewer than 2
    images is redrawn by flwr-datasets; if that keeps failing, a `ConfigError` says so."""
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


def attribute_group_names(config: RunConfig) -> list[list[str]]:
    """`attribute-groups` (or the dataset's default) as one list of attribute names per client."""
    spec = config.attribute_groups or DEFAULT_ATTRIBUTE_GROUPS.get(config.dataset, "")
    if not spec:
        raise ConfigError(
            f"partition='attribute-groups': dataset={config.dataset!r} has no default groups; "
            "set attribute-groups='a,b; c; ...' (one group per client)"
        )
    groups = [[a.strip() for a in group.split(",") if a.strip()] for group in spec.split(";")]
    if len(groups) != config.num_clients or not all(groups):
        raise ConfigError(
            f"attribute-groups={spec!r}: needs num-clients={config.num_clients} non-empty groups "
            f"separated by ';', got {len(groups)}"
        )
    return groups


def attribute_groups(
    attributes: np.ndarray, attribute_names: tuple[str, ...], groups: list[list[str]], seed: int
) -> list[np.ndarray]:
    """Disjoint attribute-keyed clients of the images with `attributes` (N, A) {0, 1}: client k
    may hold an image only if the image has at least one attribute of `groups[k]`. In a seeded
    random order, each image goes to the eligible client holding the fewest images so far (ties
    broken at random), which keeps the clients balanced; images with no grouped attribute are
    spread uniformly at random. Returns one array of row indices per client.
    """
    names = list(attribute_names)
    unknown = sorted({a for g in groups for a in g} - set(names))
    if unknown:
        raise ConfigError(f"attribute-groups: unknown attribute(s) {unknown}; the dataset has {names}")
    eligible = np.stack(
        [attributes[:, [names.index(a) for a in g]].any(axis=1) for g in groups], axis=1
    )
    rng = np.random.default_rng(seed)
    owner = np.full(len(attributes), -1)
    counts = np.zeros(len(groups))
    for i in rng.permutation(len(attributes)):
        candidates = np.flatnonzero(eligible[i])
        if len(candidates):
            load = counts[candidates] + rng.random(len(candidates)) * 0.5  # random tie-break
            owner[i] = candidates[np.argmin(load)]
            counts[owner[i]] += 1
    unmatched = np.flatnonzero(owner < 0)
    owner[unmatched] = rng.integers(len(groups), size=len(unmatched))
    return _non_empty([np.flatnonzero(owner == k) for k in range(len(groups))], "attribute-groups")


def _non_empty(parts: list[np.ndarray], scheme: str) -> list[np.ndarray]:
    """`parts`, or a `ConfigError` naming the first client left without images."""
    for k, part in enumerate(parts):
        if len(part) == 0:
            raise ConfigError(f"partition={scheme!r} leaves client {k} without images")
    return parts
