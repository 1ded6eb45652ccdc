"""The partition report of a run: who holds what, as `partition.csv` and `partition.png` in
its run directory (`RunDirectory.partition_csv`, `.partition_png`).

partition.csv (long format): client, split (train | held-out), kind, name, count, plus client
"reference", split "kept-aside": the images kept aside from all clients for the evaluation
feature network (data/clients.py, `reference_images`; none when an official test split serves);
kind is
    images     name "all": the number of images
    class      one row per class: images of that class
    attribute  one row per attribute: images carrying it
partition.png: per client, stacked class counts and/or the share of images carrying each
grouping attribute.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from collafuse_flwr.config import RunConfig  # noqa: E402
from collafuse_flwr.data.clients import client_indices, reference_images  # noqa: E402
from collafuse_flwr.data.loaders import load_table  # noqa: E402
from collafuse_flwr.data.partitions import DEFAULT_ATTRIBUTE_GROUPS, attribute_group_names  # noqa: E402
from collafuse_flwr.outputs import write_atomically  # noqa: E402


def partition_frame(config: RunConfig) -> pd.DataFrame:
    """The rows of partition.csv for `config`."""
    table = load_table(config)
    groups = [(client, split, idx) for client, splits in enumerate(client_indices(config))
              for split, idx in zip(("train", "held-out"), splits)]
    reference = reference_images(config)
    if reference.kept_aside:
        groups.append(("reference", "kept-aside", reference.indices))
    rows = []
    for client, split, idx in groups:
        rows.append((client, split, "images", "all", len(idx)))
        if table.labels is not None:
            counts = np.bincount(table.labels[idx], minlength=len(table.class_names))
            rows += [(client, split, "class", n, int(c)) for n, c in zip(table.class_names, counts)]
        if table.attributes is not None:
            counts = table.attributes[idx].sum(axis=0)
            rows += [(client, split, "attribute", n, int(c)) for n, c in zip(table.attribute_names, counts)]
    return pd.DataFrame(rows, columns=["client", "split", "kind", "name", "count"])


def write_partition_report(csv_path: Path, png_path: Path, config: RunConfig) -> pd.DataFrame:
    """Write partition.csv and partition.png (atomically) at the paths the run directory names;
    return the frame."""
    frame = partition_frame(config)
    write_atomically(csv_path, lambda tmp: frame.to_csv(tmp, index=False))
    train = frame[frame["split"] == "train"].astype({"client": int})  # clients only (not "reference")
    totals = train[train["kind"] == "images"].set_index("client")["count"]
    panels = [(draw, counts) for kind, draw in (("class", _class_panel), ("attribute", _attribute_panel))
              if not (counts := _plotted(train, kind, config)).empty]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4), squeeze=False)
    for ax, (draw, counts) in zip(axes[0], panels):
        draw(ax, counts, totals)
    fig.suptitle(f"{config.dataset}: partition={config.partition}, {config.num_clients} clients (training images)")
    fig.tight_layout()
    write_atomically(png_path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)
    return frame


def _plotted(train: pd.DataFrame, kind: str, config: RunConfig) -> pd.DataFrame:
    """The training rows of `kind` to plot: every class; the grouping attributes only."""
    rows = train[train["kind"] == kind]
    if kind == "attribute":
        if config.partition == "attribute-groups":
            names = [a for g in attribute_group_names(config) for a in g]
        elif "class" not in set(train["kind"]) and config.dataset in DEFAULT_ATTRIBUTE_GROUPS:
            names = [a.strip() for a in DEFAULT_ATTRIBUTE_GROUPS[config.dataset].replace(";", ",").split(",")]
        else:
            names = []
        rows = rows[rows["name"].isin(names)]
    order = [n for n in names if n in set(rows["name"])] if kind == "attribute" else rows["name"].unique()
    return rows.pivot(index="client", columns="name", values="count").reindex(columns=order)


def _class_panel(ax, counts: pd.DataFrame, totals: pd.Series) -> None:
    """Stacked bars: images per class on each client."""
    colours = plt.get_cmap("tab10" if counts.shape[1] <= 10 else "turbo", counts.shape[1])
    bottom = np.zeros(len(counts))
    for j, name in enumerate(counts.columns):
        ax.bar(counts.index, counts[name], bottom=bottom, color=colours(j), label=name)
        bottom += counts[name].to_numpy()
    ax.set(xlabel="client", ylabel="training images", title="classes per client", xticks=counts.index)
    if counts.shape[1] <= 20:
        ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1, 1))


def _attribute_panel(ax, counts: pd.DataFrame, totals: pd.Series) -> None:
    """Grouped bars: share of each client's images carrying each grouping attribute."""
    share = counts.div(totals, axis=0)
    width = 0.8 / len(share)
    x = np.arange(share.shape[1])
    for i, client in enumerate(share.index):
        ax.bar(x + i * width, share.loc[client], width, label=f"client {client}")
    ax.set_xticks(x + 0.4 - width / 2, share.columns, rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="share of the client's images", ylim=(0, 1), title="grouping attributes per client")
    ax.legend(fontsize=7)
