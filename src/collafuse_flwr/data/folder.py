"""The "image folder + CSV" layout: image files and one index CSV that names them.

    <data-dir>/labels.csv          filename,label,label_name[,split]      (CIFAR-10, AwA2)
    <data-dir>/attributes.csv      filename[,image_id][,split],<attr>...  (CelebA; values 1/-1 or 1/0)
    <data-dir>/class_attributes.csv  label,label_name,<predicate>...      (AwA2: one row per class)
    <data-dir>/images/...          the files, `filename` relative to <data-dir>

The CSVs are UTF-8 and read as text (no guessed types: an empty cell is ""); each column is then
checked for what it must hold. Errors name the file, the row (counted from 0, the first row after
the header) and the column. Every `filename` must name a file that resolves inside <data-dir>
(symlinks followed; no absolute paths or `..` out of it), and no file may be named twice, in any
split. Square images at the target size are used as they are; others (of any, mixed sizes) are
centre-cropped to a square and resized (see `table.read_rgb` for bit depths and transparency).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from collafuse_flwr.data.table import DatasetError, decode_images

# Columns of an attributes CSV that are not attributes.
NON_ATTRIBUTE_COLUMNS = ("filename", "image_id", "split")


def read_index(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """The CSV at `path` as text cells, with a `DatasetError` if it is missing, not a UTF-8 CSV,
    lacks a `required` column or has no rows; a `filename` column is checked by `_check_filenames`."""
    if not path.is_file():
        raise DatasetError(f"index file {path} is missing")
    try:
        index = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as err:
        raise DatasetError(f"index file {path} is not a readable UTF-8 CSV ({err})") from err
    if not isinstance(index.index, pd.RangeIndex):  # pandas made the extra first field an index
        raise DatasetError(
            f"index file {path}: its rows have more fields than its header {list(index.columns)} "
            "(a trailing comma?)"
        )
    missing = [c for c in required if c not in index.columns]
    if missing:
        raise DatasetError(f"index file {path} lacks the column(s) {missing}; it has {list(index.columns)}")
    if index.empty:
        raise DatasetError(f"index file {path} has no rows, only a header")
    if "filename" in index.columns:
        _check_filenames(path, index)
    return index


def _check_filenames(path: Path, index: pd.DataFrame) -> None:
    """Each `filename` of index CSV `path` is non-empty, resolves (symlinks followed) inside the
    CSV's directory (data-dir), and names a file no other row names."""
    root = os.path.realpath(path.parent)
    inside = os.path.join(root, "")
    directories: dict[str, str] = {}
    rows_of: dict[str, int] = {}
    for row, name in index["filename"].items():
        if not name.strip():
            raise DatasetError(f"{path}: row {row} has an empty filename")
        if "\0" in name:
            raise DatasetError(f"{path}: row {row} names {name!r}, which holds a NUL byte")
        file = _resolve(os.path.join(root, name), directories)
        if not file.startswith(inside):
            raise DatasetError(
                f"{path}: row {row} names {name!r}, which resolves to {file}, outside data-dir {root}"
            )
        if file in rows_of:
            raise DatasetError(f"{path}: rows {rows_of[file]} and {row} both name the image file {file}")
        rows_of[file] = row


def _resolve(file: str, directories: dict[str, str]) -> str:
    """`os.path.realpath(file)`, resolving each directory once (`directories` remembers them): a
    dataset has few directories with many files each (200k full resolutions take ~40 s)."""
    directory, base = os.path.split(file)
    if directory not in directories:
        directories[directory] = os.path.realpath(directory)
    resolved = os.path.join(directories[directory], base)
    return os.path.realpath(resolved) if base in ("", ".", "..") or os.path.islink(resolved) else resolved


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


def read_images(path: Path, index: pd.DataFrame, image_size: int) -> np.ndarray:
    """Decode the files named in `index["filename"]` of index CSV `path` (relative to its
    directory, checked by `read_index`): (N, 3, S, S) uint8."""
    return decode_images([path.parent / name for name in index["filename"]], image_size)


def integer_cells(frame: pd.DataFrame, path: Path) -> np.ndarray:
    """The cells of `frame` (text or numbers, read from `path`) as int64 (N, K). A `DatasetError`
    names the first cell that is not an integer ("", "nan", "1.5", "yes"): its row and column."""
    numbers = frame.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~(np.abs(numbers) <= 2**53) | (numbers != np.round(numbers))  # NaN and inf fail the first test
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise DatasetError(f"{path}: {_cell(frame, i, j)} is {frame.iat[i, j]!r}, not an integer")
    return numbers.astype(np.int64)


def labels_of(index: pd.DataFrame, path: Path, class_names: tuple[str, ...]) -> np.ndarray:
    """The `label` column as int64 (N,), each in [0, len(class_names)) and, if a `label_name`
    column is present, named as `class_names` names it."""
    labels = integer_cells(index[["label"]], path)[:, 0]
    outside = (labels < 0) | (labels >= len(class_names))
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise DatasetError(
            f"{path}: row {index.index[i]} has label {labels[i]}; labels must be integers in "
            f"[0, {len(class_names)})"
        )
    if "label_name" in index.columns:
        expected = np.asarray(class_names, dtype=object)[labels]
        wrong = index["label_name"].to_numpy() != expected
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            raise DatasetError(
                f"{path}: row {index.index[i]} has label {labels[i]} named {index['label_name'].iloc[i]!r}, "
                f"but class {labels[i]} is {expected[i]!r}"
            )
    return labels


def binary_attributes(frame: pd.DataFrame, path: Path) -> np.ndarray:
    """Attribute columns (N, A) with values 1/-1 (CelebA's convention) or 1/0, one convention for
    the whole table, as uint8 {0, 1}."""
    if frame.shape[1] == 0:
        raise DatasetError(f"{path} has no attribute columns")
    values = integer_cells(frame, path)
    bad = ~np.isin(values, (-1, 0, 1))
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise DatasetError(
            f"{path}: {_cell(frame, i, j)} is {values[i, j]}; attribute values must be 1 and -1 (or 1 and 0)"
        )
    if (values == -1).any() and (values == 0).any():
        minus, zero = np.argwhere(values == -1)[0], np.argwhere(values == 0)[0]
        raise DatasetError(
            f"{path}: attribute values mix -1 ({_cell(frame, *minus)}) and 0 ({_cell(frame, *zero)}); "
            "use 1 and -1, or 1 and 0, throughout"
        )
    return (values == 1).astype(np.uint8)


def _cell(frame: pd.DataFrame, i: int, j: int) -> str:
    """Where cell (i, j) of `frame` is, in the words of error messages."""
    return f"row {frame.index[i]}, column {frame.columns[j]!r}"
