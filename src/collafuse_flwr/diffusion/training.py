"""A training loop whose length is counted in images seen, not epochs (EDM-style budgets)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from collafuse_flwr.diffusion.models import Denoiser


def train_for_images(
    denoiser: Denoiser,
    data: torch.Tensor,
    num_images: int,
    batch_size: int,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Generator, torch.Tensor | None], torch.Tensor],
    generator: torch.Generator,
    conditions: torch.Tensor | None = None,
) -> dict[str, float]:
    """Train `denoiser` on random minibatches of `data` until `num_images` were seen.

    data: (N, C, H, W); conditions: (N, d) the images' condition vectors, or None. Every step
    draws min(batch_size, remaining) images (with their conditions) without replacement within
    a pass over the data and calls loss_fn(net, images, generator, conditions). Returns
    {"loss": mean loss, "images-seen": n, "steps": s}; nothing happens (loss = nan) when the
    budget or the data is empty.
    """
    net, optimizer = denoiser.net, denoiser.optimizer
    seen, steps, total = 0, 0, 0.0
    order = torch.empty(0, dtype=torch.long)
    net.train()
    while data.shape[0] and seen < num_images:
        if order.numel() == 0:
            order = torch.randperm(data.shape[0], generator=generator)
        take = min(batch_size, num_images - seen, order.numel())
        index, order = order[:take], order[take:]
        loss = loss_fn(net, data[index], generator, None if conditions is None else conditions[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        denoiser.after_step()
        seen, steps, total = seen + take, steps + 1, total + loss.item()
    net.eval()
    return {"loss": total / steps if steps else float("nan"), "images-seen": seen, "steps": steps}
