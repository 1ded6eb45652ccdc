"""The published variant beside the exact protocol: handover time, clamp, server objective."""

from __future__ import annotations

import pytest
import torch

from collafuse_flwr.config import RunConfig
from collafuse_flwr.diffusion.losses import published_server_loss
from collafuse_flwr.diffusion.models import build_denoiser
from collafuse_flwr.diffusion.protocol import Protocol
from collafuse_flwr.diffusion.sampling import initial_noise
from collafuse_flwr.diffusion.schedule import CutSchedule


@pytest.mark.parametrize("t_zeta,expected", [(0, 0), (100, 190), (200, 360), (500, 750), (1000, 1000)])
def test_published_handover_is_T_rho_2_minus_rho(t_zeta, expected):
    published = Protocol.of(RunConfig(strategy="published", t_zeta=t_zeta))
    exact = Protocol.of(RunConfig(t_zeta=t_zeta))
    assert published.handover_time == expected and exact.handover_time == t_zeta
    assert published.schedule.t_zeta == exact.schedule.t_zeta == t_zeta


def _sample(strategy: str, t_zeta: int, server, client) -> tuple[torch.Tensor, torch.Tensor]:
    """(the handed-over state, the client's samples) of a run of `strategy` on T = 100 with
    the networks `server` and `client`: the server's steps from x_T, `Protocol.hand_over`, the
    client's steps, as the strategy and the client run them."""
    config = RunConfig(strategy=strategy, t_zeta=t_zeta, timesteps=100, sampling_steps=10, clip_denoised=False)
    protocol = Protocol.of(config)
    sampler = protocol.sampler(config)
    x_T = initial_noise(16, (1, 8, 8), seed=3)
    handover = protocol.hand_over(sampler.run(server, x_T, sampler.server_steps, seed=4), sampler)
    return handover, sampler.run(client, handover, sampler.client_steps, seed=4)


@pytest.mark.parametrize("t_zeta", [0, 100])
def test_published_equals_collafuse_bit_for_bit_at_the_ends_of_the_chain(t_zeta):
    """At t_zeta = T the server runs no step and hands over pure noise x_T, at t_zeta = 0 the
    client runs none and the handed-over state is the sample: nothing crosses the cut, so the
    published variant clamps nothing (x_T has a third of its values beyond [-1, 1]) and samples
    exactly as collafuse."""
    server, client = build_denoiser(8, 1, (8, 16), seed=0), build_denoiser(8, 1, (8, 16), seed=1)
    handover, samples = _sample("published", t_zeta, server, client)
    exact_handover, exact_samples = _sample("collafuse", t_zeta, server, client)
    assert torch.equal(handover, exact_handover) and torch.equal(samples, exact_samples)
    assert handover.abs().max() > 1 and samples.abs().max() > 1  # unclamped (clip-denoised off)


def test_published_clamps_the_state_that_crosses_the_cut():
    server, client = build_denoiser(8, 1, (8, 16), seed=0), build_denoiser(8, 1, (8, 16), seed=1)
    handover, _ = _sample("published", 20, server, client)  # handed over at 36: 7 server, 3 client steps
    exact_handover, _ = _sample("collafuse", 20, server, client)
    assert handover.abs().max() == 1 and exact_handover.abs().max() > 1


def test_published_client_runs_the_steps_below_the_handover():
    config = RunConfig(strategy="published", t_zeta=200)
    sampler = Protocol.of(config).sampler(config)
    server, client = sampler.server_steps, sampler.client_steps
    assert len(client) == 18 and len(server) == 32  # grid 1000, 980, ..., 20: 18 steps start at t <= 360


def test_fedavg_is_the_full_chain_sampled_by_the_client():
    config = RunConfig(strategy="fedavg", t_zeta=200)
    protocol = Protocol.of(config)
    assert protocol.variant == "full-chain" and protocol.schedule.t_zeta == config.timesteps
    assert protocol.schedule.server_range.is_empty and len(protocol.schedule.client_range) == config.timesteps
    sampler = protocol.sampler(config)
    assert len(sampler.server_steps) == 0 and sampler.client_steps.equal(sampler.all_steps)


class Recorder(torch.nn.Module):
    def forward(self, x, k):
        self.x, self.k = x.clone(), k.clone()
        return type("Out", (), {"sample": torch.zeros_like(x)})()


def test_published_server_loss_noises_the_upload_again_with_the_full_marginal():
    schedule = CutSchedule(100, 20)
    x_r = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    net = Recorder()
    loss = published_server_loss(net, schedule, x_r, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)  # the same draws, in the same order
    t = schedule.server_range.sample(6, g)
    eps = torch.randn(x_r.shape, generator=g)
    abar = schedule.alpha_bar[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(net.x, abar.sqrt() * x_r + (1 - abar).sqrt() * eps)
    assert (net.k == t - 1).all() and (t > 20).all()
    torch.testing.assert_close(loss, eps.pow(2).mean())
