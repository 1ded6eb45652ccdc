"""Who is who, what was sent to whom, and what came back: shared by the server strategies.

`Parties` assigns each Flower node a partition id with the first message it sends the node
(nodes in node-id order take the lowest free ids; a node keeps its id for the whole run and no
reply can change it), picks the clients each phase addresses (with `clients-per-round`, a
sample drawn afresh every training round; with `eval-clients`, one sample for every
evaluation; both from public streams of the seed, so a resumed run draws the same), stamps
every message with the round, the node's partition id and the run key (the name of the run
that clients use for their own state), names nodes by partition in metrics.csv, remembers
every outgoing message and its size until the replies are written, and sorts the replies of a
phase into accepted ones and faults:

    raised    the ClientApp raised (Flower's error reply carries the reason);
    rejected  the reply broke the protocol: it answers no message this phase sent to its node
              (or answers one twice), or its content fails validation (`wire.UploadRejected`:
              records, keys, types, decoded dtype, shape, count, values); any other error
              while reading a reply is a rejection too, so no reply can abort a round;
    missing   no reply within `round-timeout-seconds` (timed out, crashed or vanished), or the
              SuperLink answered in the node's place (an error reply from the SuperLink's own
              node id to the message sent to the node: the node went offline or the message
              expired before it answered).

Every fault is logged with its reason (Flower's log and log.txt) and becomes a metrics.csv row
`<phase>-fault-<kind>` = 1 for the client. A phase with fewer than `min-replies` accepted replies
stops the run (`RoundFailed`); the last completed round's checkpoint stays, so the run resumes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import log

from collafuse_flwr import wire
from collafuse_flwr.config import RunConfig
from collafuse_flwr.run_dir import RunDirectory
from collafuse_flwr.seeds import public_seed

FAULT_KINDS = ("raised", "rejected", "missing")


class RoundFailed(RuntimeError):
    """Fewer than `min-replies` clients replied acceptably in a phase of a round."""


@dataclass(frozen=True)
class Received:
    """One accepted reply: the partition it speaks for, what it carried, its size in bytes."""

    partition_id: int
    payload: Any
    nbytes: int


def drawn_partitions(num_clients: int, count: int, seed: int) -> list[int]:
    """`count` of the partition ids 0 .. num_clients - 1 drawn without replacement, uniformly,
    from the public stream `seed` (a torch permutation), in increasing order; all of them when
    `count` is `num_clients`."""
    if count == num_clients:
        return list(range(num_clients))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_clients, generator=generator)[:count].tolist())


class Parties:
    """The node <-> partition-id binding, which clients each phase addresses, the ledger of
    sent messages, the fault log.

    Args:
        config: the run config (num-clients: valid ids are 0 .. num_clients - 1;
            clients-per-round, eval-clients and the seed: which of them a phase addresses;
            min-replies: accepted replies a phase needs to proceed).
        run_dir: the run directory (faults are written to its log.txt with their reasons).
        run_key: the run's key (32 hex digits), sent with every message.
    """

    def __init__(self, config: RunConfig, run_dir: RunDirectory, run_key: str):
        self.config = config
        self.run_dir = run_dir
        self.run_key = run_key
        self.partition_of: dict[int, int] = {}  # node id -> partition id, assigned by the server
        self.sent: list[tuple] = []  # (round, node id or party, metric, value) of the current phase
        self.awaiting: dict[int, Message] = {}  # node id -> the message of the current phase sent to it

    def assign(self, nodes: Iterable[int]) -> list[int]:
        """Give every node of `nodes` without a partition id the lowest free one (in node-id
        order); return the nodes that have one, in partition-id order. Nodes beyond
        `num_clients` get none and are sent nothing."""
        nodes = set(nodes)
        for node in sorted(nodes - set(self.partition_of)):
            free = sorted(set(range(self.config.num_clients)) - set(self.partition_of.values()))
            if free:
                self.partition_of[node] = free[0]
        return sorted((n for n in nodes if n in self.partition_of), key=self.partition_of.get)

    def train_partitions(self, server_round: int) -> list[int]:
        """The partitions a training round addresses: `clients-per-round` of them drawn afresh
        every round from the public stream ("clients", round); all without it."""
        c = self.config
        return drawn_partitions(c.num_clients, c.train_clients, public_seed(c.seed, "clients", server_round))

    def eval_partitions(self) -> list[int]:
        """The partitions an evaluation addresses: `eval-clients` of them drawn once from the
        public stream "eval-clients" (all without it), the same at every evaluation and in every
        run of the seed, so evaluations compare the same clients across rounds and strategies."""
        c = self.config
        return drawn_partitions(c.num_clients, c.evaluated_clients, public_seed(c.seed, "eval-clients"))

    def trained_by(self, server_round: int) -> set[int]:
        """The partitions addressed by at least one training round up to `server_round`."""
        if self.config.train_clients == self.config.num_clients:
            return set(range(self.config.num_clients))
        return {pid for r in range(1, server_round + 1) for pid in self.train_partitions(r)}

    def nodes_of(self, nodes: Iterable[int], partitions: Iterable[int]) -> list[int]:
        """The nodes of `nodes` (given partition ids by `assign`) that hold one of `partitions`,
        in partition-id order. A drawn partition whose node is absent is simply not addressed:
        what is drawn depends on the seed alone, never on node ids or on who is online."""
        wanted = set(partitions)
        return [node for node in self.assign(nodes) if self.partition_of[node] in wanted]

    def address(self, server_round: int, messages: Iterable[Message], metric: str) -> list[Message]:
        """The messages (one per node) to nodes with a partition id, each with its own config
        record stamped with server-round, partition-id and run-key; remembered as this phase's
        (replies must answer them) with their sizes as (round, node id, `metric`, bytes), the
        evaluation's feature network (`wire.FEATURE_NETWORK`, measurement only) apart as
        (round, node id, "bytes-down-evaluation", bytes)."""
        messages = list(messages)
        nodes = set(self.assign(m.metadata.dst_node_id for m in messages))
        stamped = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in nodes:
                continue
            content = RecordDict({k: v for k, v in msg.content.items() if k != "config"})
            config = dict(msg.content.config_records.get("config", ConfigRecord()))
            content["config"] = ConfigRecord({**config, "server-round": server_round,
                                              "partition-id": self.partition_of[node], "run-key": self.run_key})
            msg.content = content
            stamped.append(msg)
        self.sent = []
        for m in stamped:
            total, node = wire.content_bytes(m.content), m.metadata.dst_node_id
            measured = (wire.content_bytes(RecordDict({wire.FEATURE_NETWORK: m.content[wire.FEATURE_NETWORK]}))
                        if wire.FEATURE_NETWORK in m.content else 0)
            self.sent.append((server_round, node, metric, float(total - measured)))
            if measured:
                self.sent.append((server_round, node, "bytes-down-evaluation", float(measured)))
        self.awaiting = {m.metadata.dst_node_id: m for m in stamped}
        return stamped

    def check_partition(self, node: int, metrics: dict) -> int:
        """The partition id assigned to `node`, if the reply's "partition-id" repeats it;
        raises `wire.UploadRejected` otherwise."""
        pid = metrics.get("partition-id")
        if node not in self.partition_of or pid != self.partition_of[node]:
            raise wire.UploadRejected(f"partition-id {pid!r} is not the one assigned to node {node}")
        return pid

    def label(self, node: int) -> str:
        """The partition id assigned to a node, else "node-<id>"."""
        return str(self.partition_of[node]) if node in self.partition_of else f"node-{node}"

    def sent_rows(self) -> list[tuple]:
        """The remembered rows for metrics.csv, nodes named by partition id; clears the ledger."""
        rows = [(r, self.label(node) if isinstance(node, int) else node, m, v) for r, node, m, v in self.sent]
        self.sent = []
        return rows

    def receive(
        self, server_round: int, phase: str, replies: Iterable[Message],
        read: Callable[[Message], tuple[int, Any]],
    ) -> tuple[list[Received], list[tuple]]:
        """Sort a phase's replies into accepted ones and faults.

        A reply counts only if it answers the message this phase sent to its source node, and
        only once. `read(reply)` validates it and returns (partition id, payload), raising
        `wire.UploadRejected` for a reply that breaks the protocol. Returns the accepted replies
        in partition-id order (arrival order must not change what the server computes) and the
        metrics.csv rows of the faults. Raises `RoundFailed` below `min_replies` accepted.
        """
        received, rows, answered, unavailable = [], [], set(), {}
        awaited_by_message = {m.metadata.message_id: n for n, m in self.awaiting.items()}
        for reply in replies:
            node = reply.metadata.src_node_id
            absent = awaited_by_message.get(reply.metadata.reply_to_message_id)
            if node == SUPERLINK_NODE_ID and reply.has_error() and absent is not None and absent not in answered:
                unavailable[absent] = f"the SuperLink answered for it: {reply.error.reason}"
                continue
            sent = self.awaiting.get(node)
            if sent is None or node in answered or reply.metadata.reply_to_message_id != sent.metadata.message_id:
                reason = "a second reply" if node in answered else "answers no message sent to this node in this phase"
                rows.append(self._fault(server_round, phase, node, "rejected", reason))
                continue
            answered.add(node)
            if reply.has_error():
                rows.append(self._fault(server_round, phase, node, "raised", reply.error.reason))
                continue
            try:
                pid, payload = read(reply)
            except Exception as err:  # noqa: BLE001 - whatever a reply holds, it is the client's fault
                reason = str(err) if isinstance(err, wire.UploadRejected) else f"{type(err).__name__}: {err}"
                rows.append(self._fault(server_round, phase, node, "rejected", reason))
                continue
            received.append(Received(pid, payload, wire.content_bytes(reply.content)))
        expected, self.awaiting = set(self.awaiting), {}
        for node in sorted(expected - answered):
            reason = unavailable.get(node, "no reply within round-timeout-seconds")
            rows.append(self._fault(server_round, phase, node, "missing", reason))
        if expected and len(received) < self.config.min_replies:
            raise RoundFailed(
                f"round {server_round} {phase}: {len(received)} accepted replies, min-replies="
                f"{self.config.min_replies}; {len(rows)} client(s) failed (see log.txt)"
            )
        return sorted(received, key=lambda r: r.partition_id), rows

    def _fault(self, server_round: int, phase: str, node: int, kind: str, reason: str) -> tuple:
        """Log a client's fault with its reason; its metrics.csv row."""
        line = f"round {server_round} {phase}: client {self.label(node)} (node {node}) {kind}: {reason}"
        log(WARNING, line)
        self.run_dir.append_log(line)
        return (server_round, self.label(node), f"{phase}-fault-{kind}", 1.0)
