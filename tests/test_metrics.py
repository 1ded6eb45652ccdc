"""fd_classifier / kid_classifier on a small feature network."""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg

from collafuse_flwr.config import RunConfig
from collafuse_flwr.data import load_table
from collafuse_flwr.metrics import cache_classifier, frechet_and_kid, load_classifier


class Identity(torch.nn.Module):
    """Features = the first 4 pixel values, to compare with a reference in closed form."""

    num_features = 4

    def forward(self, x):
        return x.flatten(1)[:, :4].double()


def test_frechet_distance_matches_scipy_reference():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(500, 1, 2, 2, generator=generator)
    fake = 0.5 * torch.randn(400, 1, 2, 2, generator=generator) + 0.3
    fd = frechet_and_kid(Identity(), real, fake)["fd_classifier"]
    a, b = real.flatten(1).double().numpy(), fake.flatten(1).double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    reference = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real)
    assert abs(fd - reference) < 1e-3 * max(1.0, reference)


def test_classifier_features_separate_same_from_shifted(tmp_path):
    table = load_table(RunConfig())
    images, labels = torch.from_numpy(table.images), torch.from_numpy(table.labels)
    net = cache_classifier(tmp_path / "f.safetensors", images[:1200], labels[:1200], epochs=3, seed=0)
    assert (tmp_path / "f.safetensors").exists()
    again = load_classifier(tmp_path / "f.safetensors")
    torch.testing.assert_close(again(images[:8]), net(images[:8]))
    held = images[1200:]
    same = frechet_and_kid(net, held[:250], held[250:500])
    digits_0_4 = held[labels[1200:] < 5]
    other = frechet_and_kid(net, digits_0_4, held[labels[1200:] >= 5])
    assert same["fd_classifier"] < 0.5 * other["fd_classifier"]
    assert same["kid_classifier"] < other["kid_classifier"]


def test_kid_is_reproducible_whatever_the_global_rng():
    generator = torch.Generator().manual_seed(1)
    real, fake = torch.randn(60, 1, 2, 2, generator=generator), torch.randn(50, 1, 2, 2, generator=generator)
    torch.manual_seed(123)
    first = frechet_and_kid(Identity(), real, fake)
    torch.manual_seed(456)
    assert frechet_and_kid(Identity(), real, fake) == first
