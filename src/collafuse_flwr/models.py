"""Denoisers: diffusers `UNet2DModel` eps-predictors built from the run config."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DModel


def build_denoiser(
    image_size: int,
    channels: int,
    block_channels: tuple[int, ...],
    layers_per_block: int = 1,
    attention: bool = False,
    seed: int = 0,
) -> UNet2DModel:
    """A U-Net mapping (x_t: (n, C, H, W), k: (n,)) to eps: (n, C, H, W).

    One resolution level per entry of `block_channels`; with `attention` the lowest
    resolution level gets self-attention. Weights are initialised from `seed`.
    """
    levels = len(block_channels)
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=block_channels,
        layers_per_block=layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=min(8, block_channels[0]),
    ).eval()


def save_with_optimizer(
    net: UNet2DModel, optimizer: torch.optim.Optimizer, directory: Path
) -> None:
    """Write `directory/` as a diffusers model (config.json + safetensors) and the
    optimizer state, atomically: a crash leaves the previous checkpoint intact."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    net.save_pretrained(tmp, safe_serialization=True)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if directory.exists():
        old = directory.with_name(directory.name + ".old")
        directory.rename(old)
        tmp.rename(directory)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        tmp.rename(directory)


def load_with_optimizer(
    directory: Path, lr: float
) -> tuple[UNet2DModel, torch.optim.Optimizer]:
    """Load what `save_with_optimizer` wrote; the optimizer is AdamW at `lr`."""
    net = UNet2DModel.from_pretrained(directory, low_cpu_mem_usage=False).eval()
    optimizer = make_optimizer(net, lr)
    optimizer.load_state_dict(torch.load(Path(directory) / "optimizer.pt", weights_only=True))
    return net, optimizer


def make_optimizer(net: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """The optimizer every party uses: AdamW at learning rate `lr`."""
    return torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
