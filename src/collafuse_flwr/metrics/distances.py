"""Distances between two sets of image features: Fréchet distance and KID.

Both are torchmetrics' implementations fed with features computed beforehand, so one feature
pass serves a per-client row, the pooled row and any number of rounds (the real images'
features are cached, see `features.py`).

    FD  = |mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^{1/2})          (Heusel et al. 2017)
    KID = unbiased MMD^2, kernel k(x, y) = (x.y / d + 1)^3, mean and std over 50 subsets of
          min(n_real, n_fake) samples                                  (Binkowski et al. 2018)

FD needs only each set's `Moments` (count, mean, covariance), and the moments of a union of
sets follow exactly from those of its parts (`pooled_moments`): that is how the pooled row is
computed from what the clients send, without any image's features leaving its client. KID
needs every feature vector, so it is computed per client only.

Both are biased estimates at small sample sizes (FD strongly upward below a few thousand
samples; KID is unbiased in the mean but noisy): compare numbers only at equal sample counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchmetrics.image.fid import _compute_fid
from torchmetrics.image.kid import KernelInceptionDistance

KID_SUBSETS = 50


@dataclass(frozen=True)
class Moments:
    """The first two moments of `count` feature vectors of size d: `mean` (d,) and
    `covariance` (d, d), normalised by count - 1 (as torchmetrics' FID), float64."""

    count: int
    mean: torch.Tensor
    covariance: torch.Tensor


def feature_moments(features: torch.Tensor) -> Moments:
    """The `Moments` of features (n, d), n >= 2; the covariance is exactly symmetric."""
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"moments need features (n, d) with n >= 2; got {tuple(features.shape)}")
    x = features.double()
    covariance = torch.cov(x.T, correction=1).reshape(x.shape[1], x.shape[1])
    return Moments(len(x), x.mean(0), (covariance + covariance.T) / 2)


def pooled_moments(parts: list[Moments], cap: int | None = None) -> Moments:
    """The moments of the union of the sets behind `parts` (c = 1..K), exactly:

        n  = sum_c n_c,    mu = sum_c n_c mu_c / n,
        S  = [ sum_c (n_c - 1) S_c  +  sum_c n_c (mu_c - mu)(mu_c - mu)^T ] / (n - 1)
               (within-set scatter)     (between-set scatter)

    With a `cap`, each count n_c is taken as min(n_c, cap) (cap >= 2): the union as if no set
    had more than `cap` members, so no part weighs more than cap / (cap + the others' counts).
    """
    counts = [p.count if cap is None else min(p.count, cap) for p in parts]
    n = sum(counts)
    mean = sum(c * p.mean for c, p in zip(counts, parts)) / n
    scatter = sum((c - 1) * p.covariance + c * torch.outer(p.mean - mean, p.mean - mean) for c, p in zip(counts, parts))
    return Moments(n, mean, scatter / (n - 1))


def frechet_distance(real: Moments, fake: Moments) -> float:
    """FD between the Gaussians of two sets' moments (torchmetrics' `_compute_fid`, the
    formula above). FD is a squared distance: round-off below 0 is reported as 0."""
    return max(float(_compute_fid(real.mean, real.covariance, fake.mean, fake.covariance)), 0.0)


class _Given(nn.Module):
    """Passes precomputed features (n, d) through unchanged, so torchmetrics' metrics accept
    them in place of images."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def feature_distances(real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    """{"fd", "kid", "kid_std"} between real features (n_r, d) and generated features (n_f, d).

    KID's subsets are drawn from a fixed seed (torchmetrics uses the global generator, which
    is restored afterwards), so equal inputs give equal numbers. Needs n_r, n_f >= 2.
    """
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (n, d) with equal d; got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) < 2:
        raise ValueError(f"need at least 2 real and 2 generated samples, got {len(real)} and {len(fake)}")
    kid = KernelInceptionDistance(
        feature=_Given(real.shape[1]), subsets=KID_SUBSETS, subset_size=min(len(real), len(fake))
    )
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        kid.update(real.double(), real=True)
        kid.update(fake.double(), real=False)
        kid_mean, kid_std = kid.compute()
    fd = frechet_distance(feature_moments(real), feature_moments(fake))
    return {"fd": fd, "kid": float(kid_mean), "kid_std": float(kid_std)}


def named_distances(fd_name: str, kid_name: str, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    """`feature_distances` under a feature network's metric names, e.g. {"fid", "kid", "kid_std"}."""
    d = feature_distances(real, fake)
    return {fd_name: d["fd"], kid_name: d["kid"], f"{kid_name}_std": d["kid_std"]}
