"""Split sampling across the cut equals the single loop with one network on both sides."""

from __future__ import annotations

import pytest
import torch

from collafuse_flwr.diffusion.models import build_denoiser
from collafuse_flwr.diffusion.sampling import denoise, initial_noise, make_sampler, split_at_cut
from collafuse_flwr.diffusion.schedule import CutSchedule


@pytest.fixture(scope="module")
def net():
    return build_denoiser(8, 1, (8, 16), seed=0)


@pytest.mark.parametrize("kind,steps", [("ddim", 10), ("ddpm", 20)])
@pytest.mark.parametrize("t_zeta", [0, 20, 35, 100])
def test_split_sampling_equals_single_loop(net, kind, steps, t_zeta):
    schedule = CutSchedule(100, t_zeta)
    sampler = make_sampler(kind, schedule, steps)
    x_T = initial_noise(4, (1, 8, 8), seed=5)
    single = denoise(net, sampler, x_T, sampler.timesteps, seed=7)
    server_steps, client_steps = split_at_cut(sampler, t_zeta)
    handover = denoise(net, sampler, x_T, server_steps, seed=7)
    split = denoise(net, sampler, handover, client_steps, seed=7)
    assert torch.equal(split, single)
    assert len(server_steps) + len(client_steps) == steps


def test_handover_happens_exactly_at_the_cut():
    schedule = CutSchedule(1000, 200)
    sampler = make_sampler("ddim", schedule, 50)
    server_steps, client_steps = split_at_cut(sampler, 200)
    # protocol times of the grid: 1000, 980, ..., 20; server starts every step above 200
    assert (server_steps + 1).tolist() == list(range(1000, 200, -20))
    assert (client_steps + 1).tolist() == list(range(200, 0, -20))
    # t_zeta between grid points: the client starts at the first grid point below it
    server_steps, client_steps = split_at_cut(sampler, 210)
    assert int(server_steps[-1]) + 1 == 220 and int(client_steps[0]) + 1 == 200


def test_ends_of_the_chain_need_no_special_case():
    sampler = make_sampler("ddim", CutSchedule(100, 0), 10)
    server_steps, client_steps = split_at_cut(sampler, 0)
    assert len(client_steps) == 0 and len(server_steps) == 10
    server_steps, client_steps = split_at_cut(sampler, 100)
    assert len(server_steps) == 0 and len(client_steps) == 10


def test_handed_over_state_is_not_clipped(net):
    """The state crossing the cut keeps values outside [-1, 1] (only x0-predictions are clipped)."""
    schedule = CutSchedule(100, 50)
    sampler = make_sampler("ddim", schedule, 10, clip_denoised=True)
    server_steps, _ = split_at_cut(sampler, 50)
    handover = denoise(net, sampler, initial_noise(16, (1, 8, 8), seed=1), server_steps, seed=1)
    assert handover.abs().max() > 1.0
