"""What every client behaviour shares: the validated round context of one message (config,
assigned partition, round, run key), the protocol, the client's data, and its denoiser on disk
below its own state directory (state.py)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DModel
from flwr.app import ConfigRecord, Context, Message

from collafuse_flwr import privacy, wire
from collafuse_flwr.clients.state import (
    RESET_LEDGER_KEY,
    ClientState,
    ClientStateError,
    holder_directory,
    node_flag,
    own_attribute_group,
    own_data_config,
    privacy_budget,
    shares_conditions,
    simulation_size,
)
from collafuse_flwr.config import RunConfig
from collafuse_flwr.data import ClientData, client_data, own_client_data, simulated_group
from collafuse_flwr.diffusion.conditions import Conditioning, run_conditioning
from collafuse_flwr.diffusion.losses import client_loss
from collafuse_flwr.diffusion.models import Denoiser, build_denoiser, on_device, resolve_device
from collafuse_flwr.diffusion.protocol import Protocol
from collafuse_flwr.diffusion.schedule import CutSchedule
from collafuse_flwr.diffusion.training import train_for_images
from collafuse_flwr.metrics.cost import train_cost
from collafuse_flwr.outputs import complete_rounds, drop_rounds_before, round_dir, write_atomically
from collafuse_flwr.seeds import public_seed

TRAINED_ROUNDS = "rounds.json"  # below the client's run directory: the rounds it trained in


@dataclass(frozen=True)
class ClientRound:
    """What a client knows when a message arrives: its validated config, the partition the
    server assigned it, the round, its private state (state.py) and privacy budget, its data
    (training images bounded as its uploads are: privacy.bound_images) and what each side of
    the cut conditions on."""

    config: RunConfig
    partition_id: int
    server_round: int
    message_config: ConfigRecord
    state: ClientState
    run_key: str
    protocol: Protocol
    data: ClientData
    conditioning: Conditioning
    group: int | None  # the client's attribute group under condition-attributes "group"
    budget: tuple[float, float] | None  # the client's own (epsilon, delta) limit on its uploads
    image_keys: tuple[str, ...]  # each training image's key (`ClientState.image_keys`), before bounding

    @property
    def schedule(self) -> CutSchedule:
        """The chain and its cut (the client owns t in [1, t_zeta])."""
        return self.protocol.schedule

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
        return round_dir(self.client_dir, server_round)

    def latest_round(self, before: int) -> int | None:
        """The newest round < `before` with a saved denoiser, or None. A round that was cut off
        and is run again (resume) starts from the state of the client's previous round (the
        round before, or an earlier one when the client was not drawn in between), never its own."""
        saved = [r for r in complete_rounds(self.client_dir, Denoiser.exists) if r < before]
        return max(saved) if saved else None

    def latest_model_dir(self, before: int) -> Path | None:
        """The newest saved denoiser of a round < `before` (`latest_round`), or None."""
        latest = self.latest_round(before)
        return None if latest is None else self.model_dir(latest)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.data.train.shape[1:])

    def seed(self, stream: str) -> int:
        """This client's seed of a secret stream in this round, keyed by the configuration's
        identity too (another configuration never reuses this one's draws)."""
        return self.state.seed(stream, self.config.identity_hash(), self.server_round)

    def upload_view(self) -> str:
        """The view this round's uploads are: everything that decides an image's upload
        x_r = sqrt(abar_r) B(x0) + sqrt(1 - abar_r) eps besides the image and its noise (T, the
        beta schedule, t_zeta, clip-norm, the upload dtype) and the round under the noise policy
        "fresh" ("once" otherwise), as JSON. Under one view an image's noise is one and the same
        (`upload_noise`), so runs that differ in anything else (seed, budgets, rounds, ...) send
        the same upload and the server learns nothing new; whatever changes the upload changes
        the noise too (one noise under two scales would give x0 away)."""
        c = self.config
        when = self.server_round if c.noise_policy == "fresh" else "once"
        return json.dumps([c.timesteps, c.beta_schedule, c.t_zeta, c.clip_norm, c.upload_dtype, when])

    def upload_noise(self) -> torch.Tensor:
        """eps (n, C, H, W) of this round's uploads, one per training image, each drawn from the
        client's secret "upload" stream at that image's key and the view (`upload_view`): bound
        to the image, not to its row, so an image keeps its noise wherever it moves in the folder
        and a new image never takes another's. First the view is spent in the client's ledger,
        image by image (`ClientState.spend`: refused beyond its privacy-budget), with noise
        multiplier z = sqrt(1 - abar_r) / (2 R sqrt(abar_r)) (privacy.py)."""
        view = self.upload_view()
        multiplier = privacy.upload_multiplier(self.schedule.alpha_bar, self.config.t_zeta, self.image_shape,
                                               self.config.clip_norm)
        self.state.spend(list(self.image_keys), self.image_shape, view, multiplier, self.budget)
        seeds = [self.state.seed("upload", key, view) for key in self.image_keys]
        noise = [torch.randn(self.image_shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds]
        return torch.stack(noise) if noise else torch.empty((0, *self.image_shape))

    @classmethod
    def from_message(cls, msg: Message, context: Context) -> ClientRound:
        """Check the server's message (round, assigned partition, run key) and set up the round.
        In simulation the partition the server assigns is the data this client plays; with
        client-data "own" the client's data is the folder its node config names, and `config`
        says so (`state.own_data_config`). Its private state is below the state root the
        client chooses (`state.holder_directory`)."""
        config = RunConfig.from_flower(context.run_config)
        if config.client_data == "own":
            config = own_data_config(config, context.node_config)
        config = config.for_federation(simulation_size(context.node_config))
        num_partitions = config.num_clients
        message_config = msg.content.config_records.get("config")
        if message_config is None:
            raise wire.UploadRejected("message without a config record")
        server_round = wire.config_int(message_config, "server-round", 1, config.num_server_rounds)
        partition_id = wire.config_int(message_config, "partition-id", 0, num_partitions - 1)
        run_key = message_config.get("run-key")
        state = ClientState(holder_directory(config, context.node_config, partition_id),
                            reset_ledger=node_flag(context.node_config, RESET_LEDGER_KEY))
        state.run_dir(run_key)  # checks the key's form
        budget = privacy_budget(context.node_config)
        if config.sends_conditions and not shares_conditions(context.node_config):
            raise ClientStateError(
                "server-condition='full' asks for this client's conditions (the label or attributes of every "
                "upload), which it does not share: set node config share-conditions=true (simulation: "
                "COLLAFUSE_SHARE_CONDITIONS=1) to allow it, or run with server-condition='client-id'"
            )
        if config.client_data == "own":
            group = own_attribute_group(config, context.node_config)
            data = own_client_data(config, group)
        else:
            group = simulated_group(config, partition_id)
            data = client_data(config, partition_id)
        keys = tuple(state.image_keys(data.train))
        data = dataclasses.replace(data, train=privacy.bound_images(data.train, config.clip_norm))
        return cls(config, partition_id, server_round, message_config, state, run_key, Protocol.of(config), data,
                   run_conditioning(config), group, budget, keys)

    @property
    def device(self) -> torch.device:
        """Where this client's denoiser computes (`client-device`)."""
        return resolve_device("client-device", self.config.client_device)

    def new_net(self) -> UNet2DModel:
        """A freshly initialised denoiser of the run's architecture for this client's images
        (conditioned on the clients' condition space, if any), on the client's device."""
        c, space = self.config, self.conditioning.client
        return on_device(build_denoiser(
            c.image_size, self.image_shape[0], c.block_channels, c.unet_layers_per_block,
            c.unet_attention, seed=c.seed + 1 + self.partition_id, condition_dim=space.size if space else 0,
        ), self.device)

    def conditions(self, raw: torch.Tensor | None) -> torch.Tensor | None:
        """Condition vectors (n, d) of the client's denoiser for raw conditions (None when it
        is unconditional)."""
        space = self.conditioning.client
        return None if space is None else space.encode(raw)

    def requested_conditions(self) -> torch.Tensor | None:
        """The raw conditions this client asks for when it samples: those of eval-num-samples of
        its held-out images, a random order of them (repeated when there are fewer) drawn with
        the public stream ("requested", partition id): the same in every round and every run
        of the seed, so runs are compared on the same requests. The indices are public, the
        conditions behind them are not. None when the clients are unconditional."""
        held = self.data.held_out_conditions
        if held is None:
            return None
        generator = torch.Generator().manual_seed(public_seed(self.config.seed, "requested", self.partition_id))
        order = torch.randperm(len(held), generator=generator)
        return held[order.repeat(-(-self.config.eval_num_samples // len(held)))[: self.config.eval_num_samples]]

    def denoiser(self) -> Denoiser:
        """This client's denoiser, optimizer and EMA as the previous round left them (from
        disk), or freshly initialised in its first round. A round it trained in before (its
        journal, `trained_rounds`) whose denoiser is gone is a `ClientStateError` naming it:
        the client does not silently start again from scratch."""
        latest = self.latest_round(before=self.server_round)
        expected = max((r for r in self.trained_rounds() if r < self.server_round), default=None)
        if expected is not None and (latest is None or latest < expected):
            raise ClientStateError(
                f"this client trained in round {expected} of run {self.run_key}, but its denoiser of that round is "
                f"missing from {self.client_dir}; restore it, or delete {self.client_dir} to train afresh")
        if latest is not None:
            return Denoiser.load(self.model_dir(latest), self.config.client_lr, self.config.ema_decay, self.device)
        return Denoiser(self.new_net(), self.config.client_lr, self.config.ema_decay, self.device)

    def trained_rounds(self) -> list[int]:
        """The rounds of this run this client saved a trained denoiser in (its journal
        `rounds.json`, kept beside the round directories); a damaged journal is a
        `ClientStateError` naming it."""
        path = self.client_dir / TRAINED_ROUNDS
        if not path.exists():
            return []
        try:
            rounds = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            rounds = None
        if not isinstance(rounds, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in rounds):
            raise ClientStateError(f"{path}: damaged journal of this client's rounds (a JSON list of round numbers); "
                                   f"delete {self.client_dir} to train this run afresh")
        return rounds

    def trained_denoiser(self) -> Denoiser:
        """The denoiser as this round's training left it (or the latest before, if this
        client's training failed this round)."""
        directory = self.latest_model_dir(before=self.server_round + 1)
        if directory is None:
            raise RuntimeError(f"client {self.partition_id} has no trained denoiser in {self.client_dir}")
        return Denoiser.load(directory, self.config.client_lr, self.config.ema_decay, self.device)

    def train(self, denoiser: Denoiser) -> dict[str, float]:
        """Train `denoiser` for `client-images-per-round` images of this client's training
        split on the client's steps t in [1, t_zeta] of the protocol's schedule (`client_loss`,
        on the images' conditions with condition-dropout; no image when the client owns no
        step), with minibatches, t, eps and the dropout from its secret
        "client-train" stream, and save it as this round's. Returns the reply's training
        metrics train-loss, images-seen and the training cost; each client behaviour adds its
        own num-examples and train-seconds."""
        schedule, dropout = self.schedule, self.conditioning.dropout
        budget = 0 if schedule.client_range.is_empty else self.config.client_images_per_round
        generator = torch.Generator().manual_seed(self.seed("client-train"))
        stats = train_for_images(
            denoiser, self.data.train, budget, self.config.batch_size,
            lambda n, x0, g, c: client_loss(n, schedule, x0, g, c, dropout), generator,
            self.conditions(self.data.train_conditions),
        )
        self.save(denoiser)
        return {
            "train-loss": float(stats["loss"]) if stats["steps"] else 0.0,
            "images-seen": int(stats["images-seen"]),
            **train_cost(denoiser.net, self.image_shape, int(stats["images-seen"])),
        }

    def save(self, denoiser: Denoiser) -> None:
        """Checkpoint the denoiser as this round's (atomically); keep this and the client's
        previous one (the server's last checkpoint may be older than this round: a resumed round
        starts from that one), drop older ones."""
        previous = self.latest_round(before=self.server_round)
        denoiser.save(self.model_dir(self.server_round))
        rounds = sorted({*self.trained_rounds(), self.server_round})
        write_atomically(self.client_dir / TRAINED_ROUNDS, json.dumps(rounds))
        drop_rounds_before(self.client_dir, self.server_round if previous is None else previous)
