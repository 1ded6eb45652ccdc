"""CollaFuseStrategy: the server's side of the split chain, as a Flower Message-API strategy.

Each round:
  configure_train   -> a train message per client of the round (all, or the round's draw of
                       clients-per-round) carrying only config (no weights);
  aggregate_train   -> validate every client's cut-point uploads x_{t_zeta} (and, with
                       server-condition "full", their conditions), pool them and train the
                       server denoiser on t in (t_zeta, T] by the sub-chain loss, conditioned
                       on the server's condition of each upload (diffusion/conditions.py);
  configure_evaluate-> (on evaluation rounds) run the server's half of the sampler from T
                       down to t_zeta for every evaluated client in one batched pass,
                       conditioned on the client ("client-id") or on the conditions it
                       requested ("full"), and send each client its handed-over states;
  aggregate_evaluate-> collect each client's quality and cost figures, compute the pooled
                       quality row from the clients' features, run the disclosure audit
                       (metrics/audit.py) and rewrite summary.json.
Every round also records what each party computed (NFEs, FLOPs, seconds) and the bytes of
every message each way (metrics.csv, long format).
The server denoiser, its optimizer, RNG, pool and audit views live here and are checkpointed
at the end of every round (checkpoint.py); a resumed run continues after the last one.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from collafuse_flwr import wire
from collafuse_flwr.checkpoint import Checkpoint, save_checkpoint
from collafuse_flwr.config import RunConfig
from collafuse_flwr.diffusion.conditions import run_conditioning
from collafuse_flwr.diffusion.models import Denoiser
from collafuse_flwr.diffusion.protocol import Protocol
from collafuse_flwr.diffusion.sampling import initial_noise
from collafuse_flwr.diffusion.training import train_for_images
from collafuse_flwr.metrics.audit import DisclosureAudit
from collafuse_flwr.metrics.cost import sampling_cost, train_cost
from collafuse_flwr.metrics.features import FeatureNetwork
from collafuse_flwr.outputs import save_grid
from collafuse_flwr.run_dir import RunDirectory
from collafuse_flwr.seeds import public_seed
from collafuse_flwr.strategies.evaluation import (
    evaluation_digests,
    evaluation_rows,
    feature_network_record,
    write_evaluation,
)
from collafuse_flwr.strategies.parties import Parties
from collafuse_flwr.strategies.rounds import ResumableRounds


class CollaFuseStrategy(ResumableRounds, Strategy):
    """Trains the shared server denoiser on the pooled cut-point uploads of all clients.

    Args:
        config: the validated run config.
        run_dir: the run directory, the server's alone (metrics, log, sample grids,
            checkpoints; the disclosure audit's feature cache beside it).
        run_key: the run's key (32 hex digits) sent with every message; clients keep their own
            state of the run under it, below a directory they choose.
        denoiser: the server denoiser (a diffusers UNet2DModel) with optimizer and EMA.
        image_shape: (C, H, W) of the dataset's images, for validating uploads.
        networks: the feature networks available here (the pooled row and the audit); the
            first, fd_classifier's, goes to the clients with every evaluate message.
        notes: what summary.json says beside the numbers (e.g. skipped metrics).
    """

    def __init__(
        self,
        config: RunConfig,
        run_dir: RunDirectory,
        run_key: str,
        denoiser: Denoiser,
        image_shape: tuple[int, int, int],
        networks: list[FeatureNetwork],
        notes: dict[str, object],
    ):
        self.config = config
        self.run_dir = run_dir
        self.denoiser = denoiser
        self.image_shape = image_shape
        self.networks = networks
        self.notes = notes
        self.protocol = Protocol.of(config)
        self.generator = torch.Generator().manual_seed(public_seed(config.seed, "server-train"))
        self.uploads: dict[int, torch.Tensor] = {}  # partition id -> latest x_{t_zeta}
        self.conditioning = run_conditioning(config)
        self.conditions: dict[int, torch.Tensor] = {}  # partition id -> the server's condition of each upload
        self.requested: dict[int, torch.Tensor] = {}  # partition id -> raw conditions it asks for ("full")
        self.parties = Parties(config, run_dir, run_key)
        self.audit = DisclosureAudit(config, self.protocol, self.conditioning, networks, run_dir.features_cache)

    def initial_arrays(self) -> ArrayRecord:
        """Nothing: the server's denoiser never leaves the server (train messages carry config only)."""
        return ArrayRecord()

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue after `checkpoint`'s round: its RNG state, pool of uploads with their
        conditions, the requested conditions and audit views (the denoiser was loaded from the
        same checkpoint)."""
        state = checkpoint.strategy_state
        self.generator.set_state(state["generator"])
        self.uploads, self.conditions, self.requested = state["uploads"], state["conditions"], state["requested"]
        self.audit.load_state(state["audit"])
        super().restore(checkpoint)

    def checkpoint(self, server_round: int) -> None:
        """Checkpoint the end of `server_round`: denoiser, RNG, pool, conditions, audit views."""
        state = {"generator": self.generator.get_state(), "uploads": self.uploads, "conditions": self.conditions,
                 "requested": self.requested, "audit": self.audit.state()}
        save_checkpoint(self.run_dir, server_round, self.config, self.denoiser, state)

    def summary(self) -> None:
        c = self.config
        log(
            INFO,
            "CollaFuse: T=%d, t_zeta=%d (clients t<=%d, server t>%d), %d clients, "
            "budgets per round: client %d / server %d images",
            c.timesteps, c.t_zeta, c.t_zeta, c.t_zeta, c.num_clients,
            c.client_images_per_round, c.server_images_per_round,
        )

    # ----------------------------------------------------------------- training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One train message per client of the round (`Parties.train_partitions`); it carries
        config only, never weights."""
        nodes = self.parties.nodes_of(grid.get_node_ids(), self.parties.train_partitions(server_round))
        messages = [Message(RecordDict(), dst_node_id=node, message_type="train") for node in nodes]
        return self.parties.address(server_round, messages, "bytes-down-train")

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the uploads, pool them, train the server denoiser for its budget."""
        rows, clients = self._receive_uploads(server_round, replies)
        server_rows, server = self._train_server(server_round)
        self.run_dir.append_metrics(self.parties.sent_rows() + rows + server_rows)
        line = (
            f"round {server_round}/{self.config.num_server_rounds} "
            f"| {clients['clients-accepted']}/{self.config.train_clients} clients accepted "
            f"| client loss {clients['client-train-loss']:.4f} "
            f"| server loss {server['loss']:.4f} | images seen: clients "
            f"{clients['client-images-seen']}, server {server['images-seen']} "
            f"| uploaded {clients['bytes-uploaded'] / 1e6:.2f} MB "
            f"| server train {server['seconds']:.1f}s"
        )
        log(INFO, line)
        self.run_dir.append_log(line)
        return None, MetricRecord({**clients, "server-train-loss": server["loss"]})

    def _receive_uploads(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[list[tuple], dict]:
        """Validate every reply; keep each client's latest accepted x_{t_zeta} in the pool with
        the server's condition of each (a client that fails this round keeps its earlier
        upload there) and, under "full", the conditions it will request.

        Returns metrics.csv rows per client (and per fault; conditions-received counts the raw
        conditions the client sent; epsilon is the guarantee of the distinct views of each of
        its images received so far, privacy.py, assuming it bounds its images as configured:
        the server cannot check that) and a summary over the accepted replies.
        """
        c = self.config
        receives = self.conditioning.server_receives_conditions

        def read(reply: Message) -> tuple[int, tuple]:
            x_cut, metrics = wire.unpack_uploads(
                reply.content, self.image_shape, self.config.upload_dtype, self.config.max_uploads_per_client,
                self.config.client_images_per_round, with_conditions=receives,
            )
            pid = self.parties.check_partition(reply.metadata.src_node_id, metrics)
            raw = requested = None
            if receives and x_cut.shape[0]:
                space = self.conditioning.server
                raw, requested = wire.unpack_conditions(reply.content, space.raw_kind, space.raw_width,
                                                        x_cut.shape[0], self.config.eval_num_samples)
            elif wire.CONDITIONS in reply.content:
                raise wire.UploadRejected("conditions sent without uploads")
            return pid, (x_cut, metrics, raw, requested)

        received, rows = self.parties.receive(server_round, "train", replies, read)
        losses = []
        for reply in received:
            x_cut, metrics, raw, requested = reply.payload
            self.uploads[reply.partition_id] = x_cut
            conditions = self.conditioning.server_conditions(reply.partition_id, raw, x_cut.shape[0])
            if conditions is not None:
                self.conditions[reply.partition_id] = conditions
            if requested is not None:
                self.requested[reply.partition_id] = requested
            sent = 0 if raw is None else len(raw) + len(requested)
            rows.append((server_round, str(reply.partition_id), "conditions-received", float(sent)))
            self.audit.record(reply.partition_id, x_cut, server_round)
            views = self.audit.views.get(reply.partition_id, 0)
            rows.append((server_round, str(reply.partition_id), "epsilon", self.config.upload_epsilon(c.t_zeta, views)))
            if metrics["images-seen"]:
                losses.append(float(metrics["train-loss"]))
            for key in sorted(wire.TRAIN_METRIC_KEYS - {"partition-id"}):
                rows.append((server_round, str(reply.partition_id), key, float(metrics[key])))
            rows.append((server_round, str(reply.partition_id), "bytes-up-train", float(reply.nbytes)))
        summary = {
            "client-train-loss": sum(losses) / len(losses) if losses else float("nan"),
            "client-images-seen": sum(int(r.payload[1]["images-seen"]) for r in received),
            "bytes-uploaded": sum(r.nbytes for r in received),
            "clients-accepted": len(received),
        }
        return rows, summary

    def _train_server(self, server_round: int) -> tuple[list[tuple], dict]:
        """Train the server denoiser on the pool for its budget."""
        start = time.perf_counter()
        # pool in partition-id order: reply arrival order must not change the training stream
        pids = sorted(self.uploads)
        pool = torch.cat([self.uploads[pid] for pid in pids]) if pids else torch.empty((0, *self.image_shape))
        conditions = torch.cat([self.conditions[pid] for pid in pids]) if self.conditions and pids else None
        budget = 0 if self.protocol.schedule.server_range.is_empty else self.config.server_images_per_round
        dropout = self.conditioning.dropout
        stats = train_for_images(
            self.denoiser, pool, budget, self.config.batch_size,
            lambda n, x, g, c: self.protocol.server_loss(n, x, g, c, dropout), self.generator, conditions,
        )
        stats["seconds"] = time.perf_counter() - start
        cost = train_cost(self.denoiser.net, self.image_shape, int(stats["images-seen"]))
        rows = [
            (server_round, "server", "train-loss", stats["loss"]),
            (server_round, "server", "images-seen", float(stats["images-seen"])),
            (server_round, "server", "pool-size", float(len(pool))),
            (server_round, "server", "train-seconds", stats["seconds"]),
        ] + [(server_round, "server", k, v) for k, v in cost.items()]
        return rows, stats

    # --------------------------------------------------------------- evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Run the server's half of the sampler (T down to the handover time: t_zeta, or
        T rho (2 - rho) for "published") for the evaluated clients (`Parties.eval_partitions`) in one
        batched pass, each from its own x_T and seed and conditioned on the server's condition
        for it, and send each its handed-over states (float32; `Protocol.hand_over`: clamped to
        [-1, 1] only by "published", and only where the state crosses between the parties). A
        client that cannot finish samples yet gets no message this round (logged): one never drawn
        for training while it owns steps below the cut (it has no denoiser), or, under "full", one
        that has never sent the conditions it requests."""
        if not self.config.is_eval_round(server_round):
            return []
        c = self.config
        sampler = self.protocol.sampler(c)
        net, feature_network = self.denoiser.for_sampling(), feature_network_record(self.networks)
        digests = evaluation_digests(c, self.networks)
        start = time.perf_counter()
        # seeds and grid rows follow the partition ids (node ids change from run to run)
        trained = self.parties.trained_by(server_round)
        nodes = [node for node in self.parties.nodes_of(grid.get_node_ids(), self.parties.eval_partitions())
                 if self._can_finish(server_round, self.parties.partition_of[node], sampler, trained)]
        pids = [self.parties.partition_of[node] for node in nodes]
        seeds = [public_seed(c.seed, "sample", server_round, pid) for pid in pids]
        conditions = [self.conditioning.server_conditions(pid, self.requested.get(pid), c.eval_num_samples)
                      for pid in pids]
        handovers = sampler.run_groups(
            net, [initial_noise(c.eval_num_samples, self.image_shape, seed) for seed in seeds], sampler.server_steps,
            seeds, None if self.conditioning.server is None else conditions,
        )
        messages = []
        for node, seed, x in zip(nodes, seeds, handovers, strict=True):
            x = self.protocol.hand_over(x, sampler)
            content = RecordDict({"config": ConfigRecord({"sample-seed": seed, **digests}),
                                  wire.HANDOVER: wire.pack_handover(x),
                                  wire.FEATURE_NETWORK: feature_network})
            messages.append(Message(content, dst_node_id=node, message_type="evaluate"))
        cost = sampling_cost(net, self.image_shape, c.eval_num_samples * len(messages), len(sampler.server_steps))
        messages = self.parties.address(server_round, messages, "bytes-down-sample")
        self.parties.sent += [(server_round, "server", k, v) for k, v in cost.items()]
        self.parties.sent.append((server_round, "server", "sample-seconds", time.perf_counter() - start))
        if handovers:
            save_grid(torch.cat([x[:8] for x in handovers]), self.run_dir.handover_grid(server_round), nrow=8)
        return messages

    def _can_finish(self, server_round: int, pid: int, sampler, trained: set[int]) -> bool:
        """Whether client `pid` can finish samples in `server_round` (see `configure_evaluate`;
        `trained`: the partitions drawn for training so far); logs why not."""
        if len(sampler.client_steps) and pid not in trained:
            reason = "was never drawn for training and has no denoiser"
        elif self.conditioning.server_receives_conditions and len(sampler.server_steps) and pid not in self.requested:
            reason = "sent no requested conditions yet"
        else:
            return True
        line = f"round {server_round} evaluate: client {pid} {reason}; not sampled"
        log(WARNING, line)
        self.run_dir.append_log(line)
        return False

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Write every client's quality and cost figures, the pooled quality row and the
        disclosure audit to metrics.csv; rewrite summary.json; return the clients' means."""
        rows, per_metric = evaluation_rows(server_round, replies, self.parties, self.networks, self.config,
                                           self.notes)
        if per_metric:
            audited = self._audit(server_round, self.parties.eval_partitions())
            rows += [(server_round, *row) for row in self.audit.view_rows()] + audited
        rows = self.parties.sent_rows() + rows
        means = write_evaluation(self.run_dir, self.config, self.notes, server_round, rows, per_metric)
        self.checkpoint(server_round)
        return means

    def _audit(self, server_round: int, pids: list[int]) -> list[tuple]:
        """The disclosure audit's rows for the clients `pids` (those drawn for evaluation); the
        server's own samples for it run the whole chain: one batch for all of them from an
        unconditional server, else one batched pass of a group per client, conditioned on what
        the server knows of it (`_server_only_conditions`)."""
        if not self.audit.enabled or not pids:
            return []
        start = time.perf_counter()
        c = self.config
        sampler = self.protocol.sampler(c)
        net = self.denoiser.for_sampling()
        seed = public_seed(c.seed, "server-only", server_round)
        x = initial_noise(c.eval_num_samples, self.image_shape, seed)
        if self.conditioning.server is None:
            images = sampler.run(net, x, sampler.all_steps, seed).clamp(-1, 1)
            server_only = dict.fromkeys(pids, images)
        else:
            groups = sampler.run_groups(net, [x] * len(pids), sampler.all_steps, [seed] * len(pids),
                                        [self._server_only_conditions(pid, server_round) for pid in pids])
            server_only = {pid: images.clamp(-1, 1) for pid, images in zip(pids, groups, strict=True)}
        shown = list({id(images): images[:8] for images in server_only.values()}.values())
        save_grid(torch.cat(shown), self.run_dir.server_only_grid(server_round), nrow=8)
        rows = [(server_round, client, metric, value)
                for client, metric, value in self.audit.measure(net, server_only, self.conditions or None)]
        return rows + [(server_round, "server", "disclosure-seconds", time.perf_counter() - start)]

    def _server_only_conditions(self, pid: int, server_round: int) -> torch.Tensor:
        """The conditions (eval-num-samples, d) of the server's own samples for client `pid`:
        its id ("client-id"), or a public random choice of its uploads' conditions ("full";
        the null condition for a client that sent none)."""
        n, space = self.config.eval_num_samples, self.conditioning.server
        if space.kind == "client":
            return self.conditioning.server_conditions(pid, None, n)
        known = self.conditions.get(pid)
        if known is None or not len(known):
            return torch.zeros(n, space.size)
        generator = torch.Generator().manual_seed(public_seed(self.config.seed, "server-only", server_round, pid))
        return known[torch.randint(len(known), (n,), generator=generator)]
