"""The "image folder + CSV" layout: image files and one index CSV that names them.

    <data-dir>/labels.csv          filename,label,label_name[,split]      (CIFAR-10, AwA2)
    <data-dir>/attributes.csv      filename[,image_id][,split],<attr>...  (CelebA; values 1/-1 or 1/0)
    <data-dir>/class_attributes.csv  label,label_name,<predicate>...      (AwA2: one row per class)
    <data-dir>/images/...          the files, `filename` relative to <data-dir>

Square images at the target size are used as they are; others are centre-cropped to a square
and resized.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from collafuse_flwr.data.table import DatasetError, decode_images

# Columns of an attributes CSV that are not attributes.
NON_ATTRIBUTE_COLUMNS = ("filename", "image_id", "split")


def read_index(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """The CSV at `path`, with a `DatasetError` if it is missing or lacks a `required` column."""
    if not path.is_file():
        raise DatasetError(f"index file {path} is missing")
    try:
        index = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DatasetError(f"index file {path} is not a readable CSV ({err})") from err
    missing = [c for c in required if c not in index.columns]
    if missing:
        raise DatasetError(f"index file {path} lacks the column(s) {missing}; it has {list(index.columns)}")
    return index


def read_split(path: Path, required: tuple[str, ...], split: str, default: str) -> pd.DataFrame:
    """The rows of index CSV `path` in `split` ("" means `default`, "all" keeps every row). An
    index without a `split` column is a single split: only "" and "all" are accepted for it."""
    index = read_index(path, required)
    if split == "all":
        return index
    if "split" not in index.columns:
        if split:
            raise DatasetError(
                f"dataset-split={split!r}: {path} has no split column; use dataset-split='all'"
            )
        return index
    rows = index[index["split"] == (split or default)]
    if rows.empty:
        raise DatasetError(
            f"dataset-split={split or default!r}: {path} has no such rows; its splits are "
            f"{sorted(index['split'].unique())}"
        )
    return rows


def read_images(root: Path, index: pd.DataFrame, image_size: int) -> np.ndarray:
    """Decode the files named in `index["filename"]` (relative to `root`): (N, 3, S, S) uint8."""
    return decode_images([root / name for name in index["filename"]], image_size)


def labels_of(index: pd.DataFrame, path: Path, class_names: tuple[str, ...]) -> np.ndarray:
    """The `label` column as int64, checked against `class_names` (and `label_name` if present)."""
    labels = index["label"].to_numpy()
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= len(class_names):
        raise DatasetError(f"{path}: labels must be integers in [0, {len(class_names)})")
    if "label_name" in index.columns:
        expected = np.asarray(class_names, dtype=object)[labels]
        wrong = index["label_name"].to_numpy() != expected
        if wrong.any():
            row = int(np.flatnonzero(wrong)[0])
            raise DatasetError(
                f"{path}: row {row} has label {labels[row]} named {index['label_name'].iloc[row]!r}, "
                f"but class {labels[row]} is {expected[row]!r}"
            )
    return labels.astype(np.int64)


def binary_attributes(frame: pd.DataFrame, path: Path) -> np.ndarray:
    """Attribute columns with values 1/-1 (CelebA's convention) or 1/0 as uint8 {0, 1}."""
    values = frame.to_numpy()
    if not np.isin(values, (-1, 0, 1)).all():
        raise DatasetError(f"{path}: attribute values must be 1 and -1 (or 1 and 0)")
    return (values == 1).astype(np.uint8)
