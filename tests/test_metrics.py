"""Quality metrics: Fréchet distance and KID on features, the feature networks and their cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from collafuse_flwr.config import RunConfig
from collafuse_flwr.data import load_table
from collafuse_flwr.metrics.classifier import cache_classifier, load_classifier
from collafuse_flwr.metrics.distances import (
    Moments,
    feature_distances,
    feature_moments,
    frechet_distance,
    pooled_moments,
)
from collafuse_flwr.metrics.features import FeatureNetwork, cached_features
from collafuse_flwr.metrics.manifold import MIN_MANIFOLD_IMAGES, NEAREST_K, manifold_metrics


def _scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real))


@pytest.mark.parametrize("dim", [4, 64])
def test_frechet_distance_matches_scipy_sqrtm_reference(dim):
    g = torch.Generator().manual_seed(dim)
    mixing = torch.randn(dim, dim, generator=g) / dim**0.5
    real = torch.randn(500, dim, generator=g) @ mixing
    fake = 0.7 * torch.randn(400, dim, generator=g) @ mixing.T + 0.2
    fd = feature_distances(real, fake)["fd"]
    reference = _scipy_frechet(real.double().numpy(), fake.double().numpy())
    assert fd == pytest.approx(reference, rel=1e-4, abs=1e-6)


def test_identical_sets_give_zero_and_shifted_sets_grow_with_the_shift():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 8, generator=g)
    same = feature_distances(real, real.clone())
    small, large = (feature_distances(real, real + shift) for shift in (0.5, 2.0))
    assert abs(same["fd"]) < 1e-6
    # the unbiased KID of a set against itself is slightly negative (O(1/n)), ~0 next to a shift
    assert abs(same["kid"]) < 0.1 * small["kid"]
    assert 0 < small["fd"] < large["fd"]
    assert small["fd"] == pytest.approx(8 * 0.25, rel=1e-6)  # a pure shift adds |delta mu|^2
    assert 0 < small["kid"] < large["kid"]


def test_kid_is_reproducible_whatever_the_global_rng():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(60, 4, generator=g), torch.randn(50, 4, generator=g)
    torch.manual_seed(123)
    first = feature_distances(real, fake)
    torch.manual_seed(456)
    assert feature_distances(real, fake) == first


def test_distances_need_two_samples_and_matching_sizes():
    with pytest.raises(ValueError, match="at least 2"):
        feature_distances(torch.zeros(1, 4), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="equal d"):
        feature_distances(torch.zeros(5, 4), torch.zeros(5, 3))


def test_pooled_moments_are_those_of_all_features_together():
    """Within + between scatter gives exactly the moments of the concatenated sets; the
    Fréchet distance from pooled moments sent as float32 (as clients send them) equals that
    of the concatenated features to float32 precision."""
    g = torch.Generator().manual_seed(7)
    sets = lambda shift: [torch.randn(n, 5, generator=g) * scale + shift + offset
                          for n, scale, offset in ((6, 1.0, 0.0), (11, 2.0, 1.0), (3, 0.5, -2.0))]
    real, fake = sets(0.0), sets(0.7)
    pooled = pooled_moments([feature_moments(part) for part in real])
    whole = feature_moments(torch.cat(real))
    assert pooled.count == whole.count == 20
    torch.testing.assert_close(pooled.mean, whole.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pooled.covariance, whole.covariance, rtol=1e-12, atol=1e-12)
    sent = lambda m: Moments(m.count, m.mean.float().double(), m.covariance.float().double())
    fd = frechet_distance(pooled_moments([sent(feature_moments(p)) for p in real]),
                          pooled_moments([sent(feature_moments(p)) for p in fake]))
    assert fd == pytest.approx(feature_distances(torch.cat(real), torch.cat(fake))["fd"], rel=1e-5)
    assert fd > 1.0


def test_classifier_features_separate_same_from_shifted(tmp_path):
    table = load_table(RunConfig())
    images, labels = torch.from_numpy(table.images), torch.from_numpy(table.labels)
    net = cache_classifier(tmp_path / "f.safetensors", images[:1200], labels[:1200], epochs=3, seed=0)
    again = load_classifier(tmp_path / "f.safetensors")
    x = images[:8].float() / 127.5 - 1
    torch.testing.assert_close(again(x), net(x))
    held, held_labels = images[1200:].float() / 127.5 - 1, labels[1200:]
    feats = lambda x: net(x).detach()
    same = feature_distances(feats(held[:250]), feats(held[250:500]))
    other = feature_distances(feats(held[held_labels < 5]), feats(held[held_labels >= 5]))
    assert same["fd"] < 0.5 * other["fd"]
    assert same["kid"] < other["kid"]


class Pixels(torch.nn.Module):
    """A small stand-in extractor: the mean of each channel and 4x4 pooled pixels."""

    num_features = 16

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.nn.functional.adaptive_avg_pool2d(x.mean(1, keepdim=True), 4).flatten(1)


def test_real_features_are_computed_once_and_keyed_by_network_and_images(tmp_path):
    module = Pixels()
    network = FeatureNetwork("pixels", module, "fd_pixels", "kid_pixels", identity="v1")
    images = torch.rand(40, 1, 8, 8) * 2 - 1
    first = cached_features(network, images, tmp_path, key="client-0")
    calls = module.calls
    torch.testing.assert_close(cached_features(network, images, tmp_path, key="client-0"), first)
    assert module.calls == calls  # read back from the cache
    cached_features(network, images, tmp_path, key="client-1")
    cached_features(FeatureNetwork("pixels", module, "fd_pixels", "kid_pixels", "v2"), images, tmp_path, "client-0")
    assert len(list(tmp_path.glob("pixels-*.npy"))) == 3
    assert not list(tmp_path.glob("*.tmp*"))


def test_flop_counts_are_remembered_per_architecture_and_image_shape():
    from collafuse_flwr.diffusion.models import build_denoiser
    from collafuse_flwr.metrics.cost import forward_flops, sampling_cost, train_cost, training_flops

    small, same, wide = (build_denoiser(8, 1, channels, seed=seed) for channels, seed in
                         (((8, 16), 0), ((8, 16), 1), ((16, 32), 0)))
    assert train_cost(small, (1, 8, 8), 10)["flops-train"] == 10 * training_flops(same, (1, 8, 8))
    assert train_cost(wide, (1, 8, 8), 10)["flops-train"] == 10 * training_flops(wide, (1, 8, 8))
    assert train_cost(wide, (1, 8, 8), 10)["flops-train"] > train_cost(small, (1, 8, 8), 10)["flops-train"]
    assert sampling_cost(small, (1, 16, 16), 2, 3)["flops-sample"] == 6 * forward_flops(small, (1, 16, 16))
    assert 2 * forward_flops(small, (1, 8, 8)) < training_flops(small, (1, 8, 8))  # backward > forward


def test_a_checkpoint_loaded_from_anywhere_is_counted_as_its_architecture(tmp_path, monkeypatch):
    """Every client loads its denoiser from its own directory (diffusers records it in the
    config as _name_or_path): the FLOPs are still counted once per architecture."""
    from collafuse_flwr.diffusion.models import Denoiser, build_denoiser
    from collafuse_flwr.metrics import cost

    for k in range(2):
        Denoiser(build_denoiser(8, 1, (8, 16), seed=k, condition_dim=3), 1e-3, 0.9).save(tmp_path / f"client-{k}")
    counted = []
    monkeypatch.setattr(cost, "_COUNTS", {})
    monkeypatch.setattr(cost, "training_flops", lambda net, shape: counted.append(net) or 7)
    loaded = [Denoiser.load(tmp_path / f"client-{k}", 1e-3, 0.9, "cpu").net for k in range(2)]
    assert dict(loaded[0].config)["_name_or_path"] != dict(loaded[1].config)["_name_or_path"]
    assert [cost.train_cost(net, (1, 8, 8), 2)["flops-train"] for net in loaded] == [14.0, 14.0]
    assert len(counted) == 1


def _manifold_by_hand(real: torch.Tensor, fake: torch.Tensor, k: int) -> dict[str, float]:
    """Precision, recall, density and coverage written out from their definitions
    (Kynkäänniemi et al. 2019; Naeem et al. 2020), independently of prdc."""
    def radii(x):  # distance to the k-th nearest other point of the same set
        return torch.cdist(x, x).sort(dim=1).values[:, k]
    r_real, r_fake, d = radii(real), radii(fake), torch.cdist(real, fake)  # d[i, j] = |X_i - Y_j|
    inside_real = d < r_real[:, None]  # Y_j in the ball of X_i
    return {
        "precision": inside_real.any(dim=0).double().mean().item(),
        "recall": (d < r_fake[None, :]).any(dim=1).double().mean().item(),
        "density": inside_real.sum(dim=0).double().mean().item() / k,
        "coverage": (d.min(dim=1).values < r_real).double().mean().item(),
    }


@pytest.mark.parametrize("shift,spread", [(0.0, 1.0), (0.5, 1.0), (0.0, 0.3), (2.0, 2.0)])
def test_precision_recall_density_coverage_match_their_definitions(shift, spread):
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(60, 4, generator=generator, dtype=torch.float64)
    fake = shift + spread * torch.randn(50, 4, generator=generator, dtype=torch.float64)
    got = manifold_metrics("net", real, fake)
    want = _manifold_by_hand(real, fake, NEAREST_K)
    assert set(got) == {f"{m}_net" for m in want}
    for metric, value in want.items():
        assert got[f"{metric}_net"] == pytest.approx(value, abs=1e-12)


def test_precision_recall_density_coverage_on_known_sets():
    """The generated set equal to the real one lies on it and covers it (precision, recall,
    coverage 1); one far away shares nothing (all 0); ten copies of one real point (mode
    collapse) are all on the real manifold but recall none of it; below k + 2 images nothing."""
    real = torch.randn(40, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    same = manifold_metrics("n", real, real.clone())
    assert (same["precision_n"], same["recall_n"], same["coverage_n"]) == (1.0, 1.0, 1.0)
    far = manifold_metrics("n", real, real + 100.0)
    assert all(value == 0.0 for value in far.values())
    collapsed = manifold_metrics("n", real, real[:1].repeat(10, 1))
    assert (collapsed["precision_n"], collapsed["recall_n"]) == (1.0, 0.0) and collapsed["coverage_n"] < 0.5
    assert manifold_metrics("n", real[:MIN_MANIFOLD_IMAGES - 1], real) == {}
    assert manifold_metrics("n", real[:MIN_MANIFOLD_IMAGES], real) != {}
