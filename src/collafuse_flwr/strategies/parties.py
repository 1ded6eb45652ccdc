"""Who is who, and what was sent to whom: shared by the server strategies.

`Parties` binds each Flower node to the partition id it reported in training (one node per
partition, never changing), names nodes by partition in metrics.csv, and remembers the size of
every outgoing message until the replies are written.
"""

from __future__ import annotations

from flwr.app import Message, MetricRecord

from collafuse_flwr import wire


class Parties:
    """The node <-> partition-id binding and the ledger of sent message sizes."""

    def __init__(self, num_clients: int):
        self.num_clients = num_clients
        self.partition_of: dict[int, int] = {}  # node id -> partition id
        self.sent: list[tuple] = []  # (round, node id or party, metric, value) of the current phase

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
        """Remember the size of every outgoing message as (round, node id, metric, bytes)."""
        self.sent = [
            (server_round, m.metadata.dst_node_id, metric, float(wire.content_bytes(m.content))) for m in messages
        ]

    def sent_rows(self) -> list[tuple]:
        """The remembered rows for metrics.csv, nodes named by partition id; clears the ledger."""
        rows = [(r, self.label(node) if isinstance(node, int) else node, m, v) for r, node, m, v in self.sent]
        self.sent = []
        return rows
