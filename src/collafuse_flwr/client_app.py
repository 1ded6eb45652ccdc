"""The CollaFuse client: a private denoiser for t in [1, t_zeta] that never leaves the client.

train:    train the private denoiser on the client's own images for its budget, then
          reply with one cut-point sample x_{t_zeta} per training image (and counts).
evaluate: receive the server's handed-over states x_{t_zeta}, finish sampling with the
          private denoiser, save a grid, and report the quality distances (fd_classifier,
          and fid / kid / fcd when their weights are available) against the client's held-out
          images, the cost of sampling, and (pooled-metrics) the features for the pooled row.
The denoiser and its optimizer persist on disk between rounds, not in `context.state`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from collafuse_flwr import wire
from collafuse_flwr.config import ConfigError, RunConfig
from collafuse_flwr.data import ClientData, client_data, partition_key
from collafuse_flwr.losses import client_loss
from collafuse_flwr.metrics.cost import sampling_cost, train_cost
from collafuse_flwr.metrics.distances import named_distances
from collafuse_flwr.metrics.features import cached_features, load_feature_networks, pretrained_weights
from collafuse_flwr.models import Denoiser, build_denoiser
from collafuse_flwr.outputs import save_grid
from collafuse_flwr.protocols import handover_time
from collafuse_flwr.sampling import denoise, make_sampler, split_at_cut
from collafuse_flwr.schedule import CutSchedule
from collafuse_flwr.seeds import derive_seed
from collafuse_flwr.training import train_for_images

app = ClientApp()


@dataclass(frozen=True)
class ClientRound:
    """What a client knows when a message arrives: its validated config, identity, data."""

    config: RunConfig
    partition_id: int
    server_round: int
    message_config: ConfigRecord
    run_dir: Path
    schedule: CutSchedule
    data: ClientData

    @property
    def model_dir(self) -> Path:
        """Where this client's private denoiser lives between rounds."""
        return self.run_dir / "clients" / f"client-{self.partition_id}" / "model"

    @classmethod
    def from_message(cls, msg: Message, context: Context) -> "ClientRound":
        config = RunConfig.from_flower(context.run_config)
        partition_id = int(context.node_config["partition-id"])
        num_partitions = int(context.node_config.get("num-partitions", config.num_clients))
        if num_partitions != config.num_clients:
            raise ConfigError(
                f"num-clients={config.num_clients} but the federation has {num_partitions} "
                "SuperNodes; run with --federation-config 'num-supernodes=<num-clients>'"
            )
        message_config = msg.content.config_records["config"]
        return cls(
            config,
            partition_id,
            int(message_config["server-round"]),
            message_config,
            Path(str(message_config["run-dir"])),
            CutSchedule(config.timesteps, config.t_zeta, config.beta_schedule),
            client_data(config, partition_id),
        )


def _denoiser(client: ClientRound) -> Denoiser:
    """This client's denoiser, optimizer and EMA: from disk if trained before, else fresh."""
    config = client.config
    if Denoiser.exists(client.model_dir):
        return Denoiser.load(client.model_dir, config.client_lr, config.ema_decay)
    net = build_denoiser(
        config.image_size,
        client.data.train.shape[1],
        config.block_channels,
        config.unet_layers_per_block,
        config.unet_attention,
        seed=config.seed + 1 + client.partition_id,
    )
    return Denoiser(net, config.client_lr, config.ema_decay)


def cut_point_uploads(client: ClientRound) -> torch.Tensor:
    """x_{t_zeta} for every training image, (n, C, H, W); empty when the server owns no step.

    Noise policy "once": eps is drawn from a generator seeded by (seed, client), so an image
    yields the same upload in every round and the server never sees two views of it.
    "fresh": a new eps every round.
    """
    config, train_images = client.config, client.data.train
    if client.schedule.server_range.is_empty:
        return train_images[:0]
    key = [config.seed, client.partition_id]
    if config.noise_policy == "fresh":
        key.append(client.server_round)
    eps = torch.randn(train_images.shape, generator=torch.Generator().manual_seed(derive_seed(*key)))
    return client.schedule.noise_to_cut(train_images, eps)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the private denoiser on t in [1, t_zeta]; reply with the cut-point uploads."""
    client = ClientRound.from_message(msg, context)
    config, partition_id, schedule = client.config, client.partition_id, client.schedule
    denoiser = _denoiser(client)
    generator = torch.Generator().manual_seed(
        derive_seed(config.seed, partition_id, client.server_round, 1)
    )
    start = time.perf_counter()
    budget = 0 if schedule.client_range.is_empty else config.client_images_per_round
    stats = train_for_images(
        denoiser,
        client.data.train,
        budget,
        config.batch_size,
        lambda n, x0, g: client_loss(n, schedule, x0, g),
        generator,
    )
    denoiser.save(client.model_dir)
    x_cut = cut_point_uploads(client)
    seconds = time.perf_counter() - start
    metrics = {
        "partition-id": partition_id,
        "num-examples": int(x_cut.shape[0]),
        "train-loss": float(stats["loss"]) if stats["steps"] else 0.0,
        "images-seen": int(stats["images-seen"]),
        "train-seconds": seconds,
        **train_cost(denoiser.net, tuple(client.data.train.shape[1:]), int(stats["images-seen"])),
    }
    return Message(content=wire.pack_uploads(x_cut, config.upload_dtype, metrics), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Finish the server's handed-over states with the private denoiser; report quality."""
    client = ClientRound.from_message(msg, context)
    config, partition_id = client.config, client.partition_id
    x = wire.unpack_handover(msg.content, tuple(client.data.train.shape[1:]), config.eval_num_samples)
    sampler = make_sampler(config.sampler, client.schedule, config.sampling_steps, config.clip_denoised)
    _, client_steps = split_at_cut(sampler, handover_time(config))
    start = time.perf_counter()
    net = None
    if len(client_steps):
        if not Denoiser.exists(client.model_dir):
            raise RuntimeError(f"client {partition_id} has no trained denoiser in {client.model_dir}")
        net = Denoiser.load(client.model_dir, config.client_lr, config.ema_decay).for_sampling()
        seed = int(client.message_config["sample-seed"])
        x = denoise(net, sampler, x, client_steps, seed, config.ddim_eta)
    images = x.clamp(-1, 1)
    sample_seconds = time.perf_counter() - start
    save_grid(images, client.run_dir / "samples" / f"round-{client.server_round:03d}-client-{partition_id}.png")
    start = time.perf_counter()
    quality, features = _quality(client, images)
    metrics = {
        "partition-id": partition_id,
        "num-generated": int(images.shape[0]),
        "num-real": int(client.data.held_out.shape[0]),
        "client-sampling-steps": len(client_steps),
        "sample-seconds": sample_seconds,
        **(sampling_cost(net, tuple(images.shape[1:]), len(images), len(client_steps)) if net is not None
           else {"nfe-sample": 0.0, "flops-sample": 0.0}),
        **quality,
        "eval-seconds": time.perf_counter() - start,
    }
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if features:
        content[wire.FEATURES] = wire.pack_features(features)
    return Message(content=content, reply_to=msg)


def _quality(client: ClientRound, images: torch.Tensor) -> tuple[dict, dict]:
    """Distances between the generated images and the held-out images on every available
    feature network (the held-out features are cached), and the features for the pooled row."""
    config = client.config
    weights = pretrained_weights(config.fid_weights, config.fcd_weights)
    networks = load_feature_networks(Path(str(client.message_config["classifier-path"])), weights)
    cache_dir = client.run_dir.parent / ".cache" / "features"
    key = f"{partition_key(config)}:client-{client.partition_id}:held-out"
    quality, features = {}, {}
    for network in networks:
        real = cached_features(network, client.data.held_out, cache_dir, key)
        fake = network.features(images)
        quality.update(named_distances(network.fd_name, network.kid_name, real, fake))
        if config.pooled_metrics:
            features.update({f"{network.name}-real": real, f"{network.name}-generated": fake})
    return quality, features
