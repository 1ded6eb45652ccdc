"""The uploads' differential-privacy guarantee (docs/threat-model.md, "A formal guarantee").

A client's upload of image x0 is x_r = sqrt(abar_r) B(x0) + sqrt(1 - abar_r) eps, eps ~ N(0, I)
from the client's secret stream, where B bounds the image: its pixels clamped to [-1, 1] (a
no-op for every dataset here) and, with `clip-norm` C > 0, the result scaled to L2 norm at most C,
B(x0) = x0 min(1, C / ||x0||_2). Every bounded image lies in a ball of radius

    R = C                      (clip-norm C > 0)
    R = sqrt(channels H W)     (no clipping: the corner of [-1, 1]^d),

so replacing one training image by any other moves its upload by at most Delta = 2 R sqrt(abar_r)
(image-level, replace-one adjacency) against Gaussian noise of standard deviation
sigma = sqrt(1 - abar_r): one upload is the Gaussian mechanism with noise multiplier
z = sigma / Delta = sqrt(1 - abar_r) / (2 R sqrt(abar_r)). Each distinct view of the image the
server receives is one more such mechanism (one in all under the noise policy "once", one per
round the client trains under "fresh"). K Gaussian mechanisms of multiplier z compose exactly to
one of multiplier z / sqrt(K) (Gaussian differential privacy, Dong, Roth and Su 2022), whose
epsilon at the run's `privacy-delta` is the analytic Gaussian mechanism's (Balle and Wang 2018),
as Google's dp-accounting computes it; the tests check both against its PLD accountant.

What it assumes: the noise eps is the client's secret (state.py), bound to the image and the
view (`ClientRound.upload_noise`) and never reused for another view; the client's ledger
(clients/ledger.py) counts each image's views. The adjacency is one image of one client. What
it does not cover, besides the uploads: with server-condition "full" each upload's condition,
which goes out in the clear; the train reply's counts and its train-loss (the client denoiser's
mean loss on its private images in the round); and the evaluation figures a client reports,
computed from its held-out images and from samples of its own denoiser, which it releases only
on a network it trusts and of enough images (clients/release.py).
t_zeta = 0 (sigma = 0) has no guarantee (epsilon infinite); t_zeta = T uploads nothing (epsilon 0).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from dp_accounting.gaussian_mechanism import get_epsilon_gaussian

from collafuse_flwr.diffusion.schedule import CutSchedule


@lru_cache(maxsize=16)
def alpha_bar(timesteps: int, beta_schedule: str) -> torch.Tensor:
    """abar_t for protocol times t = 0..T, shape (T + 1,), float64 (`CutSchedule.alpha_bar`)."""
    return CutSchedule(timesteps, 0, beta_schedule).alpha_bar


def bound_images(x0: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """B(x0) for images (n, C, H, W): pixels clamped to [-1, 1], then (clip_norm > 0) each image
    scaled by min(1, clip_norm / ||x0||_2); same shape and dtype."""
    x = x0.clamp(-1, 1)
    if clip_norm <= 0:
        return x
    norms = x.flatten(1).norm(dim=1).clamp_min(torch.finfo(x.dtype).tiny)
    return x * (clip_norm / norms).clamp(max=1).view(-1, *([1] * (x.dim() - 1)))


def image_radius(image_shape: tuple[int, ...], clip_norm: float) -> float:
    """R: the L2 radius of the ball every bounded image lies in (C, or sqrt(C H W) unclipped)."""
    return clip_norm if clip_norm > 0 else math.sqrt(math.prod(image_shape))


def noise_multiplier(alpha_bar_r: float, radius: float) -> float:
    """z = sqrt(1 - abar_r) / (2 R sqrt(abar_r)) of one upload (0 at abar_r = 1: no noise)."""
    return math.sqrt(max(0.0, 1.0 - alpha_bar_r)) / (2.0 * radius * math.sqrt(alpha_bar_r))


@lru_cache(maxsize=4096)
def epsilon(multiplier: float, views: int, delta: float) -> float:
    """Epsilon at `delta` of `views` Gaussian mechanisms of noise multiplier `multiplier`
    (noise sd / sensitivity) composed: the analytic Gaussian mechanism of multiplier
    multiplier / sqrt(views); 0 for no view, inf without noise."""
    if views == 0:
        return 0.0
    if multiplier == 0:
        return math.inf
    if multiplier == math.inf:
        return 0.0
    return float(get_epsilon_gaussian(multiplier / math.sqrt(views), delta))


def composed_multiplier(multipliers: list[float]) -> float:
    """The one noise multiplier of Gaussian mechanisms of `multipliers` composed (each view of
    its own noise): (sum_i z_i^-2)^(-1/2), exactly (Gaussian differential privacy); inf for none."""
    if any(z == 0 for z in multipliers):
        return 0.0
    return math.inf if not multipliers else sum(z ** -2 for z in multipliers) ** -0.5


def upload_multiplier(alpha_bar: torch.Tensor, t_zeta: int, image_shape: tuple[int, ...], clip_norm: float) -> float:
    """z of one upload at cut point `t_zeta` of images (C, H, W) clipped to `clip_norm`
    (`alpha_bar`: abar_t for t = 0..T, as `CutSchedule.alpha_bar`)."""
    return noise_multiplier(float(alpha_bar[t_zeta]), image_radius(image_shape, clip_norm))


def upload_epsilon(alpha_bar: torch.Tensor, t_zeta: int, image_shape: tuple[int, ...], clip_norm: float,
                   views: int, delta: float) -> float:
    """Epsilon at `delta` of `views` views of an image cut at `t_zeta` (`upload_multiplier`);
    0 at t_zeta = T, where nothing is uploaded."""
    if t_zeta == len(alpha_bar) - 1:
        return 0.0
    return epsilon(upload_multiplier(alpha_bar, t_zeta, image_shape, clip_norm), views, delta)


def smallest_cut_point(alpha_bar: torch.Tensor, target: float, image_shape: tuple[int, ...], clip_norm: float,
                       views: int, delta: float) -> int:
    """The smallest t_zeta whose uploads meet (target, delta) with `views` views per image
    (bisection: abar_t falls with t, so epsilon does); T when no cut point below T does."""
    low, high = 0, len(alpha_bar) - 1  # high meets the target (nothing uploaded)
    while low < high:
        middle = (low + high) // 2
        if upload_epsilon(alpha_bar, middle, image_shape, clip_norm, views, delta) <= target:
            high = middle
        else:
            low = middle + 1
    return high
