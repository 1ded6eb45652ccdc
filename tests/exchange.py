"""Playing Flower's grid in unit tests: the strategy's messages are sent (given message ids, as
Flower's grid does when it pushes them) and clients answer them."""

from __future__ import annotations

from uuid import uuid4

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict


class Grid:
    """The part of Flower's grid a strategy's configure_* methods use: the node ids."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def send(messages) -> dict[int, Message]:
    """The messages as Flower's grid pushes them (each gets a message id), by destination node."""
    sent = {}
    for msg in messages:
        msg.metadata.__dict__["_message_id"] = uuid4().hex
        sent[msg.metadata.dst_node_id] = msg
    return sent


def send_train(strategy, nodes, server_round: int = 1, arrays: ArrayRecord | None = None) -> dict[int, Message]:
    """The strategy's train messages of `server_round` to `nodes`, sent."""
    arrays = ArrayRecord() if arrays is None else arrays
    return send(strategy.configure_train(server_round, arrays, ConfigRecord(), Grid(nodes)))


def answer(sent: Message, content: RecordDict) -> Message:
    """A client's reply to the message `sent`."""
    return Message(content, reply_to=sent)

