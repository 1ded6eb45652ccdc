"""The run configuration: every knob of `[tool.flwr.app.config]`, typed and validated.

Flower hands the app a flat dict of kebab-case keys (`t-zeta`, `num-server-rounds`, ...).
`RunConfig.from_flower` turns it into a frozen dataclass and rejects bad values with a
message that names the key, the value and what is allowed, before any training starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, fields
from typing import Any, Mapping

# Resolution used when image-size = 0: the paper's for CIFAR-10 (32), CelebA and AwA2 (64);
# the 8x8 digits are upsampled to 16.
DEFAULT_IMAGE_SIZE = {"digits": 16, "cifar10": 32, "celeba": 64, "awa2": 64}
DATASETS = tuple(DEFAULT_IMAGE_SIZE)
LABELLED_DATASETS = ("digits", "cifar10", "awa2")  # class labels: label-groups, dirichlet
ATTRIBUTE_DATASETS = ("celeba", "awa2")  # binary attributes: attribute-groups
DATASET_SPLITS = ("", "train", "valid", "test", "all")
PARTITIONS = ("label-groups", "dirichlet", "iid", "attribute-groups")
# Partition used when partition = "": classes where the dataset has them, else attributes.
DEFAULT_PARTITION = {"digits": "label-groups", "cifar10": "label-groups", "celeba": "attribute-groups",
                     "awa2": "attribute-groups"}
# collafuse: the exact protocol; published: the authors' variant (protocols.py);
# fedavg: the FedAvg baseline, full-chain client denoisers averaged by the server (t-zeta unused)
STRATEGIES = ("collafuse", "published", "fedavg")
SAMPLERS = ("ddpm", "ddim")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
NOISE_POLICIES = ("once", "fresh")
SERVER_LOSS_WEIGHTINGS = ("eps-prime", "full-chain")
UPLOAD_DTYPES = ("float16", "float32")
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
# fault-injection kinds (testing resilience): the client raises, or uploads NaNs
FAULT_KINDS = ("raise", "nan")
# Keys that cannot change what a run computes: not part of its identity (`identity_hash`)
OPERATIONAL_KEYS = ("output-dir", "resume", "wait-for-clients-seconds", "round-timeout-seconds", "server-device",
                    "client-device")


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class RunConfig:
    """All knobs of one CollaFuse run (see the README's table for their meaning)."""

    num_server_rounds: int = 4
    num_clients: int = 5
    strategy: str = "collafuse"
    dataset: str = "digits"
    data_dir: str = ""
    download: bool = True
    dataset_split: str = ""
    image_size: int = 0
    partition: str = ""
    classes_per_client: int = 2
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
    batch_size: int = 64
    client_lr: float = 3e-3
    server_lr: float = 3e-3
    client_images_per_round: int = 2048
    server_images_per_round: int = 8192
    ema_decay: float = 0.995
    server_loss_weighting: str = "eps-prime"
    noise_policy: str = "once"
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
        """Resolve image-size = 0 and partition = "" to the dataset's defaults."""
        if self.image_size == 0 and self.dataset in DEFAULT_IMAGE_SIZE:
            object.__setattr__(self, "image_size", DEFAULT_IMAGE_SIZE[self.dataset])
        if not self.partition and self.dataset in DEFAULT_PARTITION:
            object.__setattr__(self, "partition", DEFAULT_PARTITION[self.dataset])

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> "RunConfig":
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
        """`fault-injection` parsed: {(partition id, round): kind} from "client:round:kind, ..."."""
        faults = {}
        for item in filter(None, (part.strip() for part in self.fault_injection.split(","))):
            client, server_round, kind = (item.split(":") + ["", ""])[:3]
            if not (client.isdigit() and server_round.isdigit() and kind in FAULT_KINDS):
                raise ConfigError(
                    f"fault-injection={self.fault_injection!r}: {item!r} is not "
                    f"'<client>:<round>:<kind>' with kind in {', '.join(FAULT_KINDS)}"
                )
            faults[int(client), int(server_round)] = kind
        return faults

    def is_eval_round(self, server_round: int) -> bool:
        """Evaluate after every `eval-every`-th round (if > 0) and after the last one."""
        every = self.eval_every
        return server_round == self.num_server_rounds or bool(every and server_round % every == 0)

    def validate(self) -> None:
        """Raise `ConfigError` naming the key, the value and what is allowed."""
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("dataset", self.dataset, DATASETS)
        _choice("dataset-split", self.dataset_split, DATASET_SPLITS)
        _choice("partition", self.partition, PARTITIONS)
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
        _choice("sampler", self.sampler, SAMPLERS)
        _choice("beta-schedule", self.beta_schedule, BETA_SCHEDULES)
        _choice("noise-policy", self.noise_policy, NOISE_POLICIES)
        _choice("server-loss-weighting", self.server_loss_weighting, SERVER_LOSS_WEIGHTINGS)
        _choice("upload-dtype", self.upload_dtype, UPLOAD_DTYPES)
        for key in (
            "num-server-rounds",
            "num-clients",
            "image-size",
            "classes-per-client",
            "timesteps",
            "unet-layers-per-block",
            "batch-size",
            "max-uploads-per-client",
            "sampling-steps",
            "metric-classifier-epochs",
        ):
            _at_least(key, getattr(self, key.replace("-", "_")), 1)
        for key in ("client-images-per-round", "server-images-per-round", "eval-every", "seed",
                    "disclosure-num-images"):
            _at_least(key, getattr(self, key.replace("-", "_")), 0)
        for key in ("client-lr", "server-lr", "dirichlet-alpha"):
            if not getattr(self, key.replace("-", "_")) > 0:
                raise ConfigError(f"{key}={getattr(self, key.replace('-', '_'))!r}: must be > 0")
        if not 0 <= self.t_zeta <= self.timesteps:
            raise ConfigError(
                f"t-zeta={self.t_zeta}: the cut point must lie in [0, timesteps={self.timesteps}]"
            )
        if not 0 < self.held_out_fraction < 1:
            raise ConfigError(f"held-out-fraction={self.held_out_fraction}: must lie in (0, 1)")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema-decay={self.ema_decay}: must lie in [0, 1) (0 disables the EMA)")
        if not 0 <= self.ddim_eta <= 1:
            raise ConfigError(f"ddim-eta={self.ddim_eta}: must lie in [0, 1]")
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
        if not 2 <= self.eval_num_samples <= self.max_uploads_per_client:
            raise ConfigError(
                f"eval-num-samples={self.eval_num_samples}: must lie in [2, max-uploads-per-client="
                f"{self.max_uploads_per_client}] (distances need two samples; the server caps a reply)"
            )
        if 0 < self.disclosure_num_images < 2:
            raise ConfigError(
                f"disclosure-num-images={self.disclosure_num_images}: must be 0 (no attacks) or >= 2"
            )
        for key in ("wait-for-clients-seconds", "round-timeout-seconds"):
            if not getattr(self, key.replace("-", "_")) > 0:
                raise ConfigError(f"{key}={getattr(self, key.replace('-', '_'))!r}: must be > 0")
        for key in ("server-device", "client-device"):
            if not DEVICE.fullmatch(getattr(self, key.replace("-", "_"))):
                raise ConfigError(
                    f"{key}={getattr(self, key.replace('-', '_'))!r}: allowed: auto, cpu, cuda, cuda:<index>"
                )
        if not 1 <= self.min_replies <= self.num_clients:
            raise ConfigError(
                f"min-replies={self.min_replies}: must lie in [1, num-clients={self.num_clients}]"
            )
        for (client, server_round), _ in self.injected_faults.items():
            if client >= self.num_clients or not 1 <= server_round <= self.num_server_rounds:
                raise ConfigError(
                    f"fault-injection={self.fault_injection!r}: client {client} or round {server_round} "
                    f"outside [0, {self.num_clients}) x [1, {self.num_server_rounds}]"
                )

    def _parse_channels(self) -> tuple[int, ...]:
        """`block_channels`, or a `ConfigError` unless they are multiples of 8."""
        try:
            channels = self.block_channels
        except ValueError:
            channels = ()
        if not channels or min(channels) < 8 or any(c % 8 for c in channels):
            raise ConfigError(
                f"unet-block-channels={self.unet_block_channels!r}: must be comma-separated "
                "multiples of 8, e.g. '32,64,64'"
            )
        return channels


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
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key}={value!r}: must be a finite number")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key}={value!r}: must be a string (quote it: {key}='...')")
    return value


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: unknown; allowed: {', '.join(allowed)}")


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{key}={value}: must be >= {low}")
