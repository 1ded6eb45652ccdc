"""The cut: which timesteps each party trains on, and the server's sub-chain noising."""

from __future__ import annotations

import pytest
import torch

from collafuse_flwr.diffusion.losses import client_loss, server_loss
from collafuse_flwr.diffusion.schedule import CutSchedule


class RecordingNet(torch.nn.Module):
    """Stands in for a denoiser; records the diffusers timesteps it is called with."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, x, k):
        self.seen.append(k.clone())
        return type("Out", (), {"sample": x * self.weight})()


@pytest.mark.parametrize("t_zeta", [1, 7, 50, 99])
def test_client_and_server_timesteps_never_cross_the_cut(t_zeta):
    schedule = CutSchedule(100, t_zeta)
    generator = torch.Generator().manual_seed(0)
    client, server = RecordingNet(), RecordingNet()
    for _ in range(20):
        client_loss(client, schedule, torch.zeros(256, 1, 2, 2), generator)
        server_loss(server, schedule, torch.zeros(256, 1, 2, 2), generator)
    client_t = torch.cat(client.seen) + 1  # back to protocol time t = k + 1
    server_t = torch.cat(server.seen) + 1
    assert client_t.min() == 1 and client_t.max() == t_zeta
    assert server_t.min() == t_zeta + 1 and server_t.max() == 100


def test_empty_ranges_at_the_ends():
    assert CutSchedule(100, 0).client_range.is_empty
    assert CutSchedule(100, 100).server_range.is_empty
    with pytest.raises(ValueError, match="empty"):
        CutSchedule(100, 0).client_range.sample(1, torch.Generator())
    with pytest.raises(ValueError, match="t_zeta"):
        CutSchedule(100, 101)


def test_alpha_bar_matches_diffusers_indexing():
    from diffusers import DDPMScheduler

    schedule = CutSchedule(1000, 200)
    ddpm = DDPMScheduler(num_train_timesteps=1000)
    assert schedule.alpha_bar[0] == 1
    torch.testing.assert_close(schedule.alpha_bar[1:].float(), ddpm.alphas_cumprod)


@pytest.mark.parametrize("t", [201, 230, 600, 1000])
def test_sub_chain_noising_has_the_full_chain_marginal(t):
    """x_t = sqrt(abar_t/abar_r) x_r + sqrt(1 - abar_t/abar_r) eps' with x_r from x0 must be
    distributed as q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I)."""
    schedule = CutSchedule(1000, 200)
    generator = torch.Generator().manual_seed(1)
    n = 400_000
    x0 = torch.linspace(-1, 1, 4).repeat(n // 4).view(n, 1, 1, 1).double()
    x_r = schedule.noise_to_cut(x0, torch.randn(x0.shape, generator=generator, dtype=x0.dtype))
    ts = torch.full((n,), t)
    x_t = schedule.noise_from_cut(x_r, ts, torch.randn(x0.shape, generator=generator, dtype=x0.dtype))
    abar = schedule.alpha_bar[t]
    z = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()  # standard normal iff marginal is right
    for level in x0.view(-1)[:4]:
        zl = z[x0 == level]
        assert abs(zl.mean()) < 5 / zl.numel() ** 0.5
        assert abs(zl.var() - 1) < 5 * (2 / zl.numel()) ** 0.5
    if t < 600:  # the published double noising (x_r treated as clean data) fails the check
        double = schedule.noise_data(x_r, ts, torch.randn(x0.shape, generator=generator, dtype=x0.dtype))
        zd = (double - abar.sqrt() * x0) / (1 - abar).sqrt()
        assert abs(zd[x0 == 1].mean()) > 20 / n**0.5


@pytest.mark.parametrize("t", [201, 260, 500, 900])
def test_rescaling_identity_on_gaussian_data(t):
    """x0 ~ N(mu, s^2): the minimiser of the server loss is the closed-form full-chain
    predictor E[eps | x_t] = sqrt(1-abar_t) (x_t - sqrt(abar_t) mu) / (abar_t s^2 + 1 - abar_t)."""
    mu, s = 0.3, 0.5
    schedule = CutSchedule(1000, 200)
    schedule.server_range.low = schedule.server_range.high = t  # train at one timestep
    abar = float(schedule.alpha_bar[t])
    slope = (1 - abar) ** 0.5 / (abar * s**2 + 1 - abar)
    intercept = -slope * abar**0.5 * mu

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
            self.b = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

        def forward(self, x, k):
            return type("Out", (), {"sample": self.a * x + self.b})()

    generator = torch.Generator().manual_seed(2)
    x0 = mu + s * torch.randn(200_000, 1, 1, 1, generator=generator, dtype=torch.float64)
    x_r = schedule.noise_to_cut(x0, torch.randn(x0.shape, generator=generator, dtype=x0.dtype))
    for weighting in ("eps-prime", "full-chain"):
        net = Linear()
        # the loss is quadratic in (a, b): one Newton step from 0 lands on the minimiser
        loss_gen = torch.Generator().manual_seed(3)
        params = (net.a, net.b)
        loss = server_loss(net, schedule, x_r, loss_gen, weighting)
        grad = torch.autograd.grad(loss, params, create_graph=True)
        hessian = torch.stack([torch.stack(torch.autograd.grad(g, params, retain_graph=True)) for g in grad])
        step = torch.linalg.solve(hessian, torch.stack(grad).detach())
        a, b = (-step).tolist()
        assert a == pytest.approx(slope, rel=0.02)
        assert b == pytest.approx(intercept, abs=0.02 * slope)
    # and the scale relating the eps'-predictor to the full-chain one
    c = float(schedule.server_output_scale(torch.tensor([t]))[0])
    assert c == pytest.approx(((1 - abar / float(schedule.alpha_bar[200])) / (1 - abar)) ** 0.5)
