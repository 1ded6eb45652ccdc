"""A run without Flower's runtime: the ServerApp's setup and strategy loop and the ClientApp's
handlers, with each message handed from one to the other inside this process.

`run_in_process` does what the ServerApp does (`prepare_run`, then the strategy's `start`, the
loop Flower runs) on an `InProcessGrid`, whose `send_and_receive` calls the ClientApp (with its
mods, as a SuperNode would) on every message, one after another, and returns the replies. No
SuperLink, SuperNode, Ray actor, serialisation or network takes part: the difference in wall
time from a `flwr run` of the same config is what Flower's runtime costs
(benchmarks/flower_overhead.py), and tests get whole runs in seconds. The clients are simulated
ones (`client-data` "partition"), each with its own state below `state_root`, as SuperNodes of
a simulation with `num-partitions` = `num-clients`. A ClientApp that raises gives the error reply
Flower's simulation gives. Measurement and tests only: `flwr run` is how the project runs.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from collafuse_flwr import client_app
from collafuse_flwr.config import RunConfig
from collafuse_flwr.run_dir import RunDirectory
from collafuse_flwr.strategies.setup import prepare_run

FIRST_NODE_ID = 1001  # node ids as a SuperLink gives them: arbitrary, not partition ids


class InProcessGrid(Grid):
    """The part of Flower's `Grid` a strategy uses, delivering every message to the ClientApp
    of its destination node in this process.

    Args:
        run_config: the run config every node's context carries (Flower's kebab-case dict).
        state_root: the clients' private state root; node k keeps its state below
            `state_root`/node-k (node config `state-dir`).
        num_nodes: the SuperNodes (node ids `FIRST_NODE_ID` + k).
        run_id: the Flower run id of the contexts.
    """

    def __init__(self, run_config: dict[str, Any], state_root: Path, num_nodes: int, run_id: int = 1):
        self.run_id = run_id
        self.contexts = {
            FIRST_NODE_ID + k: Context(
                run_id=run_id, node_id=FIRST_NODE_ID + k, state=RecordDict(), run_config=dict(run_config),
                node_config={"num-partitions": num_nodes, "state-dir": str(Path(state_root) / f"node-{k}")},
            )
            for k in range(num_nodes)
        }
        self.replies: dict[str, Message] = {}

    def set_run(self, run) -> None:  # the run is this process's
        raise NotImplementedError("an in-process grid belongs to one run")

    @property
    def run(self):
        raise NotImplementedError("an in-process grid has no Flower run record")

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node's ClientApp now; keep the reply for `pull_messages`."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid4().hex
            ids.append(message.metadata.message_id)
            self.replies[message.metadata.message_id] = self._deliver(message)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(message_id) for message_id in message_ids if message_id in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, message: Message) -> Message:
        """The ClientApp's reply to `message`, or the error reply Flower's simulation makes
        when it raises (code CLIENT_APP_RAISED_EXCEPTION, the exception as the reason)."""
        context = self.contexts[message.metadata.dst_node_id]
        with _task(self.run_id, context.node_id):
            try:
                reply = client_app.app(message, context)
            except Exception as err:  # noqa: BLE001 - a raising client is a fault the server records
                reason = f"{type(err)}:<'{err}'>\n{traceback.format_exc(limit=3)}"
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
        reply.metadata.__dict__["_message_id"] = uuid4().hex
        return reply


@contextlib.contextmanager
def _task(run_id: int, node_id: int) -> Iterator[None]:
    """Act as Flower's task of `node_id` in run `run_id` (messages can only be built inside a
    task), restoring the previous identity afterwards."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = run_id, 1, node_id
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def run_in_process(run_config: dict[str, Any], state_root: Path, run_id: int = 1) -> RunDirectory:
    """Run (or resume) the run of `run_config` as the ServerApp would (`prepare_run`, then the
    strategy's `start`) on an `InProcessGrid` of `num-clients` nodes whose private state lives
    below `state_root`; return its run directory."""
    config = RunConfig.from_flower(run_config)
    grid = InProcessGrid(run_config, state_root, config.num_clients, run_id)
    with _task(run_id, 0):  # the ServerApp's messages, like its replies' counterparts, need a task
        run = prepare_run(config, run_id)
        run.start(grid)
    return run.run_dir
