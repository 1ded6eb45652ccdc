"""Setting up a run on the server's side, before the first round: the federation's size, every
check that can fail (config, weights files, data, output directory, the checkpoint to resume),
the run directory, the evaluation's feature network and notes, and the strategy of the run's
protocol."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import Message, RecordDict
from flwr.common.constant import NUM_PARTITIONS_KEY
from flwr.common.logger import log
from flwr.serverapp import Grid

from collafuse_flwr.checkpoint import Checkpoint, latest_checkpoint, resumable_run
from collafuse_flwr.config import KEYS, RunConfig
from collafuse_flwr.data import client_indices, condition_sizes, image_shape, load_table, partition_key
from collafuse_flwr.data.clients import reference_images
from collafuse_flwr.data.report import write_partition_report
from collafuse_flwr.diffusion.conditions import run_conditioning
from collafuse_flwr.diffusion.models import Denoiser, build_denoiser, resolve_device
from collafuse_flwr.metrics.classifier import FeatureClassifier, cache_classifier, classifier_accuracy
from collafuse_flwr.metrics.conditioning import conditioning_note
from collafuse_flwr.metrics.features import load_feature_networks, pretrained_weights, weights_digest
from collafuse_flwr.run_dir import RunDirectory, check_output_dir
from collafuse_flwr.strategies.collafuse import CollaFuseStrategy
from collafuse_flwr.strategies.fedavg import FedAvgDiffusion


def feature_network(config: RunConfig, run_dir: RunDirectory) -> tuple[Path, FeatureClassifier, float]:
    """Train (once, cached beside `run_dir` in the output directory) the fd_classifier feature
    network on reference images that no client holds (`reference_images`: the dataset's
    official test split, else a share of the dataset kept aside from all clients before
    partitioning; in a deployment the server's own images); return its path, the network and
    its accuracy on the reference images held back from its training. No client's image or
    label is read."""
    reference = reference_images(config)
    key = json.dumps(["reference", partition_key(config), config.metric_classifier_epochs])
    path = run_dir.feature_network_file(hashlib.sha256(key.encode()).hexdigest()[:12])
    images, targets = reference.table.images, reference.table.targets()
    net = cache_classifier(
        path, torch.from_numpy(images[reference.train]), targets[reference.train],
        config.metric_classifier_epochs, config.seed,
    )
    return path, net, classifier_accuracy(net, torch.from_numpy(images[reference.check]), targets[reference.check])


def condition_note(config: RunConfig) -> str:
    """What the denoisers condition on and what the server learns of the clients' conditions."""
    what = {"class": "class", "attributes": "attributes", "text": "attributes as a CLIP text prompt"}
    clients = ("unconditional clients" if config.condition == "none" else
               f"clients conditioned on each image's {what[config.condition]} "
               f"(condition-dropout={config.condition_dropout}, guidance-scale={config.guidance_scale})")
    if config.strategy == "fedavg":
        return f"{clients}; fedavg: no server denoiser, nothing about conditions is sent"
    server = {
        "none": "an unconditional server: no condition is sent",
        "client-id": "a server conditioned on the sender of each upload (which it knows anyway): no condition is sent",
        "full": "a server conditioned on each upload's condition, which the client sends with it (the paper's "
                "setup): the server learns every training image's condition and those of the "
                "eval-num-samples held-out images each client asks for (conditions-received per client)",
    }[config.server_condition]
    return f"{clients}; {server}"


def evaluation_notes(config: RunConfig, weights: dict) -> dict[str, object]:
    """What summary.json says beside the numbers: sample sizes, the feature network's data,
    what the pooled row is made of, skipped metrics, why disclosure figures may be missing."""
    notes: dict[str, object] = {
        "samples": (
            f"quality distances compare eval-num-samples={config.eval_num_samples} generated images "
            "per client with the client's held-out images (num-generated, num-real); Fréchet "
            "distances are biased upward at a few hundred samples (the usual FID uses 50,000): "
            "compare them only at equal sample counts"
        ),
        "fd_classifier": (
            "Fréchet distance on the features of a small classifier trained on "
            f"{reference_images(config).description}; feature-network-accuracy is measured on the "
            "part of them held back from its training; not Inception FID"
        ),
        "pooled": (
            "Fréchet distances only, pooled from each client's count (at most eval-num-samples: no client "
            "sets the pooled row), mean and covariance of its held-out and of its generated images' "
            "features (what the clients send: statistics of each set, such as its class mix, never one "
            "image's features, and only of more images than features unless a client allows fewer); a "
            "network's row needs every evaluated client's moments; no pooled KID, which "
            "would need every image's features, from which the server recovers the held-out labels"
            if config.pooled_metrics else "pooled-metrics = false: the clients send no feature moments, no pooled row"
        ),
    }
    notes["conditions"] = condition_note(config)
    accuracy_note = conditioning_note(config, condition_sizes(config)[0])
    if accuracy_note:
        notes["condition-accuracy"] = accuracy_note
    skipped = {w.backbone.name: w.skip_message() for w in weights.values() if not w.available}
    if skipped:
        notes["skipped"] = skipped
    if config.strategy == "fedavg":
        notes["disclosure"] = "fedavg: clients send weights, never images; the image attacks do not apply"
    elif config.client_data == "own":
        notes["disclosure"] = ("client-data = own: the attacks need the clients' true images, which this server "
                               "does not hold (simulation only); views-per-image and effective-snr are reported")
    elif config.disclosure_num_images == 0:
        notes["disclosure"] = "disclosure-num-images = 0: no attacks were run"
    elif config.t_zeta == config.timesteps:
        notes["disclosure"] = "t_zeta = T: nothing is uploaded, the server can only guess (linkage = chance)"
    return notes


@dataclass
class Run:
    """A run set up and ready to start: its directory, the checkpoint it resumes from (or
    None), and its strategy."""

    config: RunConfig
    run_dir: RunDirectory
    checkpoint: Checkpoint | None
    strategy: CollaFuseStrategy | FedAvgDiffusion

    @property
    def rounds_done(self) -> int:
        return self.checkpoint.server_round if self.checkpoint else 0

    def start(self, grid: Grid) -> None:
        """Run the remaining rounds of the strategy on `grid`."""
        config = self.config
        start = time.perf_counter()
        self.strategy.start(
            grid=grid,
            initial_arrays=self.strategy.initial_arrays(),
            num_rounds=config.num_server_rounds - self.rounds_done,
            timeout=config.round_timeout_seconds,
        )
        log(INFO, "%s finished in %.0fs; results in %s", config.strategy, time.perf_counter() - start, self.run_dir)


FEDERATION_QUERY = "query.federation"  # the ClientApp's answer: its node config's num-partitions


def wait_for_clients(grid: Grid, count: int, seconds: float) -> list[int]:
    """Block until `count` SuperNodes registered; fail with a clear message after `seconds`."""
    deadline = time.monotonic() + seconds
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"num-clients={count} but only {len(nodes)} SuperNode(s) registered within "
                f"{seconds:.0f}s (wait-for-clients-seconds): start the missing SuperNodes"
            )
        time.sleep(0.5)
    return nodes


def federation_size(grid: Grid, seconds: float) -> int | None:
    """How many SuperNodes the federation has, as the first SuperNode to register says: the
    `num-partitions` that a simulation puts into every SuperNode's node config. None where it
    says none (a deployment's SuperNodes) or its reply is not one integer within num-clients'
    range (decoded values; a bad reply never crashes the server). Waits at most `seconds` for
    a SuperNode and then for its reply."""
    deadline = time.monotonic() + seconds
    first = wait_for_clients(grid, 1, seconds)[0]
    query = Message(RecordDict(), dst_node_id=first, message_type=FEDERATION_QUERY)
    replies = list(grid.send_and_receive([query], timeout=max(deadline - time.monotonic(), 1.0)))
    if len(replies) != 1 or replies[0].has_error():
        return None
    record = replies[0].content.config_records.get("federation")
    size = record.get(NUM_PARTITIONS_KEY) if record is not None else None
    return size if type(size) is int and size >= 1 and KEYS["num-clients"].admits(size) else None


def federated_run(grid: Grid, run_config: dict, flower_run_id: int) -> Run:
    """The ServerApp's start: the run config checked (`RunConfig.from_flower`), its num-clients
    met by the federation of `grid` (`federation_size`, `RunConfig.for_federation`: a mismatch
    fails here, before any run directory exists), then `prepare_run`."""
    config = RunConfig.from_flower(run_config)
    config = config.for_federation(federation_size(grid, config.wait_for_clients_seconds))
    return prepare_run(config, flower_run_id)


def prepare_run(config: RunConfig, flower_run_id: int) -> Run:
    """Check everything, then create (or resume) the run directory, record it as the one of
    Flower run `flower_run_id` (`RunDirectory.record_flower_run`: how the launcher finds it),
    train the feature network and build the strategy (CollaFuse, the published variant or
    FedAvg) with the server's model, fresh or from the checkpoint."""
    weights = pretrained_weights(config.fid_weights, config.fcd_weights)  # bad paths fail here
    log(INFO, "Dataset %s from %s", config.dataset, load_table(config).source)
    shape = image_shape(config)
    if config.client_data == "partition":
        client_indices(config)  # checks the partition before anything is written
    conditioning = run_conditioning(config)  # and the text encoder's weights
    check_output_dir(config.output_dir)
    device = resolve_device("server-device", config.server_device)
    resumed = resumable_run(config) if config.resume else None
    checkpoint = latest_checkpoint(resumed, config, device) if resumed else None
    run_dir = resumed or RunDirectory.create(config)
    run_dir.record_flower_run(flower_run_id)
    if resumed is None:
        run_dir.write_config(config.to_flower())
        if config.client_data == "partition":  # the clients' own data is theirs: no report
            write_partition_report(run_dir.partition_csv, run_dir.partition_png, config)
    else:
        rounds_done = checkpoint.server_round if checkpoint else 0
        run_dir.truncate_metrics(rounds_done)
        line = f"resumed after round {rounds_done} of {config.num_server_rounds} (config {config.identity_hash()})"
        log(INFO, "CollaFuse %s", line)
        run_dir.append_log(line)
    key = run_dir.run_key()
    log(INFO, "CollaFuse run directory: %s (server denoiser on %s)", run_dir, device)
    classifier_path, classifier, accuracy = feature_network(config, run_dir)
    digest = weights_digest(classifier.state_dict())  # what a client lists in its trusted-evaluators
    line = f"fd_classifier feature network: held-out accuracy {accuracy:.3f}, SHA-256 {digest} ({classifier_path})"
    log(INFO, line)
    run_dir.append_log(line)
    run_dir.append_metrics([(0, "server", "feature-network-accuracy", accuracy)])
    notes = evaluation_notes(config, weights)
    for w in weights.values():
        if w.available:
            log(INFO, "%s weights: %s (from %s)", w.backbone.name, w.path, w.found_in)
        else:
            log(WARNING, w.skip_message())
    if checkpoint:
        model = checkpoint.model
    else:
        # FedAvg's global model is the clients' (their condition space); CollaFuse's the server's
        space = conditioning.client if config.strategy == "fedavg" else conditioning.server
        net = build_denoiser(
            config.image_size, shape[0], config.block_channels, config.unet_layers_per_block,
            config.unet_attention, seed=config.seed, condition_dim=space.size if space else 0,
        )
        model = Denoiser(net, config.server_lr, config.ema_decay, device)
    networks = load_feature_networks(classifier, digest, weights)
    if config.strategy == "fedavg":
        strategy = FedAvgDiffusion(config, run_dir, key, model, networks, notes)
    else:
        strategy = CollaFuseStrategy(config, run_dir, key, model, shape, networks, notes)
    if checkpoint:
        strategy.restore(checkpoint)
    return Run(config, run_dir, checkpoint, strategy)
