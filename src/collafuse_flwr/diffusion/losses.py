"""The two training objectives of the split chain (docs/protocol.md, "The split chain")."""

from __future__ import annotations

import torch
from torch import nn

from collafuse_flwr.diffusion.conditions import drop_conditions, predict
from collafuse_flwr.diffusion.schedule import CutSchedule


def client_loss(
    net: nn.Module, schedule: CutSchedule, x0: torch.Tensor, generator: torch.Generator,
    c: torch.Tensor | None = None, dropout: float = 0.0,
) -> torch.Tensor:
    """DDPM loss restricted to the client's steps t ~ U{1..r}:

        x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,   loss = || eps_c(x_t, t, c) - eps ||^2.

    x0: (n, C, H, W) clean images in [-1, 1]; c: (n, d) their conditions (None: an unconditional
    network), each replaced by the null condition with probability `dropout` (drawn after t
    and eps). Returns the scalar mean loss.
    """
    t = schedule.client_range.sample(x0.shape[0], generator)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    x_t = schedule.noise_data(x0, t, eps)
    pred = predict(net, x_t, schedule.net_timestep(t), drop_conditions(c, dropout, generator))
    return (pred - eps).pow(2).mean()


def server_loss(
    net: nn.Module,
    schedule: CutSchedule,
    x_r: torch.Tensor,
    generator: torch.Generator,
    weighting: str = "eps-prime",
    c: torch.Tensor | None = None,
    dropout: float = 0.0,
    per_image: bool = False,
) -> torch.Tensor:
    """Denoising score matching relative to the cut-point sample, t ~ U{r+1..T}:

        x_t = sqrt(abar_t / abar_r) x_r + sqrt(1 - abar_t / abar_r) eps',
        loss = w_t || c_t * net(x_t, t) - eps' ||^2,   c_t = sqrt((1 - abar_t/abar_r) / (1 - abar_t)).

    The network thus learns the full-chain eps-predictor (docs/protocol.md, "The server's training (exact)"), so it is
    an ordinary diffusers denoiser at sampling time. `weighting` picks w_t:
    "eps-prime" (w_t = 1, the unweighted eps' loss) or "full-chain" (w_t = 1 / c_t^2, the
    weighting of the full-chain loss || net - eps ||^2).

    x_r: (n, C, H, W) received cut-point samples; c, dropout: their server-side conditions, as
    in `client_loss`. Returns the scalar mean loss (`per_image`: each image's, shape (n,)).
    """
    t = schedule.server_range.sample(x_r.shape[0], generator)
    eps_prime = torch.randn(x_r.shape, generator=generator, dtype=x_r.dtype)
    x_t = schedule.noise_from_cut(x_r, t, eps_prime)
    scale = schedule.server_output_scale(t).to(x_r.dtype).view(-1, 1, 1, 1)
    pred = predict(net, x_t, schedule.net_timestep(t), drop_conditions(c, dropout, generator))
    per_sample = (scale * pred - eps_prime).pow(2).mean(dim=(1, 2, 3))
    if weighting == "full-chain":
        per_sample = per_sample / scale.view(-1).pow(2)
    elif weighting != "eps-prime":
        raise ValueError(f"unknown server loss weighting {weighting!r}")
    return per_sample if per_image else per_sample.mean()


def published_server_loss(
    net: nn.Module, schedule: CutSchedule, x_r: torch.Tensor, generator: torch.Generator,
    c: torch.Tensor | None = None, dropout: float = 0.0, per_image: bool = False,
) -> torch.Tensor:
    """The authors' server objective, for comparison only (strategy "published"): the received
    x_r is treated as clean data and noised again with the full-chain marginal,

        x_t = sqrt(abar_t) x_r + sqrt(1 - abar_t) eps',  t ~ U{r+1..T},  loss = || net(x_t, t) - eps' ||^2,

    so x_t does not have the marginal q(x_t | x0) of the chain (double noising).
    x_r: (n, C, H, W); c, dropout, per_image as in `server_loss`. Returns the scalar mean loss.
    """
    t = schedule.server_range.sample(x_r.shape[0], generator)
    eps_prime = torch.randn(x_r.shape, generator=generator, dtype=x_r.dtype)
    x_t = schedule.noise_data(x_r, t, eps_prime)
    pred = predict(net, x_t, schedule.net_timestep(t), drop_conditions(c, dropout, generator))
    squares = (pred - eps_prime).pow(2)
    return squares.mean(dim=(1, 2, 3)) if per_image else squares.mean()
