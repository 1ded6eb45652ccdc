"""scikit-learn's digits: 1,797 real 8x8 grey images of 10 digits shipped inside the package
(CC BY 4.0), so the default run works offline anywhere."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

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
