"""The CollaFuse client: a private denoiser for t in [1, t_zeta] that never leaves the client.

train:    train the private denoiser on the client's own images for its budget, then
          reply with one cut-point sample x_{t_zeta} per training image (and counts).
evaluate: receive the server's handed-over states x_{t_zeta}, finish sampling with the
          private denoiser, save a grid, and report the quality distances (fd_classifier,
          and fid / kid / fcd when their weights are available) against the client's held-out
          images, the cost of sampling, and (pooled-metrics) the feature moments for the pooled row.
The denoiser, its optimizer and EMA persist on disk between rounds (one checkpoint per
round, the last two kept) below the client's own state directory (client_state.py), not in
`context.state` and never at a path a message names, so a resumed round starts from the
previous round's state.
With strategy "fedavg" both handlers run the FedAvg baseline instead (fedavg_client.py).
"""

from __future__ import annotations

import time

import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from collafuse_flwr import fedavg_client, wire
from collafuse_flwr.client_round import ClientRound, evaluation_reply, with_nan_arrays
from collafuse_flwr.losses import client_loss
from collafuse_flwr.metrics.cost import train_cost
from collafuse_flwr.protocols import handover_time
from collafuse_flwr.sampling import denoise, make_sampler, split_at_cut
from collafuse_flwr.training import train_for_images

app = ClientApp()


def cut_point_uploads(client: ClientRound) -> torch.Tensor:
    """x_{t_zeta} = sqrt(abar_r) x0 + sqrt(1 - abar_r) eps for every training image,
    (n, C, H, W); empty when the server owns no step.

    eps comes from the client's secret "upload" stream (client_state.py, seeds.py), keyed by
    the configuration's identity and, under the noise policy "fresh", the round: nothing the
    server holds or sends determines it. "once": the same eps in every round, so an image
    yields the same upload and the server never sees two views of it; "fresh": a new eps
    every round.
    """
    config, train_images = client.config, client.data.train
    if client.schedule.server_range.is_empty:
        return train_images[:0]
    seed = client.seed("upload", per_round=config.noise_policy == "fresh")
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn(train_images.shape, generator=generator)
    return client.schedule.noise_to_cut(train_images, eps)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One training round of the configured strategy (with any injected fault applied)."""
    client = ClientRound.from_message(msg, context)
    fault = client.config.injected_faults.get((client.partition_id, client.server_round))
    if fault == "raise":
        raise RuntimeError(f"fault-injection: client {client.partition_id} raises in round {client.server_round}")
    if client.config.strategy == "fedavg":
        content = fedavg_client.train(client, msg.content)
    else:
        content = collafuse_train(client)
    return Message(content=with_nan_arrays(content) if fault == "nan" else content, reply_to=msg)


def collafuse_train(client: ClientRound) -> RecordDict:
    """Train the private denoiser on t in [1, t_zeta]; the reply with the cut-point uploads."""
    config, partition_id, schedule = client.config, client.partition_id, client.schedule
    denoiser = client.denoiser()
    generator = torch.Generator().manual_seed(client.seed("client-train"))
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
    client.save(denoiser)
    x_cut = cut_point_uploads(client)
    seconds = time.perf_counter() - start
    metrics = {
        "partition-id": partition_id,
        "num-examples": int(x_cut.shape[0]),
        "train-loss": float(stats["loss"]) if stats["steps"] else 0.0,
        "images-seen": int(stats["images-seen"]),
        "train-seconds": seconds,
        **train_cost(denoiser.net, client.image_shape, int(stats["images-seen"])),
    }
    return wire.pack_uploads(x_cut, config.upload_dtype, metrics)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Finish the server's handed-over states with the private denoiser; report quality."""
    client = ClientRound.from_message(msg, context)
    if client.config.strategy == "fedavg":
        return Message(content=fedavg_client.evaluate(client, msg.content), reply_to=msg)
    config = client.config
    x = wire.unpack_handover(msg.content, client.image_shape, config.eval_num_samples)
    sampler = make_sampler(config.sampler, client.schedule, config.sampling_steps, config.clip_denoised)
    _, client_steps = split_at_cut(sampler, handover_time(config))
    start = time.perf_counter()
    net = None
    if len(client_steps):
        net = client.trained_denoiser().for_sampling()
        seed = wire.config_int(client.message_config, "sample-seed", 0, 2**63 - 1)
        x = denoise(net, sampler, x, client_steps, seed, config.ddim_eta)
    images = x.clamp(-1, 1)
    content = evaluation_reply(client, images, net, len(client_steps), time.perf_counter() - start)
    return Message(content=content, reply_to=msg)
