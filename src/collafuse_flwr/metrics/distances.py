"""Distances between two sets of image features: Fréchet distance and KID.

Both are torchmetrics' implementations (`FrechetInceptionDistance`, `KernelInceptionDistance`)
fed with features computed beforehand, so one feature pass serves a per-client row, the pooled
row and any number of rounds (the real images' features are cached, see `features.py`).

    FD  = |mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^{1/2})          (Heusel et al. 2017)
    KID = unbiased MMD^2, kernel k(x, y) = (x.y / d + 1)^3, mean and std over 50 subsets of
          min(n_real, n_fake) samples                                  (Binkowski et al. 2018)

Both are biased estimates at small sample sizes (FD strongly upward below a few thousand
samples; KID is unbiased in the mean but noisy): compare numbers only at equal sample counts.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

KID_SUBSETS = 50


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
    given = _Given(real.shape[1])
    fid = FrechetInceptionDistance(feature=given)
    kid = KernelInceptionDistance(feature=given, subsets=KID_SUBSETS, subset_size=min(len(real), len(fake)))
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        for metric in (fid, kid):
            metric.update(real.double(), real=True)
            metric.update(fake.double(), real=False)
        kid_mean, kid_std = kid.compute()
        return {"fd": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}


def named_distances(fd_name: str, kid_name: str, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    """`feature_distances` under a feature network's metric names, e.g. {"fid", "kid", "kid_std"}."""
    d = feature_distances(real, fake)
    return {fd_name: d["fd"], kid_name: d["kid"], f"{kid_name}_std": d["kid_std"]}
