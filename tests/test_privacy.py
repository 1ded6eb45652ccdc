"""The uploads' (epsilon, delta) guarantee: clipping, the accountant against the closed form and
dp-accounting's PLD composition, the run config's target, and the client's own budget."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from dp_accounting import GaussianDpEvent, NeighboringRelation
from dp_accounting.pld import PLDAccountant
from scipy.stats import norm

from collafuse_flwr import privacy
from collafuse_flwr.clients.state import ClientState, ClientStateError, privacy_budget
from collafuse_flwr.config import ConfigError, RunConfig
from collafuse_flwr.metrics import disclosure

ALPHA_BAR = privacy.alpha_bar(1000, "linear")


def analytic_delta(epsilon: float, sensitivity: float, sigma: float) -> float:
    """delta(epsilon) of the Gaussian mechanism N(f(D), sigma^2 I) with L2 sensitivity
    `sensitivity` (Balle and Wang 2018, Theorem 8), written out here as the reference."""
    ratio, shift = sensitivity / (2 * sigma), epsilon * sigma / sensitivity
    return norm.cdf(ratio - shift) - math.exp(epsilon + norm.logcdf(-ratio - shift))


@pytest.mark.parametrize(("t_zeta", "shape", "clip_norm"), [
    (200, (1, 16, 16), 0.0), (500, (1, 16, 16), 4.0), (690, (3, 32, 32), 10.0), (800, (3, 64, 64), 0.0)])
def test_one_view_is_the_analytic_gaussian_mechanism(t_zeta, shape, clip_norm):
    """One upload: sensitivity 2 R sqrt(abar_r) (R = C, or sqrt(d) unclipped) against noise
    sqrt(1 - abar_r); the accountant's epsilon solves the closed form's delta(epsilon) = delta."""
    delta = 1e-5
    epsilon = privacy.upload_epsilon(ALPHA_BAR, t_zeta, shape, clip_norm, 1, delta)
    a = math.sqrt(float(ALPHA_BAR[t_zeta]))
    radius = clip_norm or math.sqrt(math.prod(shape))
    assert 0 < epsilon < math.inf
    assert analytic_delta(epsilon, 2 * radius * a, math.sqrt(1 - a * a)) == pytest.approx(delta, rel=1e-6)
    assert analytic_delta(0.99 * epsilon, 2 * radius * a, math.sqrt(1 - a * a)) > delta


@pytest.mark.parametrize("views", [2, 5, 20])
def test_views_compose_as_the_pld_accountant_composes_them(views):
    """K views of one image against dp-accounting's PLD accountant composing K Gaussian
    mechanisms (replace-one: its multiplier is sigma over one image's norm bound R sqrt(abar_r))."""
    t_zeta, shape, clip_norm, delta = 600, (1, 16, 16), 3.0, 1e-5
    a = math.sqrt(float(ALPHA_BAR[t_zeta]))
    accountant = PLDAccountant(NeighboringRelation.REPLACE_ONE, value_discretization_interval=1e-3)
    accountant.compose(GaussianDpEvent(math.sqrt(1 - a * a) / (clip_norm * a)), views)
    ours = privacy.upload_epsilon(ALPHA_BAR, t_zeta, shape, clip_norm, views, delta)
    assert ours > privacy.upload_epsilon(ALPHA_BAR, t_zeta, shape, clip_norm, views - 1, delta)
    assert accountant.get_epsilon(delta) == pytest.approx(ours, rel=1e-3)


def test_views_of_different_noise_compose_as_the_pld_accountant_composes_them():
    """The client's ledger composes views of different cut points (other runs): one
    multiplier (sum z^-2)^(-1/2), against the PLD accountant composing the mechanisms."""
    multipliers = [0.8, 2.5, 1.3]
    accountant = PLDAccountant(NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-3)
    for z in multipliers:
        accountant.compose(GaussianDpEvent(z))
    ours = privacy.epsilon(privacy.composed_multiplier(multipliers), 1, 1e-5)
    assert accountant.get_epsilon(1e-5) == pytest.approx(ours, rel=1e-3)


def test_the_ends_of_the_chain():
    """t_zeta = 0 uploads the images (no guarantee); t_zeta = T uploads nothing."""
    assert privacy.upload_epsilon(ALPHA_BAR, 0, (1, 8, 8), 0.0, 1, 1e-5) == math.inf
    assert privacy.upload_epsilon(ALPHA_BAR, 1000, (1, 8, 8), 0.0, 7, 1e-5) == 0.0
    assert privacy.composed_multiplier([]) == math.inf and privacy.epsilon(math.inf, 1, 1e-5) == 0.0


def test_bounded_images_lie_in_the_ball_and_small_ones_are_untouched():
    x = torch.linspace(-3, 3, 4 * 3 * 8 * 8).view(4, 3, 8, 8)
    x[0] = 0.01
    bounded = privacy.bound_images(x, 2.0)
    assert bounded.abs().max() <= 1
    assert (bounded.flatten(1).norm(dim=1) <= 2.0 + 1e-5).all()
    assert torch.equal(bounded[0], x[0])
    assert torch.equal(privacy.bound_images(x.clamp(-1, 1), 0.0), x.clamp(-1, 1))  # unclipped: only the clamp
    unclipped = privacy.bound_images(torch.ones(2, 3, 8, 8), 0.0)
    assert unclipped.flatten(1).norm(dim=1).max() == pytest.approx(privacy.image_radius((3, 8, 8), 0.0))


@pytest.mark.parametrize(("target", "clip_norm", "views"), [(1.0, 4.0, 1), (10.0, 0.0, 1), (10.0, 0.0, 4)])
def test_the_smallest_cut_point_is_the_first_that_meets_the_target(target, clip_norm, views):
    shape = (1, 16, 16)
    r = privacy.smallest_cut_point(ALPHA_BAR, target, shape, clip_norm, views, 1e-5)
    assert 0 < r < 1000
    assert privacy.upload_epsilon(ALPHA_BAR, r, shape, clip_norm, views, 1e-5) <= target
    assert privacy.upload_epsilon(ALPHA_BAR, r - 1, shape, clip_norm, views, 1e-5) > target


def test_a_target_picks_or_checks_the_cut_point_before_any_work():
    picked = RunConfig.from_flower({"target-epsilon": 10.0, "t-zeta-from-target": True})
    assert picked.t_zeta == privacy.smallest_cut_point(ALPHA_BAR, 10.0, (1, 16, 16), 0.0, 1, 1e-5)
    assert picked.upload_epsilon(picked.t_zeta, 1) <= 10.0
    fresh = RunConfig.from_flower({"target-epsilon": 10.0, "t-zeta-from-target": True, "noise-policy": "fresh"})
    assert fresh.t_zeta > picked.t_zeta  # four rounds, four views
    RunConfig.from_flower({"target-epsilon": 10.0, "t-zeta": picked.t_zeta})
    with pytest.raises(ConfigError, match=rf"target-epsilon=10.0: t-zeta=200 gives epsilon .*t-zeta={picked.t_zeta}"):
        RunConfig.from_flower({"target-epsilon": 10.0})
    with pytest.raises(ConfigError, match="no cut point below timesteps=1000 meets it"):
        RunConfig.from_flower({"target-epsilon": 0.5, "dataset": "cifar10", "t-zeta-from-target": True})
    with pytest.raises(ConfigError, match="target-epsilon=0"):
        RunConfig.from_flower({"t-zeta-from-target": True})
    with pytest.raises(ConfigError, match="strategy='fedavg'"):
        RunConfig.from_flower({"strategy": "fedavg", "clip-norm": 4.0})
    for key, value in (("clip-norm", -1.0), ("privacy-delta", 1.0), ("target-epsilon", -2.0)):
        with pytest.raises(ConfigError, match=key):
            RunConfig.from_flower({key: value})


def test_image_channels_follow_the_loaders():
    from collafuse_flwr.data import client_data

    config = RunConfig.from_flower({"image-size": 8, "num-clients": 5})
    assert tuple(client_data(config, 0).train.shape[1:]) == config.image_shape == (1, 8, 8)


def test_the_ledger_spends_each_view_once_per_image_and_refuses_beyond_the_budget(tmp_path):
    """A view an image was sent under before costs nothing; views of other runs (another
    configuration: new noise) add up, image by image, so a server cannot reset the budget with a
    new run; a new image starts its own count; a refused upload records nothing."""
    state = ClientState(tmp_path / "partition-0")
    path = tmp_path / "partition-0" / "privacy-ledger.json"
    budget, shape = (8.0, 1e-5), (1, 8, 8)
    z = 1.0  # epsilon at 1e-5: 4.38 for one view, 10.0 for four
    state.spend(["a", "b"], shape, "view-1", z, budget)
    written = path.stat().st_ino
    state.spend(["a", "b"], shape, "view-1", z, budget)
    assert path.stat().st_ino == written  # the same upload again: nothing new, the ledger is not rewritten
    state.spend(["a", "c"], shape, "view-2", z, budget)  # a: two views; c: its first
    ledger = json.loads(path.read_text())
    assert ledger["views"] == [["view-1", z], ["view-2", z]]
    assert ledger["images"] == {"a": [0, 1], "b": [0], "c": [1]}
    state.spend(["a"], shape, "view-3", z, None)  # no budget: recorded all the same
    with pytest.raises(ClientStateError, match=r"epsilon 10 at delta 1e-05 \(4 views of an image\), beyond its "
                                               "privacy-budget of epsilon 8"):
        state.spend(["b", "a"], shape, "view-4", z, budget)  # a's fourth view
    assert json.loads(path.read_text())["images"]["a"] == [0, 1, 2]
    state.spend(["b", "c"], shape, "view-4", z, budget)  # their third view: within it
    with pytest.raises(ClientStateError, match="at shape \\[1, 8, 8\\].*asked for \\[1, 16, 16\\]"):
        state.spend(["d"], (1, 16, 16), "view-5", z, budget)  # the same pictures, resized: refused


def test_the_budget_is_the_clients_own_setting(monkeypatch):
    monkeypatch.delenv("COLLAFUSE_PRIVACY_BUDGET", raising=False)
    assert privacy_budget({}) is None
    assert privacy_budget({"privacy-budget": "10, 1e-5"}) == (10.0, 1e-5)
    monkeypatch.setenv("COLLAFUSE_PRIVACY_BUDGET", "3,1e-6")
    assert privacy_budget({}) == (3.0, 1e-6)
    for bad in ("10", "ten, 1e-5", "10, 1", "-1, 1e-5", "inf, 1e-5"):
        with pytest.raises(ClientStateError, match="privacy-budget"):
            privacy_budget({"privacy-budget": bad})


def test_the_membership_attack_reads_the_loss_gap():
    """Losses apart: AUC 1 and every member found at 1 % FPR; the same distribution: AUC near
    0.5 and few members found."""
    g = torch.Generator().manual_seed(0)
    members, others = (torch.rand(400, generator=g, dtype=torch.float64) for _ in range(2))
    assert disclosure.membership_attack(members, others + 1) == {"auc": 1.0, "tpr-at-1pct-fpr": 1.0}
    blind = disclosure.membership_attack(members, others)
    assert abs(blind["auc"] - 0.5) < 0.06 and blind["tpr-at-1pct-fpr"] < 0.05


def test_membership_scores_average_the_servers_loss_over_draws():
    """The score of an image is its loss averaged over the draws (here a loss that is the
    image's mean plus a uniform draw: the average lands near mean + 0.5), in batches of 64."""
    views = torch.arange(130, dtype=torch.float32).view(130, 1, 1, 1).expand(130, 1, 2, 2)

    def loss(x, generator, c):
        assert c is None and len(x) <= 64
        return x.mean(dim=(1, 2, 3)) + torch.rand(len(x), generator=generator)

    scores = disclosure.membership_scores(loss, views, None, torch.Generator().manual_seed(0), draws=400)
    assert scores.shape == (130,) and scores.dtype == torch.float64
    assert torch.allclose(scores, torch.arange(130, dtype=torch.float64) + 0.5, atol=0.06)


def test_the_privacy_table_lists_what_a_run_would_pick(tmp_path, capsys):
    from collafuse_flwr.tools import privacy_table

    out = tmp_path / "privacy"
    privacy_table.main(["--out", str(out), "--datasets", "digits", "cifar10", "--clip-norms", "0", "10",
                        "--views", "1", "4", "--targets", "1", "10"])
    cuts = pd.read_csv(out / "cut_points.csv")
    assert len(cuts) == 2 * 2 * 2 * 2 and (out / "epsilon.png").stat().st_size > 0
    for row in cuts.itertuples():
        run = {"dataset": row.dataset, "clip-norm": row.clip_norm, "target-epsilon": row.target_epsilon,
               "t-zeta-from-target": True, "noise-policy": "once" if row.views == 1 else "fresh",
               "num-server-rounds": row.views}
        if pd.isna(row.smallest_t_zeta):
            with pytest.raises(ConfigError, match="no cut point below"):
                RunConfig.from_flower(run)
        else:
            assert RunConfig.from_flower(run).t_zeta == row.smallest_t_zeta
    curves = pd.read_csv(out / "epsilon.csv")
    digits = curves[(curves.dataset == "digits") & (curves.clip_norm == 0) & (curves.views == 1)]
    assert len(digits) == 1001 and digits.epsilon.is_monotonic_decreasing
    assert "none < T" in (out / "cut_points.md").read_text()  # CIFAR-10 unclipped at epsilon 1
    with pytest.raises(SystemExit):
        privacy_table.main(["--out", str(tmp_path / "bad"), "--delta", "2"])
    assert "privacy-delta=2.0" in capsys.readouterr().err and not (tmp_path / "bad").exists()
