"""Datasets (digits, CIFAR-10, CelebA, AwA2), their non-IID partitions and each client's share.

The public names below are imported from their submodules on first use (PEP 562), not when the
package is: `config` reads `data.facts`, which runs this file first, and the submodules that
define these names import `config` themselves.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the submodule that defines it
_EXPORTS = {
    "ClientData": "clients", "client_data": "clients", "client_indices": "clients", "condition_sizes": "clients",
    "group_columns": "clients", "image_shape": "clients", "own_client_data": "clients",
    "partition_key": "clients", "simulated_group": "clients", "training_images": "clients",
    "data_root": "loaders", "load_table": "loaders",
    "DatasetError": "table", "ImageTable": "table",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines `name`, and keep the name here for later lookups."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
