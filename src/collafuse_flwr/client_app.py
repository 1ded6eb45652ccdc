"""The ClientApp: Flower glue only. The federation query answers with the number of SuperNodes
a simulation gives this node (nothing in a deployment). Each other handler reads the round
context from the message (clients/round.py; for evaluation with what the client releases,
clients/evaluation.py) on the run config as the client reads it (its own weights files,
clients/release.py), calls the configured client behaviour (clients/collafuse.py or
clients/fedavg.py) and replies (a client that declines to evaluate says why:
clients/release.py); injected faults are a mod around training (clients/faults.py)."""

from __future__ import annotations

from logging import WARNING

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import NUM_PARTITIONS_KEY
from flwr.common.logger import log

from collafuse_flwr.clients import collafuse, fedavg
from collafuse_flwr.clients.evaluation import EvaluationRound
from collafuse_flwr.clients.faults import inject_faults
from collafuse_flwr.clients.release import ReleaseDeclined, own_context
from collafuse_flwr.clients.round import ClientRound
from collafuse_flwr.clients.state import simulation_size

app = ClientApp()


def behaviour(client: ClientRound):
    """The client module of the run's strategy (CollaFuse and its published variant, or FedAvg)."""
    return fedavg if client.protocol.variant == "full-chain" else collafuse


@app.query("federation")
def federation(msg: Message, context: Context) -> Message:
    """The `num-partitions` of this SuperNode's node config (the size of a simulation's
    federation), or an empty record where the node config has none."""
    size = simulation_size(context.node_config)
    record = ConfigRecord({NUM_PARTITIONS_KEY: size} if size is not None else {})
    return Message(content=RecordDict({"federation": record}), reply_to=msg)


@app.train(mods=[inject_faults])
def train(msg: Message, context: Context) -> Message:
    client = ClientRound.from_message(msg, own_context(context))
    return Message(content=behaviour(client).train(client, msg.content), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    try:
        client = EvaluationRound.from_message(msg, context)
        content = behaviour(client).evaluate(client, msg.content)
    except ReleaseDeclined as declined:  # the client's own choice, settled before any work
        log(WARNING, "declined to evaluate: %s", declined)
        content = declined.reply()
    return Message(content=content, reply_to=msg)
