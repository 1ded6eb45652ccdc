"""The published variant beside the exact protocol: handover time, clamp, server objective."""

from __future__ import annotations

import pytest
import torch

from collafuse_flwr.config import RunConfig
from collafuse_flwr.losses import published_server_loss
from collafuse_flwr.protocols import clamps_handover, handover_time
from collafuse_flwr.sampling import make_sampler, split_at_cut
from collafuse_flwr.schedule import CutSchedule


@pytest.mark.parametrize("t_zeta,expected", [(0, 0), (100, 190), (200, 360), (500, 750), (1000, 1000)])
def test_published_handover_is_T_rho_2_minus_rho(t_zeta, expected):
    published = RunConfig(strategy="published", t_zeta=t_zeta)
    assert handover_time(published) == expected
    assert handover_time(RunConfig(t_zeta=t_zeta)) == t_zeta
    assert clamps_handover(published) and not clamps_handover(RunConfig(t_zeta=t_zeta))


def test_published_client_runs_the_steps_below_the_handover():
    config = RunConfig(strategy="published", t_zeta=200)
    sampler = make_sampler("ddim", CutSchedule(1000, 200), 50)
    server, client = split_at_cut(sampler, handover_time(config))
    assert len(client) == 18 and len(server) == 32  # grid 1000, 980, ..., 20: 18 steps start at t <= 360


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
