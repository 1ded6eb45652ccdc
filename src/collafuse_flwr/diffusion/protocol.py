"""The protocol a strategy runs on the chain, built from the run config in one place.

Three variants, one object (`Protocol.of(config)`); nothing else reads `strategy` to decide
how the chain is cut, trained or sampled:

- "exact" (strategy "collafuse", docs/protocol.md): the chain is cut at t_zeta; the server trains
  on the sub-chain from the received x_r (`losses.server_loss`); sampling hands over at
  t_zeta; the handed-over state is never clipped.
- "published" (the authors' code, for comparison only): the same cut, but the server noises
  x_r again with the full marginal (`losses.published_server_loss`); to patch the resulting
  mismatch the client starts sampling at t_h = T rho (2 - rho), rho = t_zeta / T (e.g. 360
  for t_zeta = 200, T = 1000), and the handed-over state is clamped to [-1, 1] where it crosses
  from one party to the other (`hand_over`). At t_zeta = T (the server runs no step) and
  t_zeta = 0 (the client runs none) nothing crosses, and it samples exactly as "exact".
- "full-chain" (strategy "fedavg"): no cut, every client denoiser owns t in [1, T] and
  samples every step; t-zeta is unused.

Clients train on t <= t_zeta of `schedule` in every variant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from collafuse_flwr.config import RunConfig
from collafuse_flwr.diffusion.losses import published_server_loss, server_loss
from collafuse_flwr.diffusion.sampling import SplitSampler
from collafuse_flwr.diffusion.schedule import CutSchedule

VARIANTS = {"collafuse": "exact", "published": "published", "fedavg": "full-chain"}


@dataclass(frozen=True)
class Protocol:
    """How a run cuts, trains and samples the chain.

    Attributes:
        variant: "exact", "published" or "full-chain" (see the module docstring).
        schedule: the chain of T steps cut at t_zeta (at T for "full-chain").
        handover_time: the protocol time at which the server hands the sampling state to the
            client (t_zeta; T rho (2 - rho) for "published"; T for "full-chain").
        server_loss_weighting: the exact server loss's weighting (`losses.server_loss`).
    """

    variant: str
    schedule: CutSchedule
    handover_time: int
    server_loss_weighting: str

    @classmethod
    def of(cls, config: RunConfig) -> Protocol:
        variant = VARIANTS[config.strategy]
        T = config.timesteps
        cut = T if variant == "full-chain" else config.t_zeta
        if variant == "published":
            rho = cut / T
            handover = round(T * rho * (2 - rho))
        else:
            handover = cut
        return cls(variant, CutSchedule(T, cut, config.beta_schedule), handover, config.server_loss_weighting)

    def hand_over(self, x: torch.Tensor, sampler: SplitSampler) -> torch.Tensor:
        """The state the server sends after its steps of `sampler`, x: (n, C, H, W): x itself,
        except that the published variant clamps it to [-1, 1] where a state crosses between the
        parties (the server ran steps and the client has steps left). Where one side runs no
        step (t_zeta = T: x is the initial noise x_T; t_zeta = 0: x is the finished sample)
        nothing is clamped, so the published variant equals the exact protocol there."""
        if self.variant == "published" and len(sampler.server_steps) and len(sampler.client_steps):
            return x.clamp(-1, 1)
        return x

    def server_loss(self, net: nn.Module, x_r: torch.Tensor, generator: torch.Generator,
                    c: torch.Tensor | None = None, dropout: float = 0.0, per_image: bool = False) -> torch.Tensor:
        """The server's loss on a batch of uploads x_r: (n, C, H, W) with their server-side
        conditions c: (n, d) or None, dropped with probability `dropout`; a scalar (`per_image`:
        shape (n,))."""
        if self.variant == "published":
            return published_server_loss(net, self.schedule, x_r, generator, c, dropout, per_image)
        return server_loss(net, self.schedule, x_r, generator, self.server_loss_weighting, c, dropout, per_image)

    def sampler(self, config: RunConfig) -> SplitSampler:
        """The run's sampler (`sampler`, `sampling-steps`, `clip-denoised`, `ddim-eta`,
        `guidance-scale`) split at the handover time into the server's and the client's steps."""
        return SplitSampler.build(config.sampler, self.schedule, config.sampling_steps, config.clip_denoised,
                                  config.ddim_eta, self.handover_time, config.guidance_scale)
