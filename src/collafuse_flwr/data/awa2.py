"""Animals with Attributes 2 (Xian et al. 2018): 37,322 images of 50 animal classes and the
50 x 85 binary class-predicate matrix (an image's attributes are its class's row).

Read from the official archive's layout (downloaded when absent, 13 GB)

    <data-dir>/Animals_with_Attributes2/classes.txt                 "1\tantelope" ...
    <data-dir>/Animals_with_Attributes2/predicates.txt              "1\tblack" ...
    <data-dir>/Animals_with_Attributes2/predicate-matrix-binary.txt  50 rows of 85 0/1
    <data-dir>/Animals_with_Attributes2/JPEGImages/<class>/*.jpg

or from an image folder with `labels.csv` and `class_attributes.csv` (see `folder`). Images are
centre-cropped to a square and resized. AwA2 has no official image split: all images are used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from collafuse_flwr.data import folder
from collafuse_flwr.data.download import fetch, missing
from collafuse_flwr.data.table import DatasetError, ImageTable, decode_images

URL = "https://cvml.ista.ac.at/AwA2/AwA2-data.zip"
BASE = "Animals_with_Attributes2"
MANUAL = (
    f"Download {URL} and unzip it into {{root}} (giving {BASE}/), or point data-dir at an "
    "image folder with labels.csv (filename,label,label_name) and class_attributes.csv "
    "(label,label_name,<85 predicates as 0/1>)."
)


def load_awa2(root: Path, split: str, image_size: int, download: bool) -> ImageTable:
    """All AwA2 images as uint8 (N, 3, S, S), labels in classes.txt order, (N, 85) attributes."""
    if split not in ("", "all"):
        raise DatasetError(f"dataset-split={split!r}: AwA2 has no official split; use 'all'")
    if (root / "labels.csv").exists():
        return _load_folder(root, image_size)
    manual = MANUAL.format(root=root)
    base = root / BASE
    if not (base / "classes.txt").is_file():
        if not download:
            raise missing("AwA2", root, manual)
        from torchvision.datasets.utils import download_and_extract_archive

        fetch("AwA2", root, lambda: download_and_extract_archive(URL, str(root)), manual)
    classes = _names(base / "classes.txt", manual)
    predicates = _names(base / "predicates.txt", manual)
    matrix = np.loadtxt(base / "predicate-matrix-binary.txt", dtype=np.uint8, ndmin=2)
    if matrix.shape != (len(classes), len(predicates)):
        raise DatasetError(
            f"{base / 'predicate-matrix-binary.txt'} is {matrix.shape}, expected "
            f"({len(classes)} classes, {len(predicates)} predicates)"
        )
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted((base / "JPEGImages" / name).glob("*.jpg"))
        if not found:
            raise DatasetError(f"{base / 'JPEGImages' / name} has no images. {manual}")
        files += found
        labels += [label] * len(found)
    labels = np.asarray(labels, dtype=np.int64)
    return ImageTable(decode_images(files, image_size), labels, classes, matrix[labels], predicates, str(base))


def _load_folder(root: Path, image_size: int) -> ImageTable:
    """The image folder layout: labels.csv plus the per-class class_attributes.csv."""
    path, classes_path = root / "labels.csv", root / "class_attributes.csv"
    index = folder.read_index(path, ("filename", "label"))
    table = folder.read_index(classes_path, ("label", "label_name"))
    if not np.array_equal(folder.integer_cells(table[["label"]], classes_path)[:, 0], np.arange(len(table))):
        raise DatasetError(f"{classes_path}: rows must be the classes 0, 1, ... in order")
    classes = tuple(table["label_name"])
    predicates = tuple(c for c in table.columns if c not in ("label", "label_name"))
    matrix = folder.binary_attributes(table[list(predicates)], classes_path)
    labels = folder.labels_of(index, path, classes)
    return ImageTable(
        folder.read_images(path, index, image_size), labels, classes, matrix[labels], predicates, str(root)
    )


def _names(path: Path, manual: str) -> tuple[str, ...]:
    """The names of a numbered list file ("1\\tantelope" per line)."""
    if not path.is_file():
        raise DatasetError(f"{path} is missing. {manual}")
    return tuple(line.split()[1] for line in path.read_text().splitlines() if line.strip())
