"""The server as an attacker: what its cut-point uploads and its own model reveal about each
client's training images (PROTOCOL.md, "Information disclosure, measured").

The attacks use only what the server holds: every view it received and its denoiser. Scoring
them needs the truth, the clients' training images, which the audit reads from the dataset
(simulation only; in a deployment set disclosure-num-images = 0). Per client, on its first
`disclosure-num-images` training images, every evaluation round:
- upload-<fd>, upload-<kid>: distance between the uploads (viewed as images, clipped to
  [-1, 1]) and the training images, on every available feature network;
- server-only-<fd>, server-only-<kid>: distance between images the server generates alone
  (its sampler continued below t_zeta with its own model) and the training images, per client
  and pooled;
- reconstruction-{psnr,ssim}-{tweedie,wiener}: the server's estimates of x0 from the views;
- linkage-top1 (and linkage-chance = 1/n): matching each view to its source image;
- views-per-image (distinct views received; 1 under the `once` policy) and effective-snr.
With t_zeta = T nothing is uploaded: only the server-only rows exist.
"""

from __future__ import annotations

import torch

from collafuse_flwr.config import RunConfig
from collafuse_flwr.data import client_indices, partition_key, training_images
from collafuse_flwr.metrics import disclosure
from collafuse_flwr.metrics.distances import named_distances
from collafuse_flwr.metrics.features import FeatureNetwork, cached_features
from collafuse_flwr.schedule import CutSchedule


class DisclosureAudit:
    """Collects the views each client sent and scores the attacks on them.

    Args:
        config: the run config (disclosure-num-images, the dataset and its partition).
        schedule: the cut schedule (a = sqrt(abar_r) of the views).
        networks: feature networks for the distance rows.
        cache_dir: where the training images' features are cached.
    """

    def __init__(self, config: RunConfig, schedule: CutSchedule, networks: list[FeatureNetwork], cache_dir):
        self.config = config
        self.schedule = schedule
        self.networks = networks
        self.cache_dir = cache_dir
        self.view_sum: dict[int, torch.Tensor] = {}  # partition id -> sum of distinct views (m, C, H, W)
        self.last_view: dict[int, torch.Tensor] = {}
        self.views: dict[int, int] = {}

    def state(self) -> dict:
        """The views collected so far (for checkpoints)."""
        return {"view_sum": self.view_sum, "last_view": self.last_view, "views": self.views}

    def load_state(self, state: dict) -> None:
        """Continue with the views of a checkpoint (`state()`)."""
        self.view_sum, self.last_view, self.views = state["view_sum"], state["last_view"], state["views"]

    @property
    def enabled(self) -> bool:
        return self.config.disclosure_num_images > 0

    def record(self, partition_id: int, x_cut: torch.Tensor) -> None:
        """Add a client's accepted upload (n, C, H, W); a re-sent identical upload is not a new
        view. The server links views of one image by their position in the upload."""
        if not self.enabled or not len(x_cut):
            return
        view = x_cut[: self.config.disclosure_num_images].double()
        last = self.last_view.get(partition_id)
        if last is not None and last.shape == view.shape and torch.equal(last, view):
            return
        if last is None or last.shape != view.shape:
            self.view_sum[partition_id], self.views[partition_id] = torch.zeros_like(view), 0
        self.view_sum[partition_id] += view
        self.views[partition_id] += 1
        self.last_view[partition_id] = view

    @torch.no_grad()
    def measure(self, server_net, server_only: torch.Tensor) -> list[tuple[str, str, float]]:
        """(client, metric, value) rows for every client; `server_only` are images (n, C, H, W)
        the server generated on its own, `server_net` its eps-predictor for Tweedie."""
        rows, pooled_truth = [], {n.name: [] for n in self.networks}
        fake = {n.name: n.features(server_only) for n in self.networks}
        for pid in range(self.config.num_clients):
            count = min(self.config.disclosure_num_images, len(client_indices(self.config)[pid][0]))
            truth = training_images(self.config, pid, count)
            key = f"{partition_key(self.config)}:client-{pid}:train-{count}"
            truth_features = {n.name: cached_features(n, truth, self.cache_dir, key) for n in self.networks}
            for n in self.networks:
                pooled_truth[n.name].append(truth_features[n.name])
                rows += _rows(pid, "server-only-", named_distances(n.fd_name, n.kid_name, truth_features[n.name], fake[n.name]))
            if pid in self.views:
                rows += self._attack(pid, truth, truth_features, server_net)
        for n in self.networks:
            rows += _rows("pooled", "server-only-", named_distances(
                n.fd_name, n.kid_name, torch.cat(pooled_truth[n.name]), fake[n.name]))
        return rows

    def _attack(self, pid: int, truth: torch.Tensor, truth_features: dict, server_net) -> list[tuple]:
        count = self.views[pid]
        views = (self.view_sum[pid] / count).float()
        truth = truth[: len(views)]
        a, sigma = disclosure.view_noise(self.schedule, count)
        rows = [
            (str(pid), "views-per-image", float(count)),
            (str(pid), "effective-snr", disclosure.effective_snr(self.schedule, count)),
            (str(pid), "linkage-top1", disclosure.linkage_top1(views, truth, a)),
            (str(pid), "linkage-chance", 1.0 / len(views)),
        ]
        estimates = {
            "wiener": disclosure.wiener_estimate(views, a, sigma),
            "tweedie": disclosure.tweedie_estimate(server_net, self.schedule, views, count),
        }
        for name, estimate in estimates.items():
            scores = disclosure.reconstruction_scores(estimate, truth)
            rows += [(str(pid), f"reconstruction-{k}-{name}", v) for k, v in scores.items()]
        shown = views.clamp(-1, 1)
        for n in self.networks:
            rows += _rows(pid, "upload-", named_distances(
                n.fd_name, n.kid_name, truth_features[n.name][: len(views)], n.features(shown)))
        return rows


def _rows(client, prefix: str, values: dict[str, float]) -> list[tuple[str, str, float]]:
    return [(str(client), prefix + k, v) for k, v in values.items()]
