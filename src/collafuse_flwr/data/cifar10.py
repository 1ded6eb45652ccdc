"""CIFAR-10 (Krizhevsky 2009): 60,000 32x32 colour images of 10 classes, official 50k/10k split.

Read from torchvision's layout `<data-dir>/cifar-10-batches-py/` (downloaded by torchvision
when absent) or from an image folder with `labels.csv` (see `folder`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from collafuse_flwr.data import folder
from collafuse_flwr.data.download import fetch, missing
from collafuse_flwr.data.table import DatasetError, ImageTable, square_resize

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLITS = ("train", "test", "all")
MANUAL = (
    "Put cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, or its extracted "
    "folder cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta), into {root}, "
    "or point data-dir at an image folder with labels.csv (filename,label,label_name[,split])."
)


def load_cifar10(root: Path, split: str, image_size: int, download: bool) -> ImageTable:
    """CIFAR-10's `split` ("" = train) as uint8 (N, 3, S, S) with labels in CLASSES order."""
    from torchvision.datasets import CIFAR10

    if split not in ("", *SPLITS):
        raise DatasetError(f"dataset-split={split!r}: CIFAR-10 has the splits {', '.join(SPLITS)}")
    manual = MANUAL.format(root=root)
    if (root / "labels.csv").exists():
        path = root / "labels.csv"
        index = folder.read_split(path, ("filename", "label"), split, "train")
        return ImageTable(
            folder.read_images(path, index, image_size),
            folder.labels_of(index, path, CLASSES),
            CLASSES, None, (), str(root),
        )
    if not (root / CIFAR10.base_folder).is_dir():
        if not download:
            raise missing("CIFAR-10", root, manual)
        fetch("CIFAR-10", root, lambda: CIFAR10(root, train=True, download=True), manual)
    try:
        parts = [CIFAR10(root, train=(s == "train"), download=False) for s in ("train", "test")
                 if (split or "train") in (s, "all")]
    except RuntimeError as err:  # a missing or corrupted batch file
        raise DatasetError(f"{root / CIFAR10.base_folder}: {err} {manual}") from err
    images = torch.from_numpy(np.concatenate([p.data for p in parts])).permute(0, 3, 1, 2)
    labels = np.concatenate([np.asarray(p.targets, dtype=np.int64) for p in parts])
    if tuple(parts[0].classes) != CLASSES:
        raise DatasetError(f"{root}: batches.meta lists the classes {parts[0].classes}, expected {CLASSES}")
    return ImageTable(
        square_resize(image_size)(images).contiguous().numpy(), labels, CLASSES, None, (),
        str(root / CIFAR10.base_folder),
    )
