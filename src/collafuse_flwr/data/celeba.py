"""CelebA (Liu et al. 2015): 202,599 aligned 178x218 face images with 40 binary attributes.

Read from torchvision's layout (downloaded by torchvision from Google Drive when absent)

    <data-dir>/celeba/img_align_celeba/000001.jpg ...
    <data-dir>/celeba/list_attr_celeba.txt          count, 40 names, then "<file> 1 -1 ..."
    <data-dir>/celeba/list_eval_partition.txt       "<file> 0|1|2" (train/valid/test), optional

or from an image folder with `attributes.csv` (see `folder`). Official images are centre-cropped
to the usual 140x140 face square (140/178 of the width) and resized; the aspect ratio is kept.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from collafuse_flwr.data import folder
from collafuse_flwr.data.download import fetch, missing
from collafuse_flwr.data.table import DatasetError, ImageTable, decode_images

SPLITS = ("train", "valid", "test", "all")
FACE_CROP = 140 / 178
MANUAL = (
    "Put img_align_celeba/ (unzipped img_align_celeba.zip), list_attr_celeba.txt and "
    "list_eval_partition.txt from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html into "
    "{root}/celeba/, or point data-dir at an image folder with attributes.csv "
    "(filename,<40 attributes as 1/-1>[,split])."
)


def load_celeba(root: Path, split: str, image_size: int, download: bool) -> ImageTable:
    """CelebA's `split` ("" = train) as uint8 (N, 3, S, S) with its (N, 40) attributes."""
    from torchvision.datasets import CelebA

    if split not in ("", *SPLITS):
        raise DatasetError(f"dataset-split={split!r}: CelebA has the splits {', '.join(SPLITS)}")
    manual = MANUAL.format(root=root)
    if (root / "attributes.csv").exists():
        path = root / "attributes.csv"
        index = folder.read_split(path, ("filename",), split, "train")
        names = tuple(c for c in index.columns if c not in folder.NON_ATTRIBUTE_COLUMNS)
        return ImageTable(
            folder.read_images(path, index, image_size), None, (),
            folder.binary_attributes(index[list(names)], path), names, str(root),
        )
    base = root / CelebA.base_folder
    if not (base / "list_attr_celeba.txt").is_file():
        if not download:
            raise missing("CelebA", root, manual)
        fetch("CelebA", root, lambda: CelebA(root, split="all", target_type="attr", download=True),
              manual)
    attributes = _read_attributes(base / "list_attr_celeba.txt")
    attributes = attributes.loc[_split_files(base, split, attributes.index)]
    return ImageTable(
        decode_images([base / "img_align_celeba" / f for f in attributes.index], image_size, FACE_CROP),
        None, (), folder.binary_attributes(attributes, base / "list_attr_celeba.txt"),
        tuple(attributes.columns), str(base),
    )


def _read_attributes(path: Path) -> pd.DataFrame:
    """list_attr_celeba.txt as a frame indexed by file name, one column per attribute."""
    try:
        frame = pd.read_csv(path, sep=r"\s+", skiprows=1)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path} is not in CelebA's list_attr_celeba.txt format ({err})") from err
    if frame.shape[1] != 40:
        raise DatasetError(f"{path} has {frame.shape[1]} attribute columns, CelebA has 40")
    return frame


def _split_files(base: Path, split: str, files: pd.Index) -> pd.Index:
    """The files of `split` from list_eval_partition.txt; without that file only the whole
    set ("" or "all") can be asked for."""
    if split == "all":
        return files
    path = base / "list_eval_partition.txt"
    if not path.is_file():
        if split:
            raise DatasetError(f"dataset-split={split!r} needs {path}; without it use dataset-split='all'")
        return files
    partition = pd.read_csv(path, sep=r"\s+", header=None, names=["filename", "split"], index_col=0)
    wanted = SPLITS.index(split or "train")
    return files[partition["split"].reindex(files).to_numpy() == wanted]
