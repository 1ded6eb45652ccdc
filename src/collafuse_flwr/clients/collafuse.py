"""The CollaFuse client: a private denoiser for t in [1, t_zeta] that never leaves the client.

train:    train the private denoiser on the client's own images for its budget, then reply
          with one cut-point sample x_{t_zeta} per training image (and counts); with
          server-condition "full" also the uploads' raw conditions and those it will request.
evaluate: finish the server's handed-over states x_{t_zeta} with the private denoiser,
          conditioned on the requested conditions (round.py), and reply with their quality
          (evaluation.py).

The denoiser, its optimizer and EMA persist between rounds below the client's own state
directory (round.py, state.py), never at a path a message names, so a resumed round starts
from the previous round's state. The FedAvg client (fedavg.py) has the same two functions.
"""

from __future__ import annotations

import time

import torch
from flwr.app import RecordDict

from collafuse_flwr import wire
from collafuse_flwr.clients.evaluation import EvaluationRound, evaluation_reply
from collafuse_flwr.clients.round import ClientRound


def cut_point_uploads(client: ClientRound) -> torch.Tensor:
    """x_{t_zeta} = sqrt(abar_r) x0 + sqrt(1 - abar_r) eps for every training image,
    (n, C, H, W); empty when the server owns no step.

    x0 are the client's training images bounded (clamped, and clipped to clip-norm:
    privacy.bound_images), as its own denoiser learns them. eps is bound to each image: drawn
    from the client's secret "upload" stream at the image's key and the upload's view
    (`ClientRound.upload_noise`): nothing the server holds or sends determines it. "once": the
    same eps in every round and every run whose uploads are alike, so an image yields the same
    upload and the server never sees two views of it, however the folder changes around it;
    "fresh": a new eps every round. Each new view is spent in the client's privacy ledger
    first, image by image.
    """
    train_images = client.data.train
    if client.schedule.server_range.is_empty:
        return train_images[:0]
    return client.schedule.noise_to_cut(train_images, client.upload_noise())


def train(client: ClientRound, content: RecordDict) -> RecordDict:
    """Train the private denoiser on t in [1, t_zeta]; the reply with the cut-point uploads.
    The uploads are made first, so an upload the client's privacy budget refuses stops the round
    before any training. The train message carries no arrays (`content` is not read)."""
    x_cut = cut_point_uploads(client)
    denoiser = client.denoiser()
    start = time.perf_counter()
    trained = client.train(denoiser)
    metrics = {"partition-id": client.partition_id, "num-examples": int(x_cut.shape[0]), **trained,
               "train-seconds": time.perf_counter() - start}
    reply = wire.pack_uploads(x_cut, client.config.upload_dtype, metrics)
    if client.conditioning.server_receives_conditions and x_cut.shape[0]:
        reply[wire.CONDITIONS] = wire.pack_conditions(client.data.train_conditions, client.requested_conditions())
    return reply


def evaluate(client: EvaluationRound, content: RecordDict) -> RecordDict:
    """Finish the handed-over states in `content` with the private denoiser (the client's
    steps of the split sampler, conditioned on the requested conditions); the evaluation reply."""
    config = client.config
    x = wire.unpack_handover(content, client.image_shape, config.eval_num_samples)
    sampler = client.protocol.sampler(config)
    requested = client.requested_conditions()
    start = time.perf_counter()
    net = None
    if len(sampler.client_steps):
        net = client.trained_denoiser().for_sampling()
        seed = wire.config_int(client.message_config, "sample-seed", 0, 2**63 - 1)
        x = sampler.run(net, x, sampler.client_steps, seed, client.conditions(requested))
    images = x.clamp(-1, 1)
    return evaluation_reply(client, images, requested, net, len(sampler.client_steps),
                            time.perf_counter() - start)
