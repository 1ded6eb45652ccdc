"""The CollaFuse ServerApp: validate the config, make the run directory, run the strategy."""

from __future__ import annotations

import hashlib
import json
import time
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from collafuse_flwr.config import RunConfig
from collafuse_flwr.data import client_indices, data_root, image_shape, load_table
from collafuse_flwr.data.report import write_partition_report
from collafuse_flwr.metrics import cache_classifier, classifier_accuracy
from collafuse_flwr.models import Denoiser, build_denoiser
from collafuse_flwr.outputs import append_metrics, create_run_dir, write_config
from collafuse_flwr.strategies.collafuse import CollaFuseStrategy

app = ServerApp()


def wait_for_clients(grid: Grid, count: int, seconds: float) -> list[int]:
    """Block until `count` SuperNodes registered; fail with a clear message after `seconds`."""
    deadline = time.monotonic() + seconds
    while len(nodes := list(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"num-clients={count} but only {len(nodes)} SuperNode(s) registered within "
                f"{seconds:.0f}s; run with --federation-config 'num-supernodes={count}'"
            )
        time.sleep(0.5)
    return nodes


def feature_network(config: RunConfig) -> tuple[Path, float]:
    """Train (once, cached) the fd_classifier feature network on the pooled training images of
    all clients; return its path and its accuracy on the pooled held-out images."""
    key = json.dumps(
        [config.dataset, str(data_root(config)), config.dataset_split, config.image_size,
         config.num_clients, config.partition, config.classes_per_client, config.dirichlet_alpha,
         config.attribute_groups, config.held_out_fraction, config.seed,
         config.metric_classifier_epochs]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = Path(config.output_dir).expanduser().resolve() / ".cache" / f"fd_classifier-{digest}.safetensors"
    table, splits = load_table(config), client_indices(config)
    train, held = (np.concatenate([s[i] for s in splits]) for i in (0, 1))  # client by client
    targets = table.targets()
    net = cache_classifier(
        path, torch.from_numpy(table.images[train]), targets[train],
        config.metric_classifier_epochs, config.seed,
    )
    return path, classifier_accuracy(net, torch.from_numpy(table.images[held]), targets[held])


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run `num-server-rounds` CollaFuse rounds and write everything into one run directory."""
    config = RunConfig.from_flower(context.run_config)
    log(INFO, "Dataset %s from %s", config.dataset, load_table(config).source)
    shape = image_shape(config)
    client_indices(config)  # checks the partition before anything is written
    run_dir = create_run_dir(config.output_dir, f"{config.dataset}-collafuse-tz{config.t_zeta}")
    write_config(run_dir, config.to_flower())
    write_partition_report(run_dir, config)
    log(INFO, "CollaFuse run directory: %s", run_dir)
    classifier_path, accuracy = feature_network(config)
    log(INFO, "fd_classifier feature network: held-out accuracy %.3f (%s)", accuracy, classifier_path)
    append_metrics(run_dir, [(0, "server", "feature-network-accuracy", accuracy)])
    wait_for_clients(grid, config.num_clients, config.wait_for_clients_seconds)
    net = build_denoiser(
        config.image_size, shape[0], config.block_channels, config.unet_layers_per_block,
        config.unet_attention, seed=config.seed,
    )
    strategy = CollaFuseStrategy(
        config, run_dir, Denoiser(net, config.server_lr, config.ema_decay), shape, classifier_path
    )
    start = time.perf_counter()
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(),
        num_rounds=config.num_server_rounds,
        timeout=config.round_timeout_seconds,
    )
    log(INFO, "CollaFuse finished in %.0fs; results in %s", time.perf_counter() - start, run_dir)
