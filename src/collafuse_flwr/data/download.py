"""Fetch a dataset's official files into its data directory, or say exactly how to."""

from __future__ import annotations

import fcntl
from collections.abc import Callable
from pathlib import Path

from collafuse_flwr.data.table import DatasetError


def fetch(name: str, root: Path, download: Callable[[], object], manual: str) -> None:
    """Run `download` (which writes the official files below `root`) under a file lock, so
    that concurrent processes download once. Any failure (offline, quota, checksum) becomes
    a `DatasetError` that names the cause and the manual steps `manual`."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".download.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            download()
        except Exception as err:  # torchvision raises URLError, RuntimeError, OSError, ...
            raise DatasetError(
                f"could not download {name} into {root} ({type(err).__name__}: {err}). {manual}"
            ) from err


def missing(name: str, root: Path, manual: str) -> DatasetError:
    """The error for a dataset that is absent and may not be downloaded (download = false)."""
    return DatasetError(f"{name} is not in {root} and download=false. {manual}")
