"""The run configuration: every knob of `[tool.flwr.app.config]`, typed and validated.

Flower hands the app a flat dict of kebab-case keys (`t-zeta`, `num-server-rounds`, ...).
`RunConfig.from_flower` turns it into a frozen dataclass and rejects bad values with a
message that names the key, the value and what is allowed, before any training starts.
`KEYS` holds what each key takes on its own (a range or a set of choices); `RunConfig.validate`
checks it, then what relates two keys or needs parsing. The datasets' facts (names, default
image sizes and partitions, what each is labelled with) live in `collafuse_flwr.data.facts`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from collafuse_flwr import privacy
from collafuse_flwr.data.facts import (
    ATTRIBUTE_DATASETS,
    DATASET_SPLITS,
    DATASETS,
    DEFAULT_CONDITION,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_PARTITION,
    IMAGE_CHANNELS,
    LABELLED_DATASETS,
    PARTITIONS,
)

# collafuse: the exact protocol; published: the authors' variant (diffusion/protocol.py);
# fedavg: the FedAvg baseline, full-chain client denoisers averaged by the server (t-zeta unused)
STRATEGIES = ("collafuse", "published", "fedavg")
SAMPLERS = ("ddpm", "ddim")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
NOISE_POLICIES = ("once", "fresh")
SERVER_LOSS_WEIGHTINGS = ("eps-prime", "full-chain")
UPLOAD_DTYPES = ("float16", "float32")
# what the clients' denoisers condition on, and the server's (diffusion/conditions.py)
CONDITIONS = ("none", "class", "attributes", "text")
SERVER_CONDITIONS = ("none", "client-id", "full")
# Where a client's images come from: the partition the server assigns (simulation), or its
# own folder, named by its node config (a deployment; the server's data-dir then holds only
# images no client holds, for the evaluation feature network).
CLIENT_DATA = ("partition", "own")
# which attributes an attribute or text condition holds: all of the image's, or its client's group's
CONDITION_ATTRIBUTES = ("all", "group")
# torch keeps a device index in 8 bits: "cuda:128" would silently become "cuda:-128"
DEVICE = re.compile(r"auto|cpu|cuda(:(?P<index>0|[1-9][0-9]{0,2}))?")
MAX_CUDA_INDEX = 127
# fault-injection kinds (testing resilience): the client raises, or uploads NaNs
FAULT_KINDS = ("raise", "nan")
# One fault-injection entry: client and round in ASCII digits (str.isdigit would take '²')
FAULT_ENTRY = re.compile(rf"([0-9]{{1,9}}):([0-9]{{1,9}}):({'|'.join(FAULT_KINDS)})")
# unet-block-channels: at most this many resolution levels, each 8 to this many channels wide;
# image-size divisible by 2^(levels - 1) keeps the lowest level at least 1x1
MAX_UNET_LEVELS = 8
MAX_UNET_CHANNELS = 4_096
# The U-Net's parameters (`unet_parameters`): at most one billion, above the largest image
# diffusion U-Nets in use (Stable Diffusion's 860 M; the paper's 25 M). Its weights, EMA and
# AdamW moments in float32 take 16 GB per party; the widths and depth the two bounds above
# allow reach 66.7 G (8 levels of 4,096 channels, 8 layers per block).
MAX_UNET_PARAMETERS = 1_000_000_000
# eval-num-samples: generated images per client and evaluation (the usual FID takes 50,000)
MAX_EVAL_NUM_SAMPLES = 50_000
# client-lr, server-lr: in (0, MAX_LR]
MAX_LR = 1.0
# Keys whose string becomes a file-system path
PATH_KEYS = ("data-dir", "fid-weights", "fcd-weights", "text-weights", "output-dir")
# Keys that cannot change what a run computes: not part of its identity (`identity_hash`)
OPERATIONAL_KEYS = ("output-dir", "resume", "wait-for-clients-seconds", "round-timeout-seconds", "server-device",
                    "client-device")


@dataclass(frozen=True)
class Rule:
    """What one key takes on its own (a value of its field's type): a number from `low` to
    `high` (None: no bound on that side; an open end is itself excluded), or one of `choices`. `allowed` is what
    the error message says; by default it is spelled out from the bounds or the choices."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[str, ...] = ()
    allowed: str = ""

    def admits(self, value: Any) -> bool:
        """Whether `value` (already of its field's type) lies within the bounds or the choices."""
        if self.choices:
            return value in self.choices
        above = self.low is None or (value > self.low if self.open_low else value >= self.low)
        below = self.high is None or (value < self.high if self.open_high else value <= self.high)
        return above and below

    def describe(self) -> str:
        """What is allowed, e.g. "must be >= 1 and <= 1000" or "unknown; allowed: ddpm, ddim"."""
        if self.allowed:
            return self.allowed
        if self.choices:
            return f"unknown; allowed: {', '.join(self.choices)}"
        ends = [f"{'>' if self.open_low else '>='} {self.low}" if self.low is not None else "",
                f"{'<' if self.open_high else '<='} {self.high}" if self.high is not None else ""]
        return "must be " + " and ".join(end for end in ends if end)


# What every key with a range or a set of choices takes, checked by `RunConfig.validate`; the
# booleans and the free-text keys take anything of their type. The upper bounds of the integer
# keys lie far above any sane run (the paper: T = 1000, 64x64 images, 5 clients, 50 rounds) and
# keep any one value from exhausting memory or time before training starts. `seed` stays within
# Flower's signed 64-bit run-config integers; every consumer (torch's manual_seed up to
# 2^64 - 1 also as seed + 1 + partition id, numpy's SeedSequence, the derived stream seeds)
# accepts that range. Checked against other keys or the data as well: sampling-steps divides
# timesteps, classes-per-client <= the dataset's classes; t-zeta, eval-num-samples and
# min-replies are bounded by other keys only (see `validate`).
KEYS = {
    "num-server-rounds": Rule(1, 10_000),
    "num-clients": Rule(0, 1_000),  # 0: the federation's size (see `for_federation`)
    "clients-per-round": Rule(0, 1_000),  # and <= num-clients (see `validate`)
    "eval-clients": Rule(0, 1_000),  # and <= num-clients
    "strategy": Rule(choices=STRATEGIES),
    "dataset": Rule(choices=DATASETS),
    "client-data": Rule(choices=CLIENT_DATA),
    "dataset-split": Rule(choices=DATASET_SPLITS),
    "image-size": Rule(1, 1_024),
    "partition": Rule(choices=PARTITIONS),
    "classes-per-client": Rule(0, 1_000),  # 0: the fewest that give every class an owner
    "dirichlet-alpha": Rule(0, open_low=True),
    "held-out-fraction": Rule(0, 1, open_low=True, open_high=True, allowed="must lie in (0, 1)"),
    "seed": Rule(0, 2**63 - 1),
    "timesteps": Rule(1, 100_000),  # the schedule holds a few float arrays of length T
    "beta-schedule": Rule(choices=BETA_SCHEDULES),
    "unet-layers-per-block": Rule(1, 8),
    "condition": Rule(choices=CONDITIONS),
    "server-condition": Rule(choices=SERVER_CONDITIONS),
    "condition-attributes": Rule(choices=CONDITION_ATTRIBUTES),
    "condition-dropout": Rule(0, 1, open_high=True, allowed="must lie in [0, 1)"),
    "guidance-scale": Rule(0, 100),
    "batch-size": Rule(1, 4_096),
    "client-lr": Rule(0, MAX_LR, open_low=True),
    "server-lr": Rule(0, MAX_LR, open_low=True),
    "client-images-per-round": Rule(0, 10_000_000),
    "server-images-per-round": Rule(0, 10_000_000),
    "ema-decay": Rule(0, 1, open_high=True, allowed="must lie in [0, 1) (0 disables the EMA)"),
    "server-loss-weighting": Rule(choices=SERVER_LOSS_WEIGHTINGS),
    "noise-policy": Rule(choices=NOISE_POLICIES),
    "clip-norm": Rule(0, allowed="must be >= 0 (0: no clipping; the pixels' own bound applies)"),
    "privacy-delta": Rule(0, 1, open_low=True, open_high=True, allowed="must lie in (0, 1)"),
    "target-epsilon": Rule(0, allowed="must be >= 0 (0: no target)"),
    "upload-dtype": Rule(choices=UPLOAD_DTYPES),
    "max-uploads-per-client": Rule(1, 1_000_000),
    "sampler": Rule(choices=SAMPLERS),
    "sampling-steps": Rule(1, 100_000),
    "ddim-eta": Rule(0, 1, allowed="must lie in [0, 1]"),
    "eval-every": Rule(0, 10_000),
    "metric-classifier-epochs": Rule(1, 1_000),
    "disclosure-num-images": Rule(0, 10_000),  # and not 1 (see `validate`)
    "wait-for-clients-seconds": Rule(0, open_low=True),
    "round-timeout-seconds": Rule(0, open_low=True),
}


# The federation of the project's own launchers (collafuse-run, collafuse-sweep, collafuse-deploy
# and collafuse-export without --client-dir, runs in process) where num-clients is 0: the paper's
# five clients. A plain `flwr run` takes its federation's size instead (`RunConfig.for_federation`).
LAUNCHER_SUPERNODES = 5


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class RunConfig:
    """All knobs of one CollaFuse run (docs/configuration.md: their defaults, ranges and meaning)."""

    num_server_rounds: int = 4
    num_clients: int = 0
    clients_per_round: int = 0
    eval_clients: int = 0
    strategy: str = "collafuse"
    dataset: str = "digits"
    client_data: str = "partition"
    data_dir: str = ""
    download: bool = True
    dataset_split: str = ""
    image_size: int = 0
    partition: str = ""
    classes_per_client: int = 0
    dirichlet_alpha: float = 0.5
    attribute_groups: str = ""
    held_out_fraction: float = 0.2
    seed: int = 0
    timesteps: int = 1000
    t_zeta: int = 200
    beta_schedule: str = "linear"
    unet_block_channels: str = "16,32,64"
    unet_layers_per_block: int = 1
    unet_attention: bool = False
    condition: str = ""
    server_condition: str = ""
    condition_attributes: str = ""
    condition_dropout: float = 0.1
    guidance_scale: float = 1.0
    batch_size: int = 64
    client_lr: float = 3e-3
    server_lr: float = 3e-3
    client_images_per_round: int = 2048
    server_images_per_round: int = 8192
    ema_decay: float = 0.995
    server_loss_weighting: str = "eps-prime"
    noise_policy: str = "once"
    clip_norm: float = 0.0
    privacy_delta: float = 1e-5
    target_epsilon: float = 0.0
    t_zeta_from_target: bool = False
    upload_dtype: str = "float16"
    max_uploads_per_client: int = 100_000
    sampler: str = "ddim"
    sampling_steps: int = 50
    ddim_eta: float = 0.0
    clip_denoised: bool = True
    eval_every: int = 0
    eval_num_samples: int = 64
    metric_classifier_epochs: int = 15
    fid_weights: str = ""
    fcd_weights: str = ""
    text_weights: str = ""
    pooled_metrics: bool = True
    disclosure_num_images: int = 256
    output_dir: str = "results/runs"
    wait_for_clients_seconds: float = 120.0
    round_timeout_seconds: float = 3600.0
    min_replies: int = 1
    server_device: str = "auto"
    client_device: str = "auto"
    resume: bool = True
    fault_injection: str = ""

    def __post_init__(self) -> None:
        """Resolve image-size = 0, partition = "" and condition = "" to the dataset's defaults;
        server-condition = "" to client-id for conditional clients (the server learns no
        label), else none; condition-attributes = "" to the client's group under attribute
        conditions of an attribute-groups partition (the authors' prompts), else all."""
        if self.image_size == 0 and self.dataset in DEFAULT_IMAGE_SIZE:
            object.__setattr__(self, "image_size", DEFAULT_IMAGE_SIZE[self.dataset])
        if not self.partition and self.dataset in DEFAULT_PARTITION:
            object.__setattr__(self, "partition", DEFAULT_PARTITION[self.dataset])
        if not self.condition and self.dataset in DEFAULT_CONDITION:
            object.__setattr__(self, "condition", DEFAULT_CONDITION[self.dataset])
        if not self.server_condition:
            object.__setattr__(self, "server_condition", "none" if self.condition == "none" else "client-id")
        if not self.condition_attributes:
            group = self.condition in ("attributes", "text") and self.partition == "attribute-groups"
            object.__setattr__(self, "condition_attributes", "group" if group else "all")

    @property
    def train_clients(self) -> int:
        """Clients a training round addresses (`clients-per-round`, 0: all)."""
        return self.clients_per_round or self.num_clients

    @property
    def evaluated_clients(self) -> int:
        """Clients an evaluation round addresses (`eval-clients`, 0: all)."""
        return self.eval_clients or self.num_clients

    @property
    def sends_conditions(self) -> bool:
        """Whether the run asks every client for its uploads' conditions (server-condition
        "full" of a CollaFuse strategy; FedAvg sends weights only), which only clients that
        allow it send (clients/state.py, `shares_conditions`)."""
        return self.server_condition == "full" and self.strategy != "fedavg"

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's `context.run_config` (kebab-case keys); validate everything."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown run-config key(s) {unknown}; allowed keys: {sorted(known)}"
            )
        values = {}
        for key, value in run_config.items():
            field = known[key]
            values[field.name] = _coerce(key, value, type(getattr(cls(), field.name)))
        config = cls(**values)
        config.validate()
        if config.t_zeta_from_target:
            config = dataclasses.replace(config, t_zeta=config.smallest_private_cut_point())
        return config

    def to_flower(self) -> dict[str, Any]:
        """The kebab-case dict form (what Flower would pass), e.g. to write `config.json`."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    @property
    def block_channels(self) -> tuple[int, ...]:
        """`unet-block-channels` as a tuple of ints, e.g. (32, 64, 64)."""
        return tuple(int(c) for c in self.unet_block_channels.split(","))

    def identity_hash(self) -> str:
        """16 hex digits of SHA-256 over the resolved config without `OPERATIONAL_KEYS`: two
        runs with the same hash compute the same thing, so checkpoints are keyed by it."""
        identity = {k: v for k, v in self.to_flower().items() if k not in OPERATIONAL_KEYS}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def injected_faults(self) -> dict[tuple[int, int], str]:
        """`fault-injection` parsed: {(partition id, round): kind}.

        The value is "" (no faults) or comma-separated entries "<client>:<round>:<kind>", e.g.
        "1:2:raise, 2:2:nan": client and round in ASCII digits, kind in `FAULT_KINDS`. Spaces
        and tabs around an entry are ignored, none may stand inside it; an empty entry (",,",
        a trailing comma) and a second entry for the same client and round are refused.
        """
        faults: dict[tuple[int, int], str] = {}
        if not self.fault_injection:
            return faults
        for item in self.fault_injection.split(","):
            entry = item.strip(" \t")
            match = FAULT_ENTRY.fullmatch(entry)
            if not match:
                raise ConfigError(
                    f"fault-injection={self.fault_injection!r}: {entry!r} is not "
                    f"'<client>:<round>:<kind>' with client and round in ASCII digits and kind in "
                    f"{', '.join(FAULT_KINDS)} (entries separated by ',', spaces only around an entry)"
                )
            client, server_round = int(match[1]), int(match[2])
            if (client, server_round) in faults:
                raise ConfigError(
                    f"fault-injection={self.fault_injection!r}: client {client} in round {server_round} "
                    "is listed twice; one fault per client and round"
                )
            faults[client, server_round] = match[3]
        return faults

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the run's images."""
        return IMAGE_CHANNELS[self.dataset], self.image_size, self.image_size

    @property
    def max_views(self) -> int:
        """The most distinct views of one image a client uploads in this run: one under the noise
        policy "once", one per round under "fresh" (a client may be drawn in every round)."""
        return 1 if self.noise_policy == "once" else self.num_server_rounds

    def upload_epsilon(self, t_zeta: int, views: int) -> float:
        """Epsilon at privacy-delta of `views` views of an image uploaded at cut point `t_zeta`
        with this run's schedule and clipping (privacy.py)."""
        alpha_bar = privacy.alpha_bar(self.timesteps, self.beta_schedule)
        return privacy.upload_epsilon(alpha_bar, t_zeta, self.image_shape, self.clip_norm, views, self.privacy_delta)

    def smallest_private_cut_point(self) -> int:
        """The smallest t_zeta whose `max_views` uploads meet (target-epsilon, privacy-delta)."""
        alpha_bar = privacy.alpha_bar(self.timesteps, self.beta_schedule)
        return privacy.smallest_cut_point(alpha_bar, self.target_epsilon, self.image_shape, self.clip_norm,
                                          self.max_views, self.privacy_delta)

    def is_eval_round(self, server_round: int) -> bool:
        """Evaluate after every `eval-every`-th round (if > 0) and after the last one."""
        every = self.eval_every
        return server_round == self.num_server_rounds or bool(every and server_round % every == 0)

    def validate(self) -> None:
        """Raise `ConfigError` naming the key, the value and what is allowed: first what each key
        takes on its own (no NUL byte, a path that expands, its rule in `KEYS`), then what
        depends on other keys or needs parsing."""
        for key, value in self.to_flower().items():
            if isinstance(value, str) and "\0" in value:
                raise ConfigError(f"{key}={value!r}: must not contain a NUL byte")
        for key in PATH_KEYS:
            _path(key, self._value(key))
        if not self.output_dir.strip():
            raise ConfigError(f"output-dir={self.output_dir!r}: must name a directory, e.g. 'results/runs'")
        for key, rule in KEYS.items():
            value = self._value(key)
            if not rule.admits(value):
                raise ConfigError(f"{key}={value!r}: {rule.describe()}")
        if self.disclosure_num_images == 1:
            raise ConfigError(
                f"disclosure-num-images={self.disclosure_num_images}: must be 0 (no attacks) or >= 2"
            )
        if self.partition in ("label-groups", "dirichlet") and self.dataset not in LABELLED_DATASETS:
            raise ConfigError(
                f"partition={self.partition!r}: dataset={self.dataset!r} has no class labels; "
                "use partition='attribute-groups' or 'iid'"
            )
        if self.partition == "attribute-groups" and self.dataset not in ATTRIBUTE_DATASETS:
            raise ConfigError(
                f"partition='attribute-groups': dataset={self.dataset!r} has no attributes; "
                f"use it with {' or '.join(ATTRIBUTE_DATASETS)}, or partition='label-groups', "
                "'dirichlet' or 'iid'"
            )
        if self.condition == "class" and self.dataset not in LABELLED_DATASETS:
            raise ConfigError(f"condition='class': dataset={self.dataset!r} has no class labels; "
                              f"use condition='attributes' or 'none'")
        if self.condition in ("attributes", "text") and self.dataset not in ATTRIBUTE_DATASETS:
            raise ConfigError(f"condition={self.condition!r}: dataset={self.dataset!r} has no attributes; "
                              f"use it with {' or '.join(ATTRIBUTE_DATASETS)}, or condition='class' or 'none'")
        if self.condition_attributes == "group" and (self.condition not in ("attributes", "text")
                                                     or self.partition != "attribute-groups"):
            raise ConfigError("condition-attributes='group' keeps the attributes of each client's group: it needs "
                              f"condition='attributes' or 'text' and partition='attribute-groups' (got "
                              f"condition={self.condition!r}, partition={self.partition!r})")
        if self.server_condition == "full" and self.condition == "none":
            raise ConfigError("server-condition='full' sends each upload's condition, but condition='none'; "
                              "set condition='class' or 'attributes', or server-condition='client-id' or 'none'")
        if not 0 <= self.t_zeta <= self.timesteps:
            raise ConfigError(
                f"t-zeta={self.t_zeta}: the cut point must lie in [0, timesteps={self.timesteps}]"
            )
        if self.sampling_steps > self.timesteps or self.timesteps % self.sampling_steps:
            raise ConfigError(
                f"sampling-steps={self.sampling_steps}: must divide timesteps={self.timesteps} "
                "so that the sampler's grid is evenly spaced and reaches t = T"
            )
        downsampling = 2 ** (len(self._parse_channels()) - 1)
        if self.image_size % downsampling:
            raise ConfigError(
                f"image-size={self.image_size}: must be divisible by "
                f"2^(number of U-Net blocks - 1) = {downsampling}"
            )
        parameters = unet_parameters(self.image_shape[0], self._parse_channels(), self.unet_layers_per_block,
                                     self.unet_attention)
        if parameters > MAX_UNET_PARAMETERS:
            raise ConfigError(
                f"unet-block-channels={self.unet_block_channels!r}, unet-layers-per-block="
                f"{self.unet_layers_per_block}, unet-attention={str(self.unet_attention).lower()}: a U-Net of "
                f"{parameters:,} parameters; at most {MAX_UNET_PARAMETERS:,} (fewer or narrower levels, or fewer "
                "layers per block)"
            )
        if not 2 <= self.eval_num_samples <= min(self.max_uploads_per_client, MAX_EVAL_NUM_SAMPLES):
            raise ConfigError(
                f"eval-num-samples={self.eval_num_samples}: must lie in [2, max-uploads-per-client="
                f"{self.max_uploads_per_client}] and be <= {MAX_EVAL_NUM_SAMPLES} (distances need two "
                "samples; the server caps a reply)"
            )
        for key in ("server-device", "client-device"):
            match = DEVICE.fullmatch(self._value(key))
            if not match or int(match["index"] or 0) > MAX_CUDA_INDEX:
                raise ConfigError(
                    f"{key}={self._value(key)!r}: allowed: auto, cpu, cuda, cuda:<index> "
                    f"(index in [0, {MAX_CUDA_INDEX}], ASCII digits, no leading zeros)"
                )
        self._validate_privacy()
        clients = self.num_clients or None  # 0: not known before the federation (`for_federation`)
        for client, server_round in self.injected_faults:
            if (clients and client >= clients) or not 1 <= server_round <= self.num_server_rounds:
                raise ConfigError(
                    f"fault-injection={self.fault_injection!r}: client {client} or round {server_round} "
                    f"outside [0, {clients or 'num-clients'}) x [1, {self.num_server_rounds}]"
                )
        if clients:
            self._validate_clients()

    def _validate_clients(self) -> None:
        """What depends on the number of clients, once it is known."""
        for key in ("clients-per-round", "eval-clients"):
            if self._value(key) > self.num_clients:
                raise ConfigError(f"{key}={self._value(key)}: must lie in [0, num-clients={self.num_clients}] "
                                  "(0: every client)")
        fewest = min(self.train_clients, self.evaluated_clients)
        if not 1 <= self.min_replies <= fewest:
            raise ConfigError(
                f"min-replies={self.min_replies}: must lie in [1, {fewest}], the fewest clients a phase "
                f"addresses (num-clients={self.num_clients}, clients-per-round={self.clients_per_round}, "
                f"eval-clients={self.eval_clients})"
            )

    def for_launchers(self) -> RunConfig:
        """This config as the project's own launchers run it: num-clients 0 becomes their
        federation's `LAUNCHER_SUPERNODES`; a set num-clients stays."""
        return self if self.num_clients else self.for_federation(LAUNCHER_SUPERNODES)

    def for_federation(self, supernodes: int | None) -> RunConfig:
        """This config in a federation of `supernodes` SuperNodes: the `num-partitions` of a
        simulation's SuperNodes, None where the SuperNodes do not say (a deployment).
        num-clients = 0 becomes `supernodes`; a num-clients the federation cannot meet, or a 0
        no federation resolves, is a `ConfigError` of one line naming the fix."""
        if self.num_clients == 0:
            if supernodes is None:
                raise ConfigError(
                    "num-clients=0 takes the number of clients from a simulation federation, and these "
                    "SuperNodes give none (no num-partitions in their node config): set num-clients to "
                    "the number of SuperNodes, e.g. --run-config 'num-clients=2'"
                )
            config = dataclasses.replace(self, num_clients=supernodes)
            config.validate()
            return config
        if supernodes is not None and supernodes != self.num_clients:
            raise ConfigError(
                f"num-clients={self.num_clients} but the federation has {supernodes} SuperNode(s): run "
                f"with --federation-config 'num-supernodes={self.num_clients}', or leave num-clients at 0 "
                "to take the federation's"
            )
        return self

    def _validate_privacy(self) -> None:
        """clip-norm and target-epsilon bound what CollaFuse's uploads disclose (privacy.py):
        FedAvg sends weights, which they do not cover. A target must be met by the configured
        t-zeta, or (t-zeta-from-target) by some cut point below T."""
        if self.strategy == "fedavg" and (self.clip_norm or self.target_epsilon or self.t_zeta_from_target):
            raise ConfigError("clip-norm, target-epsilon and t-zeta-from-target bound what the cut-point uploads "
                              "disclose; strategy='fedavg' sends weights instead, which they do not cover")
        if self.t_zeta_from_target and not self.target_epsilon:
            raise ConfigError("t-zeta-from-target=true picks the smallest cut point that meets target-epsilon, "
                              "but target-epsilon=0 (no target); set target-epsilon")
        if not self.target_epsilon:
            return
        guarantee = (f"with clip-norm={self.clip_norm}, noise-policy={self.noise_policy!r} "
                     f"({self.max_views} view(s) per image) and privacy-delta={self.privacy_delta}")
        smallest = self.smallest_private_cut_point()
        if smallest == self.timesteps:
            remedies = ["lower clip-norm" if self.clip_norm else "set clip-norm (below the pixels' own bound)",
                        *(["use noise-policy='once'"] if self.noise_policy == "fresh" else []), "raise target-epsilon"]
            raise ConfigError(
                f"target-epsilon={self.target_epsilon}: no cut point below timesteps={self.timesteps} meets it "
                f"{guarantee} (t-zeta={self.timesteps - 1} gives epsilon "
                f"{self.upload_epsilon(self.timesteps - 1, self.max_views):.3g}); {', '.join(remedies)}, or run "
                f"t-zeta={self.timesteps} (every client alone) without a target")
        if not self.t_zeta_from_target and self.t_zeta < smallest:
            raise ConfigError(
                f"target-epsilon={self.target_epsilon}: t-zeta={self.t_zeta} gives epsilon "
                f"{self.upload_epsilon(self.t_zeta, self.max_views):.3g} {guarantee}; the smallest cut point that "
                f"meets the target is t-zeta={smallest} (or set t-zeta-from-target=true)")

    def _value(self, key: str) -> Any:
        """The value of kebab-case `key`."""
        return getattr(self, key.replace("-", "_"))

    def _parse_channels(self) -> tuple[int, ...]:
        """`block_channels`, or a `ConfigError` unless they are 1 to `MAX_UNET_LEVELS`
        comma-separated multiples of 8 in [8, `MAX_UNET_CHANNELS`] (ASCII digits, spaces
        allowed around each)."""
        parts = self.unet_block_channels.split(",")
        digits = len(parts) <= MAX_UNET_LEVELS and all(re.fullmatch(r" *[0-9]{1,9} *", p) for p in parts)
        channels = self.block_channels if digits else ()
        if not channels or not all(8 <= c <= MAX_UNET_CHANNELS and c % 8 == 0 for c in channels):
            raise ConfigError(
                f"unet-block-channels={self.unet_block_channels!r}: must be 1 to {MAX_UNET_LEVELS} "
                f"comma-separated multiples of 8 in [8, {MAX_UNET_CHANNELS}], one width per resolution "
                "level, e.g. '32,64,64'"
            )
        return channels


# Lowest and highest value of every integer key in `KEYS` (its field's default is an int)
INT_RANGES = {key: (rule.low, rule.high) for key, rule in KEYS.items() if type(RunConfig()._value(key)) is int}


def unet_parameters(channels: int, block_channels: tuple[int, ...], layers_per_block: int, attention: bool) -> int:
    """The parameters of the U-Net `diffusion.models.build_denoiser` builds (diffusers'
    `UNet2DModel`; a `ConditionalUNet` adds its condition projection, (condition_dim + 1) 4 c_1),
    in closed form, without building it. With c_1..c_n the level widths, L layers per block,
    E = 4 c_1 the time embedding's width and C the image channels:

        conv(i, o) = 9 i o + o                                    (3x3 convolution)
        res(i, o)  = 2 i + conv(i, o) + (E + 1) o + 2 o + conv(o, o) + [i != o] (i o + o)
                     (GroupNorm, conv, time projection, GroupNorm, conv, 1x1 shortcut)
        attn(c)    = 2 c + 4 (c^2 + c)                            (GroupNorm, q, k, v, out)
        total = conv(C, c_1) + (c_1 E + E) + (E^2 + E)            (input, time embedding)
              + sum_k [res(c_{k-1}, c_k) + (L - 1) res(c_k, c_k)] + sum_{k<n} conv(c_k, c_k)   (down, c_0 = c_1)
              + 2 res(c_n, c_n) + attn(c_n)                        (middle)
              + sum_k sum_{j=0..L} res(p_kj + s_kj, w_k) + sum_{k<n} conv(w_k, w_k)             (up)
              + [attention] (2 L + 1) attn(c_n) + 2 c_1 + conv(c_1, C)   (attention at c_n, output)

    where the up path runs over w_1..w_n = c_n..c_1 with p_k0 = w_{k-1} (w_0 = c_n), p_kj = w_k
    for j > 0 and skips s_kj = w_k for j < L, s_kL = w_{min(k+1, n)}. `test_config_limits.py`
    checks it against diffusers' count."""
    embedding = 4 * block_channels[0]

    def conv(i: int, o: int) -> int:
        return 9 * i * o + o

    def res(i: int, o: int) -> int:
        return 2 * i + conv(i, o) + (embedding + 3) * o + conv(o, o) + (i * o + o if i != o else 0)

    def attn(c: int) -> int:
        return 4 * c * c + 6 * c

    levels, last = len(block_channels), block_channels[-1]
    total = conv(channels, block_channels[0]) + (block_channels[0] + 1) * embedding + (embedding + 1) * embedding
    previous = block_channels[0]
    for level, width in enumerate(block_channels):
        total += res(previous, width) + (layers_per_block - 1) * res(width, width)
        total += conv(width, width) if level < levels - 1 else 0
        previous = width
    total += 2 * res(last, last) + attn(last) + attention * (2 * layers_per_block + 1) * attn(last)
    widths = block_channels[::-1]
    previous = widths[0]
    for level, width in enumerate(widths):
        skip_last = widths[min(level + 1, levels - 1)]
        for layer in range(layers_per_block + 1):
            incoming = previous if layer == 0 else width
            total += res(incoming + (skip_last if layer == layers_per_block else width), width)
        total += conv(width, width) if level < levels - 1 else 0
        previous = width
    return total + 2 * block_channels[0] + conv(block_channels[0], channels)


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Convert a TOML/CLI value to the field's type, or raise a `ConfigError`."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: must be true or false")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}={value!r}: must be an integer")
        return value
    if kind is float:
        try:
            number = math.nan if isinstance(value, bool) or not isinstance(value, (int, float)) else float(value)
        except OverflowError:  # an integer beyond the float range
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key}={value!r}: must be a finite number")
        return number
    if not isinstance(value, str):
        raise ConfigError(f"{key}={value!r}: must be a string (quote it: {key}='...')")
    return value


def _path(key: str, value: str) -> None:
    """A path key's `~` or `~user` must expand (the user exists on this machine)."""
    try:
        Path(value).expanduser()
    except RuntimeError:
        raise ConfigError(f"{key}={value!r}: its '~' names no user's home directory here") from None
