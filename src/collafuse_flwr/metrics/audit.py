"""The server as an attacker: what its cut-point uploads and its own model reveal about each
client's training images (docs/metrics.md, "Disclosure audit").

The attacks use only what the server holds: every view it received and its denoiser. Scoring
them needs the truth, the clients' training images, which the audit reads from the dataset:
simulation only (client-data "partition"); with client-data "own" the server holds no client
image and the attacks do not run. Per client, on its first
`disclosure-num-images` training images, every evaluation round:
- upload-<fd>, upload-<kid>: distance between the uploads (viewed as images, clipped to
  [-1, 1]) and the training images, on every available feature network;
- server-only-<fd>, server-only-<kid>: distance between images the server generates alone
  (its sampler continued below t_zeta with its own model; a conditional server generates for
  each client with what it knows of it: the client's id, or its uploads' conditions) and the
  training images, per client and pooled;
- reconstruction-{psnr,ssim}-{tweedie,wiener}: the server's estimates of x0 from the views
  (Tweedie with the server's condition of each view when it is conditional);
- reconstruction-{psnr,ssim}-recompute: the server recomputes the noise of the client's latest
  upload from every seed it can derive from what it holds (run seed, configuration, partition
  ids, rounds: the public streams of seeds.py and the derivation this project used before the
  noise became the client's secret) and subtracts it; no better than Wiener unless the noise
  is not the client's secret (the run key is random and drives no stream: trying it would only
  make the row differ between runs of one config);
- linkage-top1 (and linkage-chance = 1/n): matching each view to its source image;
- membership-auc, membership-tpr-at-1pct-fpr: the loss-threshold membership attack on the
  server's denoiser (disclosure.membership_attack): its loss on the client's latest upload of
  those images against views of as many of its held-out images, bounded and noised to the cut
  as the client does (fresh public noise, rounded to the upload dtype), at t > t_zeta;
With t_zeta = T nothing is uploaded: only the server-only rows exist.
Whether or not the attacks run, every evaluation round reports per client the views of each
image that left it, views-per-image (the distinct uploads received: 1 under the `once` noise
policy, one per round under `fresh`), and the effective-snr K abar_r / (1 - abar_r) of K views
an attacker who links them averages.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from collafuse_flwr import privacy
from collafuse_flwr.config import RunConfig
from collafuse_flwr.data import client_data, client_indices, partition_key, training_images
from collafuse_flwr.diffusion.conditions import Conditioning
from collafuse_flwr.diffusion.protocol import Protocol
from collafuse_flwr.metrics import disclosure
from collafuse_flwr.metrics.distances import named_distances
from collafuse_flwr.metrics.features import FeatureNetwork, cached_features
from collafuse_flwr.seeds import public_seed


class DisclosureAudit:
    """Collects the views each client sent and scores the attacks on them.

    Args:
        config: the run config (disclosure-num-images, the dataset and its partition).
        protocol: the run's protocol: its cut schedule (a = sqrt(abar_r) of the views) and the
            server's loss (the membership attack).
        conditioning: what the server conditions on (the membership attack's non-members).
        networks: feature networks for the distance rows.
        cache_dir: where the training images' features are cached.
    """

    def __init__(self, config: RunConfig, protocol: Protocol, conditioning: Conditioning,
                 networks: list[FeatureNetwork], cache_dir):
        self.config = config
        self.protocol = protocol
        self.schedule = protocol.schedule
        self.conditioning = conditioning
        self.networks = networks
        self.cache_dir = cache_dir
        # partition id -> (sum of its K latest aligned distinct views (m, C, H, W), K)
        self.view_sum: dict[int, tuple[torch.Tensor, int]] = {}
        self.last_digest: dict[int, str] = {}  # partition id -> SHA-256 of its latest upload
        self.views: dict[int, int] = {}  # partition id -> distinct uploads received
        # partition id -> (first images of its latest upload, that upload's shape, its round)
        self.latest: dict[int, tuple[torch.Tensor, tuple[int, ...], int]] = {}

    def state(self) -> dict:
        """The views collected so far (for checkpoints)."""
        return {"view_sum": self.view_sum, "last_digest": self.last_digest, "views": self.views,
                "latest": self.latest}

    def load_state(self, state: dict) -> None:
        """Continue with the views of a checkpoint (`state()`)."""
        self.view_sum, self.last_digest, self.views = state["view_sum"], state["last_digest"], state["views"]
        self.latest = state["latest"]

    @property
    def enabled(self) -> bool:
        return self.config.disclosure_num_images > 0 and self.config.client_data == "partition"

    def record(self, partition_id: int, x_cut: torch.Tensor, server_round: int) -> None:
        """Count a client's accepted upload (n, C, H, W) as a new view of each of its images
        unless it is byte-identical to the client's previous one; keep the sum of the views of
        the first `disclosure-num-images` images for the attacks. The server links views of
        one image by their position in the upload."""
        if not len(x_cut):
            return
        digest = hashlib.sha256(x_cut.numpy().tobytes()).hexdigest()
        if self.last_digest.get(partition_id) == digest:
            return
        self.last_digest[partition_id] = digest
        self.views[partition_id] = self.views.get(partition_id, 0) + 1
        if self.enabled:
            view = x_cut[: self.config.disclosure_num_images].double()
            total, count = self.view_sum.get(partition_id, (torch.zeros_like(view), 0))
            if total.shape != view.shape:  # another number of images: views by position no longer align
                total, count = torch.zeros_like(view), 0
            self.view_sum[partition_id] = (total + view, count + 1)
            self.latest[partition_id] = (x_cut[: self.config.disclosure_num_images].clone(), tuple(x_cut.shape),
                                         server_round)

    def view_rows(self) -> list[tuple[str, str, float]]:
        """(client, "views-per-image" | "effective-snr", value) for every client that uploaded."""
        rows = []
        for pid, count in sorted(self.views.items()):
            rows += [(str(pid), "views-per-image", float(count)),
                     (str(pid), "effective-snr", disclosure.effective_snr(self.schedule, count))]
        return rows

    @torch.no_grad()
    def measure(
        self, server_net, server_only: dict[int, torch.Tensor], conditions: dict[int, torch.Tensor] | None = None,
    ) -> list[tuple[str, str, float]]:
        """(client, metric, value) rows for every client of `server_only`: the images
        (n, C, H, W) the server generated on its own for each client (the same tensor for every
        client when it is unconditional; the pooled row uses each distinct tensor once),
        `server_net` its eps-predictor for Tweedie, `conditions` its condition vectors (m, d)
        of each client's uploads (None: unconditional)."""
        rows, pooled_truth = [], {n.name: [] for n in self.networks}
        features = {id(images): {n.name: n.features(images) for n in self.networks}  # each distinct tensor once
                    for images in server_only.values()}
        pooled_fake = {n.name: torch.cat([f[n.name] for f in features.values()]) for n in self.networks}
        for pid in sorted(server_only):
            fake = features[id(server_only[pid])]
            count = min(self.config.disclosure_num_images, len(client_indices(self.config)[pid][0]))
            truth = training_images(self.config, pid, count)
            key = f"{partition_key(self.config)}:client-{pid}:train-{count}"
            truth_features = {n.name: cached_features(n, truth, self.cache_dir, key) for n in self.networks}
            for n in self.networks:
                pooled_truth[n.name].append(truth_features[n.name])
                distances = named_distances(n.fd_name, n.kid_name, truth_features[n.name], fake[n.name])
                rows += _rows(pid, "server-only-", distances)
            if pid in self.view_sum:
                rows += self._attack(pid, truth, truth_features, server_net, (conditions or {}).get(pid))
        for n in self.networks:
            rows += _rows("pooled", "server-only-", named_distances(
                n.fd_name, n.kid_name, torch.cat(pooled_truth[n.name]), pooled_fake[n.name]))
        return rows

    def derivable_seeds(self, pid: int, server_round: int) -> list[int]:
        """Every upload seed the server can derive from what it holds for partition `pid`'s
        upload of `server_round`: the public "upload" stream keyed by the run seed with the
        configuration's identity or the partition id at every round so far (and "once"), and
        numpy's SeedSequence over (seed, partition[, round]), the derivation used before."""
        c, identity = self.config, self.config.identity_hash()
        rounds = ["once", *range(1, server_round + 1)]
        seeds = [public_seed(c.seed, "upload", identity, r) for r in rounds]
        seeds += [public_seed(c.seed, "upload", pid, r) for r in rounds]
        seeds += [int(np.random.SeedSequence([c.seed, pid, *r]).generate_state(1)[0])
                  for r in ([], *([k] for k in range(1, server_round + 1)))]
        return seeds

    def _attack(self, pid: int, truth: torch.Tensor, truth_features: dict, server_net,
                conditions: torch.Tensor | None) -> list[tuple]:
        total, count = self.view_sum[pid]
        views = (total / count).float()
        truth = truth[: len(views)]
        a, sigma = disclosure.view_noise(self.schedule, count)
        rows = [
            (str(pid), "linkage-top1", disclosure.linkage_top1(views, truth, a)),
            (str(pid), "linkage-chance", 1.0 / len(views)),
        ]
        latest, upload_shape, server_round = self.latest[pid]
        a1, b1 = disclosure.view_noise(self.schedule, 1)
        estimates = {
            "wiener": disclosure.wiener_estimate(views, a, sigma),
            "tweedie": disclosure.tweedie_estimate(server_net, self.schedule, views, count,
                                                   None if conditions is None else conditions[: len(views)]),
            "recompute": disclosure.recompute_estimate(
                latest, upload_shape, a1, b1, self.derivable_seeds(pid, server_round)),
        }
        for name, estimate in estimates.items():
            scores = disclosure.reconstruction_scores(estimate, truth)
            rows += [(str(pid), f"reconstruction-{k}-{name}", v) for k, v in scores.items()]
        rows += [(str(pid), f"membership-{k}", v)
                 for k, v in self._membership(pid, latest, server_net, conditions, server_round).items()]
        shown = views.clamp(-1, 1)
        for n in self.networks:
            rows += _rows(pid, "upload-", named_distances(
                n.fd_name, n.kid_name, truth_features[n.name][: len(views)], n.features(shown)))
        return rows

    def _membership(self, pid: int, members: torch.Tensor, server_net, conditions: torch.Tensor | None,
                    server_round: int) -> dict[str, float]:
        """The membership attack (disclosure.membership_attack) on the first views `members`
        (m, C, H, W) of client `pid`'s latest upload, with the server's conditions of its
        uploads `conditions` (None: unconditional), against as many of its held-out images
        made into views as the client makes uploads; {} when the client has fewer than two."""
        data = client_data(self.config, pid)
        n = min(len(members), len(data.held_out))
        if n < 2:
            return {}
        x0 = privacy.bound_images(data.held_out[:n], self.config.clip_norm)
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(
            public_seed(self.config.seed, "membership-views", server_round, pid)))
        others = self.schedule.noise_to_cut(x0, eps).to(getattr(torch, self.config.upload_dtype)).float()
        raw = None if data.held_out_conditions is None else data.held_out_conditions[:n]
        other_conditions = self.conditioning.server_conditions(pid, raw, n)
        seed = public_seed(self.config.seed, "membership-draws", server_round, pid)

        def scores(views: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
            return disclosure.membership_scores(
                lambda x, g, cc: self.protocol.server_loss(server_net, x, g, cc, per_image=True), views, c,
                torch.Generator().manual_seed(seed))

        return disclosure.membership_attack(scores(members[:n], None if conditions is None else conditions[:n]),
                                            scores(others, other_conditions))


def _rows(client, prefix: str, values: dict[str, float]) -> list[tuple[str, str, float]]:
    return [(str(client), prefix + k, v) for k, v in values.items()]
