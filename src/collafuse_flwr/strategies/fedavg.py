"""The FedAvg baseline: Flower's own `FedAvg` averages full-chain denoisers (t in [1, T]).

What the subclass adds, and only that:
  configure_train    -> the round, partition id and run key in each message's config
                        (`Parties.address`); the size of every message recorded;
  aggregate_train    -> every reply validated against the weights sent (keys, shapes, dtypes,
                        finite, |w| bound, num-examples) and its partition id bound to its node
                        before FedAvg's weighted average (weights "num-examples") sees it;
                        per-client compute and bytes, the averaging time;
  configure_evaluate -> on evaluation rounds only, the averaged EMA weights (what sampling
                        uses) instead of the training state;
  aggregate_evaluate -> the same quality rows, pooled row and summary.json as CollaFuse, and
                        the round's checkpoint (the global model: weights, EMA).
Nothing but weights and counts leaves a client, so there is no image-disclosure audit.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from collafuse_flwr import wire
from collafuse_flwr.checkpoint import save_checkpoint
from collafuse_flwr.config import RunConfig
from collafuse_flwr.diffusion.models import Denoiser
from collafuse_flwr.metrics.features import FeatureNetwork
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


class FedAvgDiffusion(ResumableRounds, FedAvg):
    """FedAvg over the clients of each round: Flower's node sampling is asked for every node
    (fractions 1, minimum = num-clients) and the round's own draw (`Parties.train_partitions`,
    reproducible from the seed, unlike Flower's) keeps its clients; the average is over the
    accepted replies of the round.

    Args:
        config: the validated run config.
        run_dir: the run directory, the server's alone (metrics, log, checkpoints).
        run_key: the run's key (32 hex digits) sent with every message.
        model: the global denoiser (weights and EMA; its optimizer is unused): its state is the
            initial ArrayRecord and it holds the latest average.
        networks: the feature networks available here (the pooled row); the first,
            fd_classifier's, goes to the clients with every evaluate message.
        notes: what summary.json says beside the numbers.
    """

    def __init__(
        self,
        config: RunConfig,
        run_dir: RunDirectory,
        run_key: str,
        model: Denoiser,
        networks: list[FeatureNetwork],
        notes: dict[str, object],
    ):
        n = config.num_clients
        super().__init__(min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n)
        self.config = config
        self.run_dir = run_dir
        self.model = model
        self.networks = networks
        self.notes = notes
        self.parties = Parties(config, run_dir, run_key)
        self.sent_weights = wire.pack_weights(model.state())

    def initial_arrays(self) -> ArrayRecord:
        """The global model's state to start `Strategy.start` from."""
        return wire.pack_weights(self.model.state())

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's train messages (the global weights and EMA) to the clients of the round
        (`Parties.train_partitions`), stamped by `Parties.address`."""
        self.sent_weights = arrays
        nodes = set(self.parties.nodes_of(grid.get_node_ids(), self.parties.train_partitions(server_round)))
        messages = [m for m in super().configure_train(server_round, arrays, config, grid)
                    if m.metadata.dst_node_id in nodes]
        return self.parties.address(server_round, messages, "bytes-down-train")

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply, then FedAvg's weighted average of the accepted ones."""
        def read(reply: Message) -> tuple[int, tuple]:
            weights, metrics = wire.unpack_weights(
                reply.content, self.sent_weights, self.config.max_uploads_per_client,
                self.config.client_images_per_round,
            )
            pid = self.parties.check_partition(reply.metadata.src_node_id, metrics)
            # FedAvg averages exactly the validated values
            reply.content = RecordDict({wire.WEIGHTS: weights, wire.METRICS: MetricRecord(metrics)})
            return pid, (reply, metrics)

        received, rows = self.parties.receive(server_round, "train", replies, read)
        accepted = [r.payload[0] for r in received]
        for reply in received:
            metrics = reply.payload[1]
            for key in sorted(set(metrics) - {"partition-id"}):
                rows.append((server_round, str(reply.partition_id), key, float(metrics[key])))
            rows.append((server_round, str(reply.partition_id), "bytes-up-train", float(reply.nbytes)))
        rows = self.parties.sent_rows() + rows  # after the claims: round 1 names partitions too
        start = time.perf_counter()
        arrays, metrics = super().aggregate_train(server_round, accepted)
        if arrays is not None:
            self.model.load_state(wire.weights_state(arrays))
        seconds = time.perf_counter() - start
        rows.append((server_round, "server", "aggregate-seconds", seconds))
        self.run_dir.append_metrics(rows)
        line = (
            f"round {server_round}/{self.config.num_server_rounds} | FedAvg of {len(accepted)} clients "
            f"| client loss {metrics['train-loss'] if metrics else float('nan'):.4f} | averaging {seconds:.1f}s"
        )
        log(INFO, line)
        self.run_dir.append_log(line)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """On evaluation rounds, the averaged sampling weights (the EMA) to the evaluated
        clients (`Parties.eval_partitions`)."""
        if not self.config.is_eval_round(server_round):
            return []
        sampling = wire.pack_weights(self.model.sampling_state())
        feature_network, digests = feature_network_record(self.networks), evaluation_digests(self.config, self.networks)
        nodes = set(self.parties.nodes_of(grid.get_node_ids(), self.parties.eval_partitions()))
        messages = [m for m in super().configure_evaluate(server_round, sampling, config, grid)
                    if m.metadata.dst_node_id in nodes]
        for msg in messages:  # each its own config: the seed a CollaFuse client of this partition gets
            pid = self.parties.partition_of.get(msg.metadata.dst_node_id, -1)
            seed = public_seed(self.config.seed, "sample", server_round, pid)
            msg.content = RecordDict({wire.WEIGHTS: sampling,
                                      "config": ConfigRecord({**config, "sample-seed": seed, **digests}),
                                      wire.FEATURE_NETWORK: feature_network})
        return self.parties.address(server_round, messages, "bytes-down-sample")

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Quality and cost rows per client, the pooled row, summary.json."""
        rows, per_metric = evaluation_rows(server_round, replies, self.parties, self.networks, self.config, self.notes)
        rows = self.parties.sent_rows() + rows
        means = write_evaluation(self.run_dir, self.config, self.notes, server_round, rows, per_metric)
        save_checkpoint(self.run_dir, server_round, self.config, self.model, {})
        return means
