"""The FedAvg baseline's client: a full-chain denoiser (t in [1, T]) trained from the averaged
weights each round, and sampling all steps with the averaged EMA weights.

train:    check the received weights against this client's own model (keys, shapes, dtypes,
          finite), load them (weights and EMA; the AdamW moments and the EMA's step count stay
          on the client), train for `client-images-per-round` images on the full-chain loss
          (client_loss with the cut at T: `Protocol` "full-chain"), reply with the new weights
          and num-examples = the client's number of training images (FedAvg's averaging weight).
evaluate: load the averaged sampling weights, sample from x_T ~ N(0, I) through all steps
          with the seed the server sends (the one a CollaFuse client of this partition gets),
          conditioned on the client's requested conditions (those a CollaFuse client asks
          for), report quality and cost.
"""

from __future__ import annotations

import time

from flwr.app import MetricRecord, RecordDict

from collafuse_flwr import wire
from collafuse_flwr.clients.evaluation import EvaluationRound, evaluation_reply
from collafuse_flwr.clients.round import ClientRound
from collafuse_flwr.clients.state import ClientStateError
from collafuse_flwr.diffusion.sampling import initial_noise


def train(client: ClientRound, content: RecordDict) -> RecordDict:
    """One FedAvg training round on this client; returns the reply's content. Refused before
    any work when the client has a privacy budget: its reply is its trained weights, a release
    no ledger can account for (`ClientStateError`)."""
    if client.budget is not None:
        raise ClientStateError(
            "strategy='fedavg' sends this client's trained weights, a release its privacy ledger cannot account "
            f"for; refused under its privacy-budget of epsilon {client.budget[0]:g} (unset privacy-budget to take "
            "part in FedAvg)")
    denoiser = client.denoiser()
    received = content.array_records.get(wire.WEIGHTS)
    if received is None:
        raise wire.UploadRejected("train message without weights")
    denoiser.load_state(wire.weights_state(wire.check_weights(received, wire.pack_weights(denoiser.state()))))
    start = time.perf_counter()
    trained = client.train(denoiser)
    metrics = {"partition-id": client.partition_id, "num-examples": int(client.data.train.shape[0]), **trained,
               "train-seconds": time.perf_counter() - start}
    return RecordDict({wire.WEIGHTS: wire.pack_weights(denoiser.state()), wire.METRICS: MetricRecord(metrics)})


def evaluate(client: EvaluationRound, content: RecordDict) -> RecordDict:
    """Sample all steps with the averaged model; returns the evaluation reply's content."""
    config = client.config
    net = client.new_net()
    received = content.array_records.get(wire.WEIGHTS)
    if received is None:
        raise wire.UploadRejected("evaluate message without weights")
    reference = wire.pack_weights({f"net.{k}": v for k, v in net.state_dict().items()})
    net.load_state_dict({k[4:]: v for k, v in wire.weights_state(wire.check_weights(received, reference)).items()})
    sampler = client.protocol.sampler(config)
    seed = wire.config_int(client.message_config, "sample-seed", 0, 2**63 - 1)
    requested = client.requested_conditions()
    start = time.perf_counter()
    x = initial_noise(config.eval_num_samples, client.image_shape, seed)
    images = sampler.run(net.eval(), x, sampler.client_steps, seed, client.conditions(requested)).clamp(-1, 1)
    return evaluation_reply(client, images, requested, net, len(sampler.client_steps),
                            time.perf_counter() - start)
