"""The disclosure attacks on cut-point uploads, on real images (the CIFAR-10 fixture)."""

from __future__ import annotations

import pytest
import torch

from collafuse_flwr.config import RunConfig
from collafuse_flwr.data import load_table
from collafuse_flwr.data.table import as_model_input
from collafuse_flwr.diffusion.models import build_denoiser
from collafuse_flwr.diffusion.schedule import CutSchedule
from collafuse_flwr.metrics import disclosure

T = 1000


@pytest.fixture(scope="module")
def images(shared_data):
    table = load_table(RunConfig(dataset="cifar10", data_dir=str(shared_data / "cifar10-mini")))
    return as_model_input(table.images[:200])


def _views(images, t_zeta: int, count: int, seed: int = 0):
    """`count` independent views at the cut, averaged as a linking attacker would."""
    schedule = CutSchedule(T, t_zeta)
    g = torch.Generator().manual_seed(seed)
    views = torch.stack([schedule.noise_to_cut(images, torch.randn(images.shape, generator=g)) for _ in range(count)])
    return schedule, views.mean(0)


def test_linkage_is_perfect_at_t_zeta_0_and_chance_at_t_zeta_T(images):
    schedule, views = _views(images, 0, 1)
    a, _ = disclosure.view_noise(schedule, 1)
    assert disclosure.linkage_top1(views, images, a) == 1.0
    schedule, views = _views(images, T, 1)
    a, _ = disclosure.view_noise(schedule, 1)
    chance = 1 / len(images)
    accuracy = disclosure.linkage_top1(views, images, a)
    assert accuracy <= 5 * chance  # 200 candidates: chance is 0.005


def test_linkage_falls_with_the_cut_and_rises_with_linked_fresh_views(images):
    accuracy = {}
    for t_zeta, count in ((300, 1), (600, 1), (600, 16)):
        schedule, views = _views(images, t_zeta, count)
        a, _ = disclosure.view_noise(schedule, count)
        accuracy[t_zeta, count] = disclosure.linkage_top1(views, images, a)
    assert accuracy[300, 1] > accuracy[600, 1]
    assert accuracy[600, 16] > accuracy[600, 1]  # `fresh`: averaging K views raises the SNR K-fold
    schedule = CutSchedule(T, 600)
    assert disclosure.effective_snr(schedule, 16) == pytest.approx(16 * disclosure.effective_snr(schedule, 1))


def test_wiener_reconstruction_degrades_with_the_cut(images):
    psnr = {}
    for t_zeta in (0, 100, 500, T):
        schedule, views = _views(images, t_zeta, 1)
        a, sigma = disclosure.view_noise(schedule, 1)
        psnr[t_zeta] = disclosure.reconstruction_scores(disclosure.wiener_estimate(views, a, sigma), images)["psnr"]
    assert psnr[0] == disclosure.PSNR_CAP  # x_0 is the image itself
    assert psnr[0] > psnr[100] > psnr[500] > psnr[T]
    # at t_zeta = T the estimate is about the per-pixel mean: no better than the mean image
    mean_image = images.mean(0, keepdim=True).expand_as(images)
    assert psnr[T] <= disclosure.reconstruction_scores(mean_image, images)["psnr"] + 0.5


def test_tweedie_uses_the_server_model_at_the_cut_and_is_exact_without_noise(images):
    net = build_denoiser(32, 3, (8, 16), seed=0)
    schedule, views = _views(images[:8], 0, 1)
    torch.testing.assert_close(disclosure.tweedie_estimate(net, schedule, views, 1), images[:8])
    schedule, views = _views(images[:8], 200, 1)
    estimate = disclosure.tweedie_estimate(net, schedule, views, 1)
    assert estimate.shape == images[:8].shape and estimate.abs().max() <= 1
