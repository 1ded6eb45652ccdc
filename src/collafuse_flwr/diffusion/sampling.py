"""Samplers that run unchanged across the cut (docs/protocol.md, "Sampling across the cut").

The sampler's grid uses diffusers' "trailing" spacing, so with N steps it visits protocol
times T, T - T/N, ..., T/N (diffusers indices k = t - 1). A step whose starting protocol
time t = k + 1 is > t_zeta belongs to the server, the rest to the client: the server runs
its steps and hands over the state, the client runs the remaining ones. When t_zeta is a
grid point the handed-over state is exactly x_{t_zeta}; otherwise it is the state at the
first grid point below t_zeta. The state is never clipped; only the x0-prediction inside a
step is clipped when `clip_denoised` is set, identically on both sides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from collafuse_flwr.diffusion.conditions import guided_eps
from collafuse_flwr.diffusion.schedule import CutSchedule
from collafuse_flwr.seeds import sub_seed


def make_sampler(
    kind: str, schedule: CutSchedule, steps: int, clip_denoised: bool = True
) -> DDPMScheduler | DDIMScheduler:
    """A diffusers scheduler for `kind` ("ddpm" ancestral or "ddim") with `steps` steps."""
    common = dict(
        schedule.scheduler_config(), clip_sample=clip_denoised, timestep_spacing="trailing"
    )
    if kind == "ddpm":
        sampler = DDPMScheduler(**common)
    elif kind == "ddim":
        sampler = DDIMScheduler(**common, set_alpha_to_one=True)
    else:
        raise ValueError(f"unknown sampler {kind!r}; allowed: ddpm, ddim")
    sampler.set_timesteps(steps)
    return sampler


def split_at_cut(sampler, t_zeta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler's diffusers timesteps split into (server steps, client steps).

    A step starting at diffusers index k (protocol time k + 1) is the server's iff
    k + 1 > t_zeta. Both parts keep the descending order; either may be empty.
    """
    timesteps = sampler.timesteps
    server = timesteps[timesteps + 1 > t_zeta]
    return server, timesteps[timesteps + 1 <= t_zeta]


# Images per network call while sampling (before classifier-free guidance doubles them):
# bounds the memory of a pass over many clients' states, or over a large eval-num-samples.
MAX_SAMPLING_BATCH = 512


@torch.no_grad()
def denoise(
    net: nn.Module,
    sampler,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    seed: int | Sequence[int],
    eta: float = 0.0,
    c: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """Run the sampler's steps `timesteps` on state x: (n, C, H, W); return the new state.

    c: (n, d) the conditions (None: an unconditional network), with classifier-free guidance
    of scale `guidance_scale` (`conditions.guided_eps`). Each step's ancestral noise comes
    from the stream (seed, "sampler-step", k), so splitting a loop into two calls changes
    nothing: split sampling equals the single loop exactly.

    Several groups at once (e.g. the handovers of many clients): x stacks groups of `sizes`
    (summing to n), each with its own `seed` (a sequence, one per group). The network sees
    the whole stack in calls of at most `MAX_SAMPLING_BATCH` images; each group steps with its
    own noise stream, so a group's result equals its own call up to the float rounding of a
    differently batched network (about 1e-6 per call on CPU).
    """
    seeds, sizes = ([seed], [x.shape[0]]) if sizes is None else (list(seed), list(sizes))
    if len(seeds) != len(sizes) or sum(sizes) != x.shape[0]:
        raise ValueError(f"{len(seeds)} seeds and group sizes {sizes} for {x.shape[0]} states")
    kwargs = {"eta": eta} if isinstance(sampler, DDIMScheduler) else {}
    for k in timesteps:
        t = k.expand(x.shape[0])
        eps = torch.cat([guided_eps(net, x[i:i + MAX_SAMPLING_BATCH], t[i:i + MAX_SAMPLING_BATCH],
                                    None if c is None else c[i:i + MAX_SAMPLING_BATCH], guidance_scale)
                         for i in range(0, x.shape[0], MAX_SAMPLING_BATCH)])
        steps = []
        for group_seed, part_eps, part_x in zip(seeds, eps.split(sizes), x.split(sizes), strict=True):
            generator = torch.Generator().manual_seed(sub_seed(group_seed, "sampler-step", int(k)))
            steps.append(sampler.step(part_eps, k, part_x, generator=generator, **kwargs).prev_sample)
        x = torch.cat(steps)
    return x


def initial_noise(n: int, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """x_T ~ N(0, I) of shape (n, *shape), reproducible from `seed`."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class SplitSampler:
    """A sampler's grid split at the handover time: the server runs `server_steps` from x_T,
    the client `client_steps` from the handed-over state (diffusers indices, descending;
    either may be empty), each side with its own conditions and the same guidance scale.
    `denoise` over both in turn equals one loop over `all_steps`."""

    scheduler: DDPMScheduler | DDIMScheduler
    server_steps: torch.Tensor
    client_steps: torch.Tensor
    eta: float
    guidance_scale: float = 1.0

    @classmethod
    def build(cls, kind: str, schedule: CutSchedule, steps: int, clip_denoised: bool, eta: float,
              handover_time: int, guidance_scale: float = 1.0) -> SplitSampler:
        scheduler = make_sampler(kind, schedule, steps, clip_denoised)
        return cls(scheduler, *split_at_cut(scheduler, handover_time), eta, guidance_scale)

    @property
    def all_steps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    def run(self, net: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, seed: int,
            c: torch.Tensor | None = None) -> torch.Tensor:
        """`denoise` with this sampler: x (n, C, H, W) through `timesteps`, conditioned on
        c: (n, d) (None: unconditional)."""
        return denoise(net, self.scheduler, x, timesteps, seed, self.eta, c, self.guidance_scale)

    def run_groups(self, net: nn.Module, xs: Sequence[torch.Tensor], timesteps: torch.Tensor,
                   seeds: Sequence[int], cs: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """`run` for several groups in one batched pass: states xs[i] (n_i, C, H, W) with seed
        seeds[i] and conditions cs[i] (n_i, d) (cs None: unconditional); each result equals
        `run` of its group alone up to float rounding (`denoise`)."""
        if not xs:
            return []
        c = None if cs is None else torch.cat(list(cs))
        x = denoise(net, self.scheduler, torch.cat(list(xs)), timesteps, seeds, self.eta, c, self.guidance_scale,
                    [len(x) for x in xs])
        return list(x.split([len(x) for x in xs]))
