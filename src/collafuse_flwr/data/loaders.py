"""Load the configured dataset: pick its loader, find its files, cache the decoded images.

Decoding tens of thousands of JPEGs takes minutes and every process of a machine (a simulation's
clients, a deployed client) needs the table, so decoded tables are cached as .npy files that
are memory-mapped on load, in this machine's own cache (`decoded_cache`): never below a path
the run config names, so a client reads only tables its own machine decoded. The cache key
holds the dataset, the resolved data directory and the size and time stamps of its top-level
files, the split and the size.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from collafuse_flwr.config import RunConfig
from collafuse_flwr.data.awa2 import load_awa2
from collafuse_flwr.data.celeba import load_celeba
from collafuse_flwr.data.cifar10 import load_cifar10
from collafuse_flwr.data.digits import load_digits, load_digits_folder
from collafuse_flwr.data.table import DatasetError, ImageTable
from collafuse_flwr.outputs import write_directory_atomically

LOADERS = {"digits": load_digits_folder, "cifar10": load_cifar10, "celeba": load_celeba, "awa2": load_awa2}
CACHE_FORMAT = 2  # raised whenever decoding changes what a cached table holds


def data_root(config: RunConfig) -> Path:
    """The dataset's directory: `data-dir`, or ~/.cache/collafuse-flwr/datasets/<dataset>."""
    if config.data_dir:
        return Path(config.data_dir).expanduser().resolve()
    return Path.home() / ".cache" / "collafuse-flwr" / "datasets" / config.dataset


def decoded_cache() -> Path:
    """Where decoded tables are cached: $COLLAFUSE_DATA_CACHE, else
    $XDG_CACHE_HOME/collafuse-flwr/decoded (~/.cache/collafuse-flwr/decoded)."""
    configured = os.environ.get("COLLAFUSE_DATA_CACHE")
    if configured:
        return Path(configured).expanduser().resolve()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "collafuse-flwr" / "decoded"


def load_table(config: RunConfig) -> ImageTable:
    """The configured dataset split at `image-size` (cached on disk and per process); the
    embedded digits unless a data-dir names a folder of digits."""
    if config.dataset == "digits" and not config.data_dir:
        return _digits(config.dataset_split, config.image_size)
    return _decoded(config.dataset, data_root(config), config.dataset_split, config.image_size,
                    config.download, decoded_cache())


@lru_cache(maxsize=2)
def _digits(split: str, image_size: int) -> ImageTable:
    return load_digits(split, image_size)


@lru_cache(maxsize=4)
def _decoded(name: str, root: Path, split: str, image_size: int, download: bool, cache: Path) -> ImageTable:
    if root.exists() and not root.is_dir():
        raise DatasetError(f"data-dir={str(root)!r} is a file, not a directory")
    entry = _entry(cache, name, root, split, image_size)
    if not (entry / "table.json").exists():
        table = LOADERS[name](root, split, image_size, download)
        entry = _entry(cache, name, root, split, image_size)  # a download changed the stamp
        _write(entry, table)
    return _read(entry)


def _entry(cache: Path, name: str, root: Path, split: str, image_size: int) -> Path:
    """The cache directory of one decoded table, named by a digest of what it depends on."""
    listing = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in root.iterdir()
        if not p.name.startswith(".")
    ) if root.is_dir() else []
    key = json.dumps([CACHE_FORMAT, name, str(root), split, image_size, listing])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache / f"{name}-{split or 'default'}-{image_size}-{digest}"


def _write(entry: Path, table: ImageTable) -> None:
    """Write `table` as `entry/`, atomically. Every writer of an entry fills the same
    `<entry>.tmp/`, so processes that decode the same table at once take turns on `entry.lock`;
    whoever comes second finds the table written and leaves it."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (entry / "table.json").exists():
            write_directory_atomically(entry, lambda directory: _fill(directory, table))


def _fill(directory: Path, table: ImageTable) -> None:
    """Save `table`'s arrays as .npy files and its names and source as table.json."""
    np.save(directory / "images.npy", table.images)
    for field in ("labels", "attributes"):
        if getattr(table, field) is not None:
            np.save(directory / f"{field}.npy", getattr(table, field))
    meta = {"class_names": table.class_names, "attribute_names": table.attribute_names, "source": table.source}
    (directory / "table.json").write_text(json.dumps(meta))


def _read(entry: Path) -> ImageTable:
    meta = json.loads((entry / "table.json").read_text())

    def optional(field: str) -> np.ndarray | None:
        path = entry / f"{field}.npy"
        return np.load(path) if path.exists() else None

    return ImageTable(
        np.load(entry / "images.npy", mmap_mode="r"), optional("labels"),
        tuple(meta["class_names"]), optional("attributes"), tuple(meta["attribute_names"]),
        meta["source"],
    )
