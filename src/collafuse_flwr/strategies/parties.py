"""Who is who, what was sent to whom, and what came back: shared by the server strategies.

`Parties` binds each Flower node to the partition id it reported in training (one node per
partition, never changing), names nodes by partition in metrics.csv, remembers the size of
every outgoing message until the replies are written, and sorts the replies of a phase into
accepted ones and faults:

    raised    the ClientApp raised (Flower's error reply carries the reason);
    rejected  the reply broke the protocol (`wire.UploadRejected`: shape, dtype, values, records);
    missing   no reply within `round-timeout-seconds` (timed out, crashed or vanished).

Every fault is logged with its reason (Flower's log and log.txt) and becomes a metrics.csv row
`<phase>-fault-<kind>` = 1 for the client. A phase with fewer than `min-replies` accepted replies
stops the run (`RoundFailed`); the last completed round's checkpoint stays, so the run resumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any, Callable, Iterable

from flwr.app import Message, MetricRecord
from flwr.common.logger import log

from collafuse_flwr import wire
from collafuse_flwr.outputs import append_log

FAULT_KINDS = ("raised", "rejected", "missing")


class RoundFailed(RuntimeError):
    """Fewer than `min-replies` clients replied acceptably in a phase of a round."""


@dataclass(frozen=True)
class Received:
    """One accepted reply: the partition it speaks for, what it carried, its size in bytes."""

    partition_id: int
    payload: Any
    nbytes: int


class Parties:
    """The node <-> partition-id binding, the ledger of sent messages, the fault log.

    Args:
        num_clients: the number of partitions (valid ids are 0 .. num_clients - 1).
        run_dir: where log.txt is (faults are written there with their reasons).
        min_replies: accepted replies a phase needs to proceed.
    """

    def __init__(self, num_clients: int, run_dir: Path, min_replies: int = 1):
        self.num_clients = num_clients
        self.run_dir = run_dir
        self.min_replies = min_replies
        self.partition_of: dict[int, int] = {}  # node id -> partition id
        self.sent: list[tuple] = []  # (round, node id or party, metric, value) of the current phase
        self.awaiting: set[int] = set()  # nodes sent a message in the current phase

    def claim(self, node: int, metrics: MetricRecord) -> int:
        """The partition id a training reply claims, if valid and not claimed by another node;
        raises `wire.UploadRejected` otherwise."""
        pid = metrics.get("partition-id")
        if not isinstance(pid, int) or not 0 <= pid < self.num_clients:
            raise wire.UploadRejected(f"partition-id {pid!r} outside [0, {self.num_clients})")
        claimed = {p: n for n, p in self.partition_of.items()}
        if claimed.get(pid, node) != node or self.partition_of.get(node, pid) != pid:
            raise wire.UploadRejected(f"partition-id {pid} claimed by more than one node")
        self.partition_of[node] = pid
        return pid

    def label(self, node: int) -> str:
        """The partition id a node reported in training, else "node-<id>"."""
        return str(self.partition_of[node]) if node in self.partition_of else f"node-{node}"

    def order(self, node: int) -> int:
        """Sort key and seed index of a node: its partition id once known, else its node id."""
        return self.partition_of.get(node, node)

    def count_sent(self, server_round: int, messages: list[Message], metric: str) -> None:
        """Remember the size of every outgoing message as (round, node id, metric, bytes) and
        which nodes now owe a reply."""
        self.sent = [
            (server_round, m.metadata.dst_node_id, metric, float(wire.content_bytes(m.content))) for m in messages
        ]
        self.awaiting = {m.metadata.dst_node_id for m in messages}

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

        `read(reply)` validates one reply and returns (partition id, payload), raising
        `wire.UploadRejected` for a reply that breaks the protocol. Returns the accepted replies
        in partition-id order (arrival order must not change what the server computes) and the
        metrics.csv rows of the faults. Raises `RoundFailed` below `min_replies` accepted.
        """
        received, rows, answered = [], [], set()
        for reply in replies:
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                rows.append(self._fault(server_round, phase, node, "raised", reply.error.reason))
                continue
            try:
                pid, payload = read(reply)
            except wire.UploadRejected as err:
                rows.append(self._fault(server_round, phase, node, "rejected", str(err)))
                continue
            received.append(Received(pid, payload, wire.content_bytes(reply.content)))
        expected, self.awaiting = self.awaiting | answered, set()
        for node in sorted(expected - answered):
            rows.append(self._fault(server_round, phase, node, "missing", "no reply within round-timeout-seconds"))
        if expected and len(received) < self.min_replies:
            raise RoundFailed(
                f"round {server_round} {phase}: {len(received)} accepted replies, min-replies="
                f"{self.min_replies}; {len(rows)} client(s) failed (see log.txt)"
            )
        return sorted(received, key=lambda r: r.partition_id), rows

    def _fault(self, server_round: int, phase: str, node: int, kind: str, reason: str) -> tuple:
        """Log a client's fault with its reason; its metrics.csv row."""
        line = f"round {server_round} {phase}: client {self.label(node)} (node {node}) {kind}: {reason}"
        log(WARNING, line)
        append_log(self.run_dir, line)
        return (server_round, self.label(node), f"{phase}-fault-{kind}", 1.0)
