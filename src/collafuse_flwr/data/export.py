"""Hand each simulated client its own folder: the images of every client's partition (its
training and held-out images) and the reference images no client holds, written as image
folders in the dataset's folder layout (`folder`), so that a deployment (client-data = own) runs
on the same data as the simulation: each SuperNode's node config names one client's folder, the
server's data-dir the reference folder.

    <out>/client-<k>/labels.csv        filename,label,label_name   (digits, CIFAR-10)
    <out>/client-<k>/attributes.csv    filename,<attributes as 1/-1> (CelebA)
    <out>/client-<k>/images/<row>.png  8-bit PNG at the run's image-size
    <out>/reference/...                the same layout

A deployed client splits its folder into training and held-out images itself, so its split is
not the simulation's (`clients.own_client_data`).

    collafuse-export OUT [--run-config "dataset='cifar10' data-dir='...'"]...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from collafuse_flwr.config import ConfigError, RunConfig
from collafuse_flwr.data.clients import client_indices, reference_images
from collafuse_flwr.data.loaders import load_table
from collafuse_flwr.data.table import ImageTable

EXPORTABLE = ("digits", "cifar10", "celeba")  # AwA2's folder needs the whole class-predicate matrix


def export_partitions(config: RunConfig, out: Path) -> tuple[list[Path], Path]:
    """Write every client's images (training and held-out) and the reference images under
    `out` (see the module); return the client folders and the reference folder. `out` must
    not exist yet."""
    if config.dataset not in EXPORTABLE:
        raise ConfigError(f"dataset={config.dataset!r}: export writes {', '.join(EXPORTABLE)}")
    if config.client_data != "partition":
        raise ConfigError("export cuts the simulation's partitions: use client-data='partition'")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; export writes a new directory")
    table, reference = load_table(config), reference_images(config)
    clients = []
    for k, (train, held) in enumerate(client_indices(config)):
        clients.append(write_folder(table, np.union1d(train, held), out / f"client-{k}"))
    return clients, write_folder(reference.table, reference.indices, out / "reference")


def write_folder(table: ImageTable, rows: np.ndarray, directory: Path) -> Path:
    """The images `rows` of `table` as an image folder at `directory` (labels.csv for a table
    with classes, else attributes.csv), files named by row."""
    (directory / "images").mkdir(parents=True)
    names = [f"images/{int(i):06d}.png" for i in rows]
    for name, image in zip(names, _uint8(table.images[rows])):
        Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(directory / name)
    if table.labels is not None:
        labels = table.labels[rows]
        index = pd.DataFrame({"filename": names, "label": labels,
                              "label_name": [table.class_names[y] for y in labels]})
        index.to_csv(directory / "labels.csv", index=False)
    else:
        values = np.where(table.attributes[rows] == 1, 1, -1)
        index = pd.concat([pd.DataFrame({"filename": names}),
                           pd.DataFrame(values, columns=list(table.attribute_names))], axis=1)
        index.to_csv(directory / "attributes.csv", index=False)
    return directory


def _uint8(images: np.ndarray) -> np.ndarray:
    """(n, C, S, S) images as uint8: decoded tables already are; float32 in [-1, 1] (the
    embedded digits) are mapped to [0, 255] and rounded."""
    if images.dtype == np.uint8:
        return np.asarray(images)
    return np.round((np.clip(images, -1, 1) + 1) * 127.5).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    from flwr.common.config import get_project_config, parse_config_args

    parser = argparse.ArgumentParser(prog="collafuse-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="a new directory")
    parser.add_argument("--project", type=Path, default=Path("."), help="the project (its run-config defaults)")
    parser.add_argument("--run-config", action="append", default=[], help="overlay file or 'key=value ...'")
    args = parser.parse_args(argv)
    values = dict(get_project_config(args.project)["tool"]["flwr"]["app"]["config"])
    for item in args.run_config:
        values.update(parse_config_args([item]))
    clients, reference = export_partitions(RunConfig.from_flower(values).for_launchers(), args.out)
    for folder in [*clients, reference]:
        print(folder)
    return 0
