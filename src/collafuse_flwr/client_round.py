"""What every client handler shares: the validated round context, the client's denoiser on
disk, and the evaluation reply (quality distances, sampling cost, feature moments for the pooled row)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel
from flwr.app import Array, ConfigRecord, Context, Message, MetricRecord, RecordDict

from collafuse_flwr import wire
from collafuse_flwr.checkpoint import complete_rounds, drop_rounds_before
from collafuse_flwr.client_state import ClientState, state_root
from collafuse_flwr.config import ConfigError, RunConfig
from collafuse_flwr.data import ClientData, client_data, partition_key
from collafuse_flwr.metrics.cost import sampling_cost
from collafuse_flwr.metrics.distances import feature_moments, named_distances
from collafuse_flwr.metrics.features import cached_features, load_feature_networks, resolved_weights
from collafuse_flwr.models import Denoiser, build_denoiser, on_device, resolve_device
from collafuse_flwr.outputs import save_grid
from collafuse_flwr.schedule import CutSchedule


@dataclass(frozen=True)
class ClientRound:
    """What a client knows when a message arrives: its validated config, the partition the
    server assigned it, the round, its private state (client_state.py) and its data."""

    config: RunConfig
    partition_id: int
    server_round: int
    message_config: ConfigRecord
    state: ClientState
    run_key: str
    schedule: CutSchedule
    data: ClientData

    @property
    def client_dir(self) -> Path:
        """This client's directory of the run (below its own state root, never the server's)."""
        return self.state.run_dir(self.run_key)

    @property
    def samples_dir(self) -> Path:
        """Where this client saves its generated images."""
        return self.client_dir / "samples"

    def model_dir(self, server_round: int) -> Path:
        """The client's denoiser (weights, optimizer, EMA) as trained in `server_round`."""
        return self.client_dir / f"round-{server_round:03d}"

    def latest_model_dir(self, before: int) -> Path | None:
        """The newest saved denoiser of a round < `before`, or None. A round that was cut off
        and is run again (resume) starts from the previous round's state, never its own."""
        saved = [r for r in complete_rounds(self.client_dir, Denoiser.exists) if r < before]
        return self.model_dir(max(saved)) if saved else None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.data.train.shape[1:])

    def seed(self, stream: str, per_round: bool = True) -> int:
        """This client's seed of a secret stream, in this round (or the same in every round
        unless `per_round`); keyed by the configuration's identity too, so another cut point
        (say) never reuses the noise of this one."""
        return self.state.seed(stream, self.config.identity_hash(), self.server_round if per_round else "once")

    @classmethod
    def from_message(cls, msg: Message, context: Context) -> "ClientRound":
        """Check the server's message (round, assigned partition, run key) and set up the round.
        In simulation the partition the server assigns is the data this client plays; its
        private state is below the state root the client chooses (`client_state.state_root`)."""
        config = RunConfig.from_flower(context.run_config)
        num_partitions = int(context.node_config.get("num-partitions", config.num_clients))
        if num_partitions != config.num_clients:
            raise ConfigError(
                f"num-clients={config.num_clients} but the federation has {num_partitions} "
                "SuperNodes; run with --federation-config 'num-supernodes=<num-clients>'"
            )
        message_config = msg.content.config_records.get("config")
        if message_config is None:
            raise wire.UploadRejected("message without a config record")
        server_round = wire.config_int(message_config, "server-round", 1, config.num_server_rounds)
        partition_id = wire.config_int(message_config, "partition-id", 0, num_partitions - 1)
        run_key = message_config.get("run-key")
        state = ClientState(state_root(context.node_config) / f"partition-{partition_id}")
        state.run_dir(run_key)  # checks the key's form
        return cls(
            config,
            partition_id,
            server_round,
            message_config,
            state,
            run_key,
            CutSchedule(config.timesteps, config.t_zeta, config.beta_schedule),
            client_data(config, partition_id),
        )

    @property
    def device(self) -> torch.device:
        """Where this client's denoiser computes (`client-device`)."""
        return resolve_device("client-device", self.config.client_device)

    def new_net(self) -> UNet2DModel:
        """A freshly initialised denoiser of the run's architecture for this client's images,
        on the client's device."""
        c = self.config
        return on_device(build_denoiser(
            c.image_size, self.image_shape[0], c.block_channels, c.unet_layers_per_block,
            c.unet_attention, seed=c.seed + 1 + self.partition_id,
        ), self.device)

    def denoiser(self) -> Denoiser:
        """This client's denoiser, optimizer and EMA as the previous round left them (from
        disk), or freshly initialised in its first round."""
        directory = self.latest_model_dir(before=self.server_round)
        if directory is not None:
            return Denoiser.load(directory, self.config.client_lr, self.config.ema_decay, self.device)
        return Denoiser(self.new_net(), self.config.client_lr, self.config.ema_decay, self.device)

    def trained_denoiser(self) -> Denoiser:
        """The denoiser as this round's training left it (or the latest before, if this
        client's training failed this round)."""
        directory = self.latest_model_dir(before=self.server_round + 1)
        if directory is None:
            raise RuntimeError(f"client {self.partition_id} has no trained denoiser in {self.client_dir}")
        return Denoiser.load(directory, self.config.client_lr, self.config.ema_decay, self.device)

    def save(self, denoiser: Denoiser) -> None:
        """Checkpoint the denoiser as this round's (atomically); keep this and the previous
        round's (the server's last checkpoint may be the previous round's), drop older ones."""
        denoiser.save(self.model_dir(self.server_round))
        drop_rounds_before(self.client_dir, self.server_round - 1)


def with_nan_arrays(content: RecordDict) -> RecordDict:
    """`content` with every array's values replaced by NaN (fault-injection kind "nan")."""
    for record in content.array_records.values():
        for key in list(record.keys()):
            array = record[key].numpy()
            record[key] = Array(np.full(array.shape, np.nan, dtype=array.dtype))
    return content


def evaluation_reply(
    client: ClientRound, images: torch.Tensor, net: UNet2DModel | None, steps: int, sample_seconds: float
) -> RecordDict:
    """Save the client's generated `images` (n, C, H, W) in [-1, 1] as a grid and report their
    quality against the client's held-out images, and the cost of the `steps` sampling steps
    the client ran with `net` (none when `net` is None). With pooled-metrics the reply adds,
    per feature network, the mean and covariance of the held-out and of the generated images'
    features (`wire.pack_moments`): statistics of each set, never a per-image feature."""
    config, partition_id = client.config, client.partition_id
    save_grid(images, client.samples_dir / f"round-{client.server_round:03d}-client-{partition_id}.png")
    start = time.perf_counter()
    quality, moments = _quality(client, images)
    metrics = {
        "partition-id": partition_id,
        "num-generated": int(images.shape[0]),
        "num-real": int(client.data.held_out.shape[0]),
        "client-sampling-steps": steps,
        "sample-seconds": sample_seconds,
        **(sampling_cost(net, client.image_shape, len(images), steps) if net is not None
           else {"nfe-sample": 0.0, "flops-sample": 0.0}),
        **quality,
        "eval-seconds": time.perf_counter() - start,
    }
    content = RecordDict({wire.METRICS: MetricRecord(metrics)})
    if config.pooled_metrics:
        content[wire.MOMENTS] = wire.pack_moments(moments)
    return content


def _quality(client: ClientRound, images: torch.Tensor) -> tuple[dict[str, float], dict[str, tuple]]:
    """Distances between the generated images and the held-out images on every available
    feature network (the held-out features are cached), and for the pooled row the moments
    {"<network>-<real|generated>": (mean (d,), covariance (d, d))} of both sets' features."""
    config = client.config
    weights = resolved_weights(config.fid_weights, config.fcd_weights)
    networks = load_feature_networks(Path(str(client.message_config["classifier-path"])), weights)
    cache_dir = client.state.directory / ".cache" / "features"
    key = f"{partition_key(config)}:client-{client.partition_id}:held-out"
    quality, moments = {}, {}
    for network in networks:
        real = cached_features(network, client.data.held_out, cache_dir, key)
        fake = network.features(images)
        quality.update(named_distances(network.fd_name, network.kid_name, real, fake))
        for kind, features in (("real", real), ("generated", fake)):
            m = feature_moments(features)
            moments[f"{network.name}-{kind}"] = (m.mean, m.covariance)
    return quality, moments
