"""The diffusion chain of T steps and its cut at `t_zeta` (docs/protocol.md, "The split chain").

Time convention. Protocol time t runs over 0..T with abar_0 = 1 (clean data) and
abar_t = prod_{s<=t} (1 - beta_s). diffusers indexes the same chain by k = t - 1 in 0..T-1
(`scheduler.alphas_cumprod[k] == abar_{k+1}`), so a network is always called with
`net(x_t, t - 1)`: every denoiser here is a standard diffusers eps-predictor.

With r = t_zeta:
- the client owns t in [1, r] and uploads x_r = sqrt(abar_r) x0 + sqrt(1 - abar_r) eps;
- the server owns t in (r, T] and noises a received x_r along the sub-chain
  x_t = sqrt(abar_t / abar_r) x_r + sqrt(1 - abar_t / abar_r) eps'.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler


class TimestepRange:
    """Uniform sampler of protocol timesteps t in [low, high] (empty when low > high)."""

    def __init__(self, low: int, high: int):
        self.low, self.high = low, high

    @property
    def is_empty(self) -> bool:
        return self.low > self.high

    def __len__(self) -> int:
        return max(0, self.high - self.low + 1)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Draw n timesteps, shape (n,), dtype int64, uniformly from [low, high]."""
        if self.is_empty:
            raise ValueError(f"cannot sample from the empty timestep range [{self.low}, {self.high}]")
        return torch.randint(self.low, self.high + 1, (n,), generator=generator)


class CutSchedule:
    """A DDPM noise schedule of `num_timesteps` steps cut at `t_zeta`.

    Args:
        num_timesteps: T, the length of the chain.
        t_zeta: the cut point r, 0 <= r <= T.
        beta_schedule: a diffusers beta schedule name ("linear", ...).
    """

    def __init__(self, num_timesteps: int, t_zeta: int, beta_schedule: str = "linear"):
        if not 0 <= t_zeta <= num_timesteps:
            raise ValueError(f"t_zeta={t_zeta} must lie in [0, T={num_timesteps}]")
        self.num_timesteps = num_timesteps
        self.t_zeta = t_zeta
        self.beta_schedule = beta_schedule
        ddpm = DDPMScheduler(num_train_timesteps=num_timesteps, beta_schedule=beta_schedule)
        # abar[t] for protocol time t = 0..T, float64 for the ratios near the cut.
        self.alpha_bar = torch.cat(
            [torch.ones(1, dtype=torch.float64), ddpm.alphas_cumprod.to(torch.float64)]
        )
        self.client_range = TimestepRange(1, t_zeta)
        self.server_range = TimestepRange(t_zeta + 1, num_timesteps)

    def scheduler_config(self) -> dict:
        """The kwargs that rebuild this schedule as a diffusers scheduler."""
        return {"num_train_timesteps": self.num_timesteps, "beta_schedule": self.beta_schedule}

    @staticmethod
    def net_timestep(t: torch.Tensor) -> torch.Tensor:
        """The diffusers timestep index k = t - 1 a network is conditioned on."""
        return t - 1

    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """abar_t broadcast to `like`'s (n, C, H, W) shape and dtype."""
        return self.alpha_bar[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def noise_data(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Full-chain marginal q(x_t | x0): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.

        x0, eps: (n, C, H, W); t: (n,) protocol times in [0, T].
        """
        abar = self._abar(t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * eps

    def noise_to_cut(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The client's upload x_r = sqrt(abar_r) x0 + sqrt(1 - abar_r) eps, shape of x0."""
        t = torch.full((x0.shape[0],), self.t_zeta, dtype=torch.long)
        return self.noise_data(x0, t, eps)

    def noise_from_cut(self, x_r: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Sub-chain marginal q(x_t | x_r), t > r:
        x_t = sqrt(abar_t / abar_r) x_r + sqrt(1 - abar_t / abar_r) eps'.
        """
        ratio = self._abar(t, x_r) / float(self.alpha_bar[self.t_zeta])
        return ratio.sqrt() * x_r + (1 - ratio).sqrt() * eps

    def server_output_scale(self, t: torch.Tensor) -> torch.Tensor:
        """c_t = sqrt((1 - abar_t / abar_r) / (1 - abar_t)), shape (n,), float64, for t > r.

        The optimal eps'-predictor is c_t times the optimal full-chain predictor:
        eps_full(x_t, t) = eps_s(x_t, t) / c_t (docs/protocol.md: the denoising score-matching identity).
        The server's network outputs eps_full, so its training loss compares c_t * net to eps'.
        """
        abar_t = self.alpha_bar[t]
        return ((1 - abar_t / self.alpha_bar[self.t_zeta]) / (1 - abar_t)).sqrt()
