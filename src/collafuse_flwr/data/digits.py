"""scikit-learn's digits: 1,797 real 8x8 grey images of 10 digits shipped inside the package
(CC BY 4.0), so the default run works offline anywhere; or, with a data-dir, digits from an
image folder with `labels.csv` (see `folder`: e.g. one client's share, written by
`collafuse-export`), read as grey."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from collafuse_flwr.data import folder
from collafuse_flwr.data.table import DatasetError, ImageTable

CLASSES = tuple(str(d) for d in range(10))


def load_digits(split: str, image_size: int) -> ImageTable:
    """All digits as float32 (1797, 1, S, S) in [-1, 1] (values 0..16 upsampled bilinearly)."""
    from sklearn.datasets import load_digits as sklearn_digits

    if split not in ("", "all"):
        raise DatasetError(f"dataset-split={split!r}: digits has no official split; use 'all'")
    digits = sklearn_digits()
    x = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 2 - 1).contiguous().numpy()
    return ImageTable(images, digits.target.astype(np.int64), CLASSES, None, (), "sklearn.datasets.load_digits")


def load_digits_folder(root: Path, split: str, image_size: int, download: bool) -> ImageTable:
    """Digits from the image folder `root` (labels.csv: filename,label[,label_name][,split]),
    as uint8 (N, 1, S, S): the mean of the decoded RGB channels. Nothing is downloaded."""
    path = root / "labels.csv"
    if not path.is_file():
        raise DatasetError(
            f"data-dir={str(root)!r} has no labels.csv: digits from a directory need an image folder "
            "(filename,label[,label_name][,split]); leave data-dir empty for the embedded digits"
        )
    index = folder.read_split(path, ("filename", "label"), split, "all")
    rgb = folder.read_images(path, index, image_size)
    grey = np.round(rgb.astype(np.float32).mean(axis=1, keepdims=True)).astype(np.uint8)
    return ImageTable(grey, folder.labels_of(index, path, CLASSES), CLASSES, None, (), str(root))
