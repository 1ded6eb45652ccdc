"""Denoisers: diffusers `UNet2DModel` eps-predictors built from the run config, on a device;
`ConditionalUNet`, the same U-Net with a condition vector added to its time embedding.

A denoiser on an accelerator keeps the interface of one on the CPU: it takes and returns CPU
tensors (hooks move the inputs to its device and the output back), so data, random
generators, losses and samplers stay on the CPU and give the same streams on every machine;
only the network's arithmetic moves."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from diffusers import UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.training_utils import EMAModel
from diffusers.utils import logging as diffusers_logging
from torch import nn

from collafuse_flwr.config import ConfigError
from collafuse_flwr.outputs import DamagedFileError, read_tensors, write_directory_atomically

DENOISER_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "optimizer.pt")  # + ema.pt with an EMA


class ConditionalUNet(UNet2DModel):
    """`UNet2DModel` conditioned on a vector c: (n, condition_dim) (diffusion/conditions.py):
    emb = time_embedding(k) + W c + b, added to every residual block like the time embedding
    (diffusers' "identity" class embedding fed by the learned projection W, b). c = 0 is the
    null condition of classifier-free guidance; `condition=None` means c = 0. A diffusers
    model: `save_pretrained` / `from_pretrained` keep `condition_dim` in config.json."""

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        out_channels: int = 3,
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        down_block_types: tuple[str, ...] = ("DownBlock2D",),
        up_block_types: tuple[str, ...] = ("UpBlock2D",),
        norm_num_groups: int = 8,
        condition_dim: int = 1,
    ):
        super().__init__(
            sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
            block_out_channels=block_out_channels, layers_per_block=layers_per_block,
            down_block_types=down_block_types, up_block_types=up_block_types, norm_num_groups=norm_num_groups,
            class_embed_type="identity",
        )
        self.condition_projection = nn.Linear(condition_dim, self.time_embedding.linear_2.out_features)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor | None = None,
                return_dict: bool = True):
        """eps(x_t: (n, C, H, W), k: (n,), c: (n, condition_dim) or None for the null condition)."""
        if condition is None:
            condition = sample.new_zeros(sample.shape[0], self.config.condition_dim)
        embedded = self.condition_projection(condition.to(self.condition_projection.weight))
        return super().forward(sample, timestep, class_labels=embedded, return_dict=return_dict)


# The classes a saved denoiser's config.json may name (nothing else is ever instantiated)
DENOISER_CLASSES = {cls.__name__: cls for cls in (UNet2DModel, ConditionalUNet)}


def build_denoiser(
    image_size: int,
    channels: int,
    block_channels: tuple[int, ...],
    layers_per_block: int = 1,
    attention: bool = False,
    seed: int = 0,
    condition_dim: int = 0,
) -> UNet2DModel:
    """A U-Net mapping (x_t: (n, C, H, W), k: (n,)) to eps: (n, C, H, W); with
    `condition_dim` > 0 a `ConditionalUNet` that also takes c: (n, condition_dim).

    One resolution level per entry of `block_channels`; with `attention` the lowest
    resolution level gets self-attention. Weights are initialised from `seed`.
    """
    levels = len(block_channels)
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    torch.manual_seed(seed)
    common = dict(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=block_channels,
        layers_per_block=layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=min(8, block_channels[0]),
    )
    if condition_dim:
        return ConditionalUNet(**common, condition_dim=condition_dim).eval()
    return UNet2DModel(**common).eval()


def resolve_device(key: str, spec: str) -> torch.device:
    """The device a `server-device` / `client-device` value names: "auto" (the first CUDA
    GPU this process sees, else the CPU), "cpu", "cuda" or "cuda:<index>"; a `ConfigError`
    naming the key if it is not available here."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"{key}={spec!r}: this process sees {torch.cuda.device_count()} CUDA device(s); "
                          "use 'auto' or 'cpu'")
    return device


def on_device(net: UNet2DModel, device: torch.device | str) -> UNet2DModel:
    """Move `net` to `device`; off the CPU, make it take and return CPU tensors (see above)."""
    net.to(device)
    if torch.device(device).type != "cpu" and not getattr(net, "_moves_io", False):
        net.register_forward_pre_hook(_inputs_to_net, with_kwargs=True)
        net.register_forward_hook(_output_to_caller)
        net._moves_io = True
    return net


def _inputs_to_net(module, args, kwargs):
    device = next(module.parameters()).device
    module._caller_device = args[0].device
    move = lambda v: v.to(device) if torch.is_tensor(v) else v
    return tuple(map(move, args)), {k: move(v) for k, v in kwargs.items()}


def _output_to_caller(module, args, output):
    output.sample = output.sample.to(module._caller_device)
    return output


class Denoiser:
    """A party's denoiser under training: the network, its AdamW optimizer and an
    exponential moving average (EMA) of its weights, which is what sampling uses.

    EMA: theta_ema <- d theta_ema + (1 - d) theta after every step, with the warm-up
    d = min(decay, (1 + n) / (10 + n)) at step n (diffusers' `EMAModel`); decay 0 disables it.
    """

    def __init__(self, net: UNet2DModel, lr: float, ema_decay: float, device: torch.device | str = "cpu"):
        self.net = on_device(net, device)
        self.optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
        self.ema = EMAModel(net.parameters(), decay=ema_decay) if ema_decay > 0 else None

    def after_step(self) -> None:
        """Update the EMA after an optimizer step."""
        if self.ema is not None:
            self.ema.step(self.net.parameters())

    def for_sampling(self) -> UNet2DModel:
        """The network with the EMA weights (a copy; the training weights stay untouched)."""
        if self.ema is None:
            return self.net.eval()
        net = copy.deepcopy(self.net).eval()
        self.ema.copy_to(net.parameters())
        return net

    def state(self) -> dict[str, torch.Tensor]:
        """The weights FedAvg exchanges: "net.<name>" for the network's state dict and, with
        an EMA, "ema.<name>" for the EMA of every parameter, averaged like the weights.

        After S steps from a common start e, client k's EMA is e prod_s d_ks + sum_s
        (1 - d_ks) prod_{s'>s} d_ks' theta_ks, linear in its steps theta_ks. So the weighted
        average of the clients' EMAs is the EMA of the averaged steps sum_k p_k theta_ks exactly
        when every client applies the same decays d_ks = d_s: the same number of steps S and the
        same EMA step count n at the start (or every count past the warm-up, n >= (10 decay - 1)
        / (1 - decay): 1,790 steps at 0.995). Otherwise it is a mean of EMAs with different
        decays (a client's first step after a count of 0 has d = 0: its EMA drops the received
        one)."""
        state = {f"net.{k}": v.detach() for k, v in self.net.state_dict().items()}
        if self.ema is not None:
            names = [name for name, _ in self.net.named_parameters()]
            state.update({f"ema.{n}": p.detach() for n, p in zip(names, self.ema.shadow_params, strict=True)})
        return state

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Set the weights (and EMA) from `state` (keys as `state()` writes them); the
        optimizer's moments and the EMA's step count stay this party's own."""
        self.net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
        if self.ema is not None:
            names = [name for name, _ in self.net.named_parameters()]
            with torch.no_grad():
                for name, shadow in zip(names, self.ema.shadow_params, strict=True):
                    shadow.copy_(state[f"ema.{name}"])

    def sampling_state(self) -> dict[str, torch.Tensor]:
        """The state dict of `for_sampling()`, keyed "net.<name>": what a sampler needs."""
        return {f"net.{k}": v.detach() for k, v in self.for_sampling().state_dict().items()}

    def save(self, directory: Path) -> None:
        """Write `directory/`: the network as a diffusers model (config.json + safetensors),
        `optimizer.pt` and, with an EMA, `ema.pt` (tensors and plain values only). Atomic and
        fsync'd (`write_directory_atomically`): a crash leaves the previous directory intact."""

        def write(tmp: Path) -> None:
            self.net.save_pretrained(tmp, safe_serialization=True)
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            if self.ema is not None:
                torch.save(self.ema.state_dict(), tmp / "ema.pt")

        write_directory_atomically(directory, write)

    @classmethod
    def load(cls, directory: Path, lr: float, ema_decay: float, device: torch.device | str = "cpu") -> Denoiser:
        """Load what `save` wrote, onto `device`, from `directory` only (never the network, never
        a pickle: safetensors and `weights_only` loads). `DamagedFileError` naming the directory
        if a file is missing, or the file that is cut off or of another format."""
        directory = Path(directory)
        needed = DENOISER_FILES + (("ema.pt",) if ema_decay > 0 else ())
        missing = [name for name in needed if not (directory / name).is_file()]
        if missing:
            raise DamagedFileError(f"{directory}: not a saved denoiser (missing {', '.join(missing)})")
        # diffusers warns that a ConditionalUNet's config holds UNet2DModel's other keys: expected
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            net = _saved_class(directory).from_pretrained(
                directory, low_cpu_mem_usage=False, local_files_only=True, use_safetensors=True,
            ).eval()
        except (OSError, RuntimeError, TypeError, ValueError) as err:  # e.g. cut-off weights, config.json not JSON
            raise DamagedFileError(f"{directory}: the network cannot be loaded ({err})") from None
        finally:
            diffusers_logging.set_verbosity(verbosity)
        denoiser = cls(net, lr, ema_decay, device)
        for name, target in (("optimizer.pt", denoiser.optimizer), ("ema.pt", denoiser.ema)):
            if target is None:
                continue
            try:
                target.load_state_dict(read_tensors(directory / name, map_location=device))
            except (AttributeError, KeyError, TypeError, ValueError) as err:  # another structure
                raise DamagedFileError(f"{directory / name}: not this denoiser's state ({err})") from None
        return denoiser

    @staticmethod
    def exists(directory: Path) -> bool:
        """Whether `directory` holds every file `save` writes for any denoiser (the EMA's aside)."""
        return all((Path(directory) / name).is_file() for name in DENOISER_FILES)


def _saved_class(directory: Path) -> type[UNet2DModel]:
    """The denoiser class a saved config.json names, if it is one of `DENOISER_CLASSES`."""
    try:
        name = json.loads((Path(directory) / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"config.json unreadable ({err})") from None
    if name not in DENOISER_CLASSES:
        raise ValueError(f"config.json names {name!r}, not one of {sorted(DENOISER_CLASSES)}")
    return DENOISER_CLASSES[name]
