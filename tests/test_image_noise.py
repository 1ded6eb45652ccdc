"""Upload noise belongs to the image: a client whose folder gains, loses, reorders or replaces
images between two runs of one configuration gives a curious server nothing beyond one view of
each image, and its ledger counts exactly the views the server received."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from collafuse_flwr import privacy
from collafuse_flwr.clients.collafuse import cut_point_uploads
from collafuse_flwr.clients.round import ClientRound
from collafuse_flwr.metrics import disclosure
from test_wire import client_context, server_message

N = 24  # images in the client's folder in the first run


def _client(tiny_run_config, tmp_path) -> ClientRound:
    """A real client of the digits at a cut point with strong noise (Wiener's PSNR is low, so
    an attack that removes the noise shows far above it)."""
    run_config = dict(tiny_run_config, **{"t-zeta": 60})
    return ClientRound.from_message(server_message("train", 0), client_context(run_config, tmp_path))


def _uploads(client: ClientRound, folder: torch.Tensor) -> torch.Tensor:
    """The client's uploads (float64) when its folder holds `folder` (n, C, H, W) in this order."""
    data = dataclasses.replace(client.data, train=privacy.bound_images(folder, client.config.clip_norm))
    variant = dataclasses.replace(client, data=data, image_keys=tuple(client.state.image_keys(folder)))
    return cut_point_uploads(variant).double()


def _folders(pool: torch.Tensor, change: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A folder of N images before and after `change`."""
    first = pool[1:N + 1]
    second = {
        "gains": pool[0:N + 1],  # one new image in front: every row shifts
        "loses": pool[2:N + 1],  # the first image gone: every row shifts the other way
        "reorders": first.roll(1, dims=0),  # the last image moved to the front
        "replaces": torch.cat([first[:5], pool[N + 1:N + 2], first[6:]]),  # the sixth image replaced
    }[change]
    return first, second


def _row_difference_attack(runs: list[torch.Tensor], folders: list[list[int]], a: float, b: float,
                           images: int) -> torch.Tensor:
    """The server's attack on noise bound to rows: it assumes every run's row i carries the same
    eps_i, knows which image each row of each run holds (`folders`: image indices per run),
    and solves U_k[i] = a x_{folders[k][i]} + b eps_i for all images at once, pixel by pixel, by
    least squares with the priors eps ~ N(0, 1) and x0 ~ N(mu, 0.5^2), mu the pixel's mean of
    all uploads over a (a MAP estimate). With rows
    of equal noise the differences of runs are noiseless and the images come out almost
    exactly; with noise bound to the image they only add noise. Returns x0_hat (images, C, H, W)."""
    rows = max(len(f) for f in folders)
    unknowns = images + rows
    equations, targets = [], []
    exact = 1e3  # uploads are exact up to float16 rounding
    for upload, folder in zip(runs, folders):
        for i, image in enumerate(folder):
            row = torch.zeros(unknowns, dtype=torch.float64)
            row[image], row[images + i] = a * exact, b * exact
            equations.append(row)
            targets.append(upload[i].flatten() * exact)
    prior = torch.cat([torch.eye(images) * 2.0, torch.zeros(images, rows)], dim=1)
    noise_prior = torch.cat([torch.zeros(rows, images), torch.eye(rows)], dim=1)
    system = torch.cat([torch.stack(equations), prior.double(), noise_prior.double()])
    mu = torch.cat(runs).mean(0).flatten() / a
    rhs = torch.cat([torch.stack(targets), 2.0 * mu.expand(images, -1),
                     torch.zeros(rows, mu.numel(), dtype=torch.float64)])
    solution = torch.linalg.lstsq(system, rhs).solution
    return solution[:images].reshape(images, *runs[0].shape[1:]).clamp(-1, 1).float()


def _leak(change: str, runs: list[torch.Tensor], folders: list[list[int]], pool: torch.Tensor, a: float,
          b: float) -> tuple[float, float]:
    """PSNR (dB) of what the row-difference attack recovers and of the Wiener filter on one view
    (fitted to both runs' uploads): every image of either folder, or, for a replaced image, the
    difference x_new - x_old that noise bound to rows would give away exactly (halved: range 2)."""
    wiener = disclosure.wiener_estimate(torch.cat(runs).float(), a, b)
    by_image = {**dict(zip(folders[0], wiener[:len(runs[0])])), **dict(zip(folders[1], wiener[len(runs[0]):]))}
    psnr = lambda estimate, truth: disclosure.reconstruction_scores(estimate, truth)["psnr"]
    if change == "replaces":
        old, new = folders[0][5], folders[1][5]
        truth = (pool[new] - pool[old])[None] / 2
        attack = ((runs[1][5] - runs[0][5]) / a)[None].float().clamp(-2, 2) / 2
        return psnr(attack, truth), psnr(((by_image[new] - by_image[old]) / 2)[None], truth)
    seen = sorted(by_image)
    attack = _row_difference_attack(runs, folders, a, b, len(pool))
    return psnr(attack[seen], pool[seen]), psnr(torch.stack([by_image[k] for k in seen]), pool[seen])


def _row_bound_noise(self: ClientRound) -> torch.Tensor:
    """The control: noise keyed by the upload stream and the row, as uploads were before."""
    seeds = [self.state.seed("upload", self.upload_view(), i) for i in range(len(self.data.train))]
    return torch.stack([torch.randn(self.image_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


@pytest.mark.parametrize("change", ["gains", "loses", "reorders", "replaces"])
def test_a_changed_folder_reveals_nothing_beyond_one_view(change, tiny_run_config, tmp_path, monkeypatch,
                                                          task_identity):
    """Two runs of one configuration around a change of the client's folder. The server's best
    attack on their differences is no better than the Wiener filter on one view (within 1 dB),
    the images the two runs share are sent identically, and the ledger holds one view per image
    of either folder. The control (noise bound to rows, as before) gives the images away."""
    client = _client(tiny_run_config, tmp_path / "image")
    pool = client.data.train[: N + 2]
    first, second = _folders(pool, change)
    index = {image.numpy().tobytes(): k for k, image in enumerate(pool)}
    folders = [[index[x.numpy().tobytes()] for x in folder] for folder in (first, second)]
    a, b = disclosure.view_noise(client.schedule, 1)

    runs = [_uploads(client, first), _uploads(client, second)]
    shared = set(folders[0]) & set(folders[1])
    for k in shared:  # one image, one upload, wherever it stands
        assert torch.equal(runs[0][folders[0].index(k)], runs[1][folders[1].index(k)])
    attacked, baseline = _leak(change, runs, folders, pool, a, b)
    assert attacked <= baseline + 1.0, (attacked, baseline)

    ledger = json.loads((client.state.directory / "privacy-ledger.json").read_text())
    keys = set(client.state.image_keys(first)) | set(client.state.image_keys(second))
    assert ledger["views"] == [[client.upload_view(), pytest.approx(privacy.upload_multiplier(
        client.schedule.alpha_bar, 60, client.image_shape, 0.0))]]
    assert ledger["images"] == dict.fromkeys(keys, [0]) and len(keys) == len(set(folders[0]) | set(folders[1]))

    control = _client(tiny_run_config, tmp_path / "row")
    monkeypatch.setattr(ClientRound, "upload_noise", _row_bound_noise)
    leaked, baseline = _leak(change, [_uploads(control, first), _uploads(control, second)], folders, pool, a, b)
    assert leaked > baseline + 6.0, (leaked, baseline)
