"""Split sampling across the cut equals the single loop with one network on both sides; many
clients' states sample in one batched pass as each alone."""

from __future__ import annotations

import pytest
import torch

from collafuse_flwr.diffusion import sampling
from collafuse_flwr.diffusion.models import build_denoiser
from collafuse_flwr.diffusion.sampling import SplitSampler, denoise, initial_noise, make_sampler, split_at_cut
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


@pytest.mark.parametrize("kind,eta", [("ddim", 0.0), ("ddim", 0.5), ("ddpm", 0.0)])
@pytest.mark.parametrize("max_batch", [512, 3])
def test_groups_sampled_in_one_pass_equal_each_group_alone(kind, eta, max_batch, monkeypatch):
    """Many clients' states in one batched pass (the server's half of sampling for every
    handover): each group keeps its own x_T, seed, conditions and ancestral noise, so it ends
    where its own pass ends, up to the float rounding of a differently batched network, also
    when the network's calls cut across groups (max_batch 3); one group alone is the plain loop."""
    monkeypatch.setattr(sampling, "MAX_SAMPLING_BATCH", max_batch)
    sampler = SplitSampler.build(kind, CutSchedule(100, 40), 10, True, eta, 40, guidance_scale=2.0)
    net = build_denoiser(8, 1, (8, 16), seed=0, condition_dim=3)
    with torch.no_grad():  # an output that depends on c (the projection starts at zero)
        net.condition_projection.weight.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    xs = [initial_noise(n, (1, 8, 8), seed=n) for n in (4, 1, 5)]
    cs = [torch.eye(3)[torch.arange(len(x)) % 3] for x in xs]
    seeds = [11, 12, 13]
    batched = sampler.run_groups(net, xs, sampler.server_steps, seeds, cs)
    alone = [sampler.run(net, x, sampler.server_steps, seed, c) for x, seed, c in zip(xs, seeds, cs)]
    for group, own in zip(batched, alone, strict=True):
        assert group.shape == own.shape and torch.allclose(group, own, atol=1e-5, rtol=0)
    # the groups differ (own seeds): no group's noise or state leaked into another's
    assert not torch.allclose(batched[0][:1], batched[1], atol=1e-3)
    if max_batch >= 10:
        assert torch.equal(sampler.run_groups(net, xs[:1], sampler.server_steps, seeds[:1], cs[:1])[0], alone[0])
    with pytest.raises(ValueError, match="2 seeds and group sizes"):
        denoise(net, sampler.scheduler, torch.cat(xs), sampler.server_steps, seeds[:2], sizes=[4, 1, 5])
