"""The CollaFuse client: a private denoiser for t in [1, t_zeta] that never leaves the client.

train:    train the private denoiser on the client's own images for its budget, then
          reply with one cut-point sample x_{t_zeta} per training image (and counts).
evaluate: receive the server's handed-over states x_{t_zeta}, finish sampling with the
          private denoiser, save a grid, and report fd_classifier / kid_classifier against
          the client's held-out images.
The denoiser and its optimizer persist on disk between rounds, not in `context.state`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from collafuse_flwr import wire
from collafuse_flwr.config import ConfigError, RunConfig
from collafuse_flwr.data import ClientData, client_data
from collafuse_flwr.losses import client_loss
from collafuse_flwr.metrics import frechet_and_kid, load_classifier
from collafuse_flwr.models import Denoiser, build_denoiser
from collafuse_flwr.outputs import save_grid
from collafuse_flwr.sampling import denoise, make_sampler, split_at_cut
from collafuse_flwr.schedule import CutSchedule
from collafuse_flwr.training import train_for_images

app = ClientApp()


def _setup(msg: Message, context: Context) -> tuple[RunConfig, int, ConfigRecord, Path]:
    """Validated run config, partition id, the message's config and this client's folder."""
    config = RunConfig.from_flower(context.run_config)
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config.get("num-partitions", config.num_clients))
    if num_partitions != config.num_clients:
        raise ConfigError(
            f"num-clients={config.num_clients} but the federation has {num_partitions} "
            "SuperNodes; run with --federation-config 'num-supernodes=<num-clients>'"
        )
    round_config = msg.content.config_records["config"]
    client_dir = Path(str(round_config["run-dir"])) / "clients" / f"client-{partition_id}"
    return config, partition_id, round_config, client_dir


def _denoiser(config: RunConfig, partition_id: int, client_dir: Path, channels: int) -> Denoiser:
    """This client's denoiser, optimizer and EMA: from disk if trained before, else fresh."""
    if Denoiser.exists(client_dir / "model"):
        return Denoiser.load(client_dir / "model", config.client_lr, config.ema_decay)
    net = build_denoiser(
        config.image_size,
        channels,
        config.block_channels,
        config.unet_layers_per_block,
        config.unet_attention,
        seed=config.seed + 1 + partition_id,
    )
    return Denoiser(net, config.client_lr, config.ema_decay)


def cut_point_uploads(
    schedule: CutSchedule, data: ClientData, config: RunConfig, partition_id: int, server_round: int
) -> torch.Tensor:
    """x_{t_zeta} for every training image, (n, C, H, W); empty when the server owns no step.

    Noise policy "once": eps is drawn from a generator seeded by (seed, client), so an image
    yields the same upload in every round and the server never sees two views of it.
    "fresh": a new eps every round.
    """
    if schedule.server_range.is_empty:
        return data.train[:0]
    key = [config.seed, partition_id] + ([server_round] if config.noise_policy == "fresh" else [])
    generator = torch.Generator().manual_seed(_seed_from(key))
    eps = torch.randn(data.train.shape, generator=generator)
    return schedule.noise_to_cut(data.train, eps)


def _seed_from(key: list[int]) -> int:
    """A 32-bit seed derived from a list of ints (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence(key).generate_state(1)[0])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the private denoiser on t in [1, t_zeta]; reply with the cut-point uploads."""
    config, partition_id, round_config, client_dir = _setup(msg, context)
    server_round = int(round_config["server-round"])
    schedule = CutSchedule(config.timesteps, config.t_zeta, config.beta_schedule)
    data = client_data(config, partition_id)
    denoiser = _denoiser(config, partition_id, client_dir, data.train.shape[1])
    generator = torch.Generator().manual_seed(_seed_from([config.seed, partition_id, server_round, 1]))
    start = time.perf_counter()
    budget = 0 if schedule.client_range.is_empty else config.client_images_per_round
    stats = train_for_images(
        denoiser,
        data.train,
        budget,
        config.batch_size,
        lambda n, x0, g: client_loss(n, schedule, x0, g),
        generator,
    )
    denoiser.save(client_dir / "model")
    x_cut = cut_point_uploads(schedule, data, config, partition_id, server_round)
    metrics = {
        "partition-id": partition_id,
        "num-examples": int(x_cut.shape[0]),
        "train-loss": float(stats["loss"]) if stats["steps"] else 0.0,
        "images-seen": int(stats["images-seen"]),
        "train-seconds": time.perf_counter() - start,
    }
    return Message(content=wire.pack_uploads(x_cut, config.upload_dtype, metrics), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Finish the server's handed-over states with the private denoiser; report quality."""
    config, partition_id, round_config, client_dir = _setup(msg, context)
    server_round = int(round_config["server-round"])
    schedule = CutSchedule(config.timesteps, config.t_zeta, config.beta_schedule)
    data = client_data(config, partition_id)
    x = wire.unpack_handover(msg.content, tuple(data.train.shape[1:]), config.eval_num_samples)
    sampler = make_sampler(config.sampler, schedule, config.sampling_steps, config.clip_denoised)
    _, client_steps = split_at_cut(sampler, config.t_zeta)
    start = time.perf_counter()
    if len(client_steps):
        if not Denoiser.exists(client_dir / "model"):
            raise RuntimeError(f"client {partition_id} has no trained denoiser in {client_dir}")
        net = Denoiser.load(client_dir / "model", config.client_lr, config.ema_decay).for_sampling()
        x = denoise(net, sampler, x, client_steps, int(round_config["sample-seed"]), config.ddim_eta)
    images = x.clamp(-1, 1)
    sample_seconds = time.perf_counter() - start
    run_dir = Path(str(round_config["run-dir"]))
    save_grid(images, run_dir / "samples" / f"round-{server_round:03d}-client-{partition_id}.png")
    extractor = load_classifier(Path(str(round_config["classifier-path"])))
    quality = frechet_and_kid(extractor, data.held_out, images)
    metrics = {
        "partition-id": partition_id,
        "num-examples": int(images.shape[0]),
        "client-sampling-steps": len(client_steps),
        "sample-seconds": sample_seconds,
        **quality,
    }
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
