"""What each party computes: network evaluations (NFEs) and floating-point operations.

An NFE is one image through a denoiser: training costs one forward and one backward pass per
image seen, sampling one forward pass per image per sampler step. FLOPs are counted once per
network by torch's `FlopCounterMode` (matrix multiplications and convolutions, a multiply-add
counting 2) on a single image and multiplied by the NFEs; elementwise operations are not counted.
The counts of a diffusers model depend only on its architecture (its `config`) and the image
shape, so they are counted once per process for each.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def forward_flops(net: nn.Module, image_shape: tuple[int, int, int]) -> int:
    """FLOPs of one forward pass of a diffusers denoiser on one image of `image_shape`."""
    x = torch.zeros(1, *image_shape)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, torch.zeros(1, dtype=torch.long))
    return int(counter.get_total_flops())


def training_flops(net: nn.Module, image_shape: tuple[int, int, int]) -> int:
    """FLOPs of one forward and backward pass on one image (gradients of all parameters);
    the network's gradients are left as they were."""
    saved = [p.grad for p in net.parameters()]
    x = torch.zeros(1, *image_shape)
    with FlopCounterMode(display=False) as counter:
        net(x, torch.zeros(1, dtype=torch.long)).sample.square().mean().backward()
    for p, grad in zip(net.parameters(), saved):
        p.grad = grad
    return int(counter.get_total_flops())


_COUNTS: dict[tuple, int] = {}


def _counted(count: Callable[[nn.Module, tuple[int, int, int]], int], net: nn.Module,
             image_shape: tuple[int, int, int]) -> int:
    """`count(net, image_shape)`, remembered per architecture for diffusers models: their
    config without diffusers' bookkeeping entries ("_name_or_path", the directory a model was
    loaded from, differs for every loaded checkpoint of one architecture)."""
    config = getattr(net, "config", None)
    if config is None:
        return count(net, image_shape)
    architecture = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    key = (count.__name__, type(net).__name__, json.dumps(architecture, sort_keys=True, default=str),
           tuple(image_shape))
    if key not in _COUNTS:
        _COUNTS[key] = count(net, image_shape)
    return _COUNTS[key]


def sampling_cost(net: nn.Module, image_shape: tuple[int, int, int], samples: int, steps: int) -> dict[str, float]:
    """{"nfe-sample", "flops-sample"} of `steps` sampler steps on `samples` images."""
    nfe = samples * steps
    flops = float(nfe * _counted(forward_flops, net, image_shape)) if nfe else 0.0
    return {"nfe-sample": float(nfe), "flops-sample": flops}


def train_cost(net: nn.Module, image_shape: tuple[int, int, int], images_seen: int) -> dict[str, float]:
    """{"nfe-train", "flops-train"} of training on `images_seen` images."""
    flops = images_seen * _counted(training_flops, net, image_shape) if images_seen else 0
    return {"nfe-train": float(images_seen), "flops-train": float(flops)}
