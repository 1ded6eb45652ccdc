"""What the server can learn about a client's images from its cut-point uploads
(docs/metrics.md, "Disclosure audit").

The server received, for every training image x0_i of a client, K views
v_i^(k) = a x0_i + b eps_i^(k) with a = sqrt(abar_r), b = sqrt(1 - abar_r), r = t_zeta
(K = 1 under the `once` noise policy, which re-sends one view; K = rounds under `fresh`). An
attacker who links the views of one image averages them: v_i = a x0_i + (b / sqrt(K)) eps_i,
signal-to-noise ratio SNR = K a^2 / b^2. Attacks on v (all images (n, C, H, W) in [-1, 1]):
- reconstruction: estimate x0 by Tweedie's formula with the server's own denoiser, or by the
  Wiener filter with a per-pixel Gaussian prior fitted to the uploads, or by recomputing eps
  from every seed the server can derive from what it holds (exact if the upload noise were
  derived from the run config); score by PSNR and SSIM;
- linkage: match each v_i to its source among the client's images; top-1 accuracy
  (chance 1 / n);
- membership inference on the server's denoiser: its training loss on a client's uploads
  (members) against the same loss on views of the client's held-out images made as the
  client makes uploads (non-members); ROC AUC (0.5: the loss tells nothing) and the true
  positive rate at a false positive rate of at most 1 %.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn
from torchmetrics.functional.classification import binary_auroc, binary_roc
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from collafuse_flwr.diffusion.conditions import predict
from collafuse_flwr.diffusion.schedule import CutSchedule

PSNR_CAP = 100.0  # dB: exact reconstructions (t_zeta = 0) report the cap instead of infinity
MEMBERSHIP_DRAWS = 8  # draws of (t, eps') averaged into one image's membership score
MEMBERSHIP_FPR = 0.01  # the false positive rate at which the attack's true positive rate is read


def view_noise(schedule: CutSchedule, views: int) -> tuple[float, float]:
    """(a, sigma) of the averaged view v = a x0 + sigma eps after `views` views at the cut:
    a = sqrt(abar_r), sigma = sqrt((1 - abar_r) / K)."""
    abar = float(schedule.alpha_bar[schedule.t_zeta])
    return math.sqrt(abar), math.sqrt((1 - abar) / views)


def effective_snr(schedule: CutSchedule, views: int) -> float:
    """K abar_r / (1 - abar_r): the SNR of an image's K averaged views (inf at t_zeta = 0)."""
    a, sigma = view_noise(schedule, views)
    return a * a / (sigma * sigma) if sigma > 0 else math.inf


def linkage_top1(views: torch.Tensor, candidates: torch.Tensor, a: float) -> float:
    """Top-1 accuracy of matching view i to candidate i, views (n, ...) and candidates (n, ...)
    in the same order. The match is argmin_j |v_i - a x0_j|^2, the maximum-likelihood source
    under Gaussian noise. Ties count as failures unless the true source is the unique minimum."""
    v, c = views.flatten(1).double(), a * candidates.flatten(1).double()
    distances = torch.cdist(v, c)
    own = distances.diagonal()
    wins = (distances < own[:, None]).sum(1) == 0
    unique = (distances == own[:, None]).sum(1) == 1
    return float((wins & unique).double().mean())


def wiener_estimate(views: torch.Tensor, a: float, sigma: float) -> torch.Tensor:
    """E[x0 | v] under a per-pixel Gaussian prior x0 ~ N(mu, s^2) fitted to the views
    themselves (mu = E[v] / a, s^2 = max(Var[v] - sigma^2, 0) / a^2):
    x0_hat = mu + a s^2 / (a^2 s^2 + sigma^2) (v - a mu), clamped to [-1, 1]."""
    if sigma == 0:
        return views.clamp(-1, 1)
    mu = views.mean(0) / a
    s2 = (views.var(0) - sigma**2).clamp(min=0) / a**2
    gain = a * s2 / (a**2 * s2 + sigma**2)
    return (mu + gain * (views - a * mu)).clamp(-1, 1)


@torch.no_grad()
def tweedie_estimate(
    net: nn.Module, schedule: CutSchedule, views: torch.Tensor, count: int, c: torch.Tensor | None = None
) -> torch.Tensor:
    """Tweedie's formula with the server's eps-predictor: the averaged view is rescaled to the
    marginal of the protocol time t whose SNR is closest to `effective_snr`, then
    x0_hat = (x_t - sqrt(1 - abar_t) eps(x_t, t)) / sqrt(abar_t), clamped to [-1, 1]
    (t = r for a single view; the network was trained on t > r only, so t <= r extrapolates).
    c: (n, d) the server's condition of each view, for a conditional server (None: unconditional)."""
    a, sigma = view_noise(schedule, count)
    if sigma == 0:
        return views.clamp(-1, 1)
    abar = schedule.alpha_bar[1:]
    t = int(torch.argmin((torch.log(abar / (1 - abar)) - math.log(a * a / sigma**2)).abs())) + 1
    abar_t = float(schedule.alpha_bar[t])
    x_t = views * (math.sqrt(abar_t) / a)
    k = schedule.net_timestep(torch.full((len(views),), t))
    estimates = [
        (x - math.sqrt(1 - abar_t) * predict(net, x, kk, cc)) / math.sqrt(abar_t)
        for x, kk, cc in _batches(x_t, k, c)
    ]
    return torch.cat(estimates).clamp(-1, 1)


def _batches(*rows: torch.Tensor | None, size: int = 64) -> Iterator[tuple[torch.Tensor | None, ...]]:
    """The same `size` rows of each tensor at a time (a None stays None in every batch): the
    server's network on at most `size` images per pass."""
    count = len(next(r for r in rows if r is not None))
    for start in range(0, count, size):
        yield tuple(None if r is None else r[start:start + size] for r in rows)


def recompute_estimate(
    view: torch.Tensor, upload_shape: tuple[int, ...], a: float, b: float, seeds: list[int]
) -> torch.Tensor:
    """The "recompute eps" attack on one view v = a x0 + b eps, v (m, C, H, W) being the first m
    images of an upload of shape `upload_shape` (n, C, H, W): for every candidate seed, the
    noise eps' = randn(upload_shape)[:m] it would have given and x0_hat = (v - b eps') / a.
    The right eps puts every pixel of x0_hat in [-1, 1]; a wrong one adds noise of variance
    2 b^2 / a^2. The candidate with the most pixels in [-1, 1] is the answer (clamped)."""
    best, inside = None, -1.0
    for seed in seeds:
        eps = torch.randn(upload_shape, generator=torch.Generator().manual_seed(seed))[: len(view)]
        estimate = (view.double() - b * eps.double()) / a
        share = float((estimate.abs() <= 1 + 1e-2).double().mean())
        if share > inside:
            best, inside = estimate, share
    return best.clamp(-1, 1).float()


def reconstruction_scores(estimate: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Mean per-image PSNR (dB, each capped at PSNR_CAP) and mean SSIM of estimates against the
    true images, both (n, C, H, W) in [-1, 1] (data range 2)."""
    per_image = peak_signal_noise_ratio(
        estimate.float(), truth.float(), data_range=2.0, dim=(1, 2, 3), reduction="none"
    )
    psnr = float(per_image.clamp(max=PSNR_CAP).mean())
    ssim = float(structural_similarity_index_measure(estimate.float(), truth.float(), data_range=2.0))
    return {"psnr": psnr, "ssim": ssim}


@torch.no_grad()
def membership_scores(loss, views: torch.Tensor, conditions: torch.Tensor | None, generator: torch.Generator,
                      draws: int = MEMBERSHIP_DRAWS) -> torch.Tensor:
    """The server's loss on each view x_r (n, C, H, W), float64 (n,), averaged over `draws`
    draws of t ~ U{r+1..T} and eps' from `generator`: `loss(x_r, generator, c)` is its training
    objective per image (`Protocol.server_loss(..., per_image=True)`, no condition dropout);
    conditions: (n, d) the server's condition of each view, or None. Batches of 64."""
    total = torch.zeros(len(views), dtype=torch.float64)
    for _ in range(draws):
        total += torch.cat([loss(x, generator, c).double() for x, c in _batches(views, conditions)])
    return total / draws


def membership_attack(members: torch.Tensor, others: torch.Tensor) -> dict[str, float]:
    """The loss-threshold attack: an image is called a member when the server's loss on it
    (`membership_scores`) is low. members (n,), others (m,): the losses on member and
    non-member views. Returns the ROC AUC and the true positive rate at false positive rate
    <= MEMBERSHIP_FPR (with m non-members the FPR moves in steps of 1 / m)."""
    scores = 1.0 / (1.0 + torch.cat([members, others]).clamp(min=0))  # in (0, 1], falling with the loss
    labels = torch.cat([torch.ones(len(members)), torch.zeros(len(others))]).long()
    fpr, tpr, _ = binary_roc(scores, labels)
    return {"auc": float(binary_auroc(scores, labels)), "tpr-at-1pct-fpr": float(tpr[fpr <= MEMBERSHIP_FPR].max())}
