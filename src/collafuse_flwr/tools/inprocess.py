"""A run without Flower's runtime: the ServerApp's setup and strategy loop and the ClientApp's
handlers, with each message handed from one to the other inside this process.

`run_in_process` does what the ServerApp does (`federated_run`, then the strategy's `start`, the
loop Flower runs) on an `InProcessGrid`, whose `send_and_receive` calls the ClientApp (with its
mods, as a SuperNode would) on every message and returns the replies. No SuperLink, SuperNode,
Ray actor, serialisation or network takes part: the difference in wall time from a `flwr run`
of the same config is what Flower's runtime costs (benchmarks/flower_overhead.py), and tests
get whole runs in seconds. One client computes at a time, with `client_threads` torch threads
(None: the process's own, as the server's); a simulation runs cores / cpus-per-client Ray
actors at once, each with as many threads as CPUs (Ray sets OMP_NUM_THREADS). Clients run
one after another because they share the process's global torch RNG (the denoiser's
initialisation, KID's subsets), which a Ray actor has to itself. The clients are simulated
ones (`client-data` "partition") with their state below `state_root`, as SuperNodes of a
simulation with `num-partitions` = the number of nodes. A ClientApp that raises gives the
error reply Flower's simulation gives. Measurement and tests only: `flwr run` is how the project runs.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from collafuse_flwr import client_app
from collafuse_flwr.config import RunConfig
from collafuse_flwr.run_dir import RunDirectory
from collafuse_flwr.strategies.setup import federated_run
from collafuse_flwr.tools.launch import own_clients_settings

FIRST_NODE_ID = 1001  # node ids as a SuperLink gives them: arbitrary, not partition ids


class InProcessGrid(Grid):
    """The part of Flower's `Grid` a strategy uses, delivering every message to the ClientApp
    of its destination node in this process.

    Args:
        run_config: the run config every node's context carries (Flower's kebab-case dict).
        state_root: the clients' private state root (node config `state-dir`), as in a
            simulation: the client of partition k keeps its state below `state_root`/partition-k,
            so a `flwr run` with COLLAFUSE_CLIENT_STATE = `state_root` meets the same clients
            (their secrets) as a run in process. Their node configs also hold what a launcher
            gives the simulated clients of its own run (`launch.own_clients_settings`: trust in
            the run's evaluator, the run config's weights files) unless the environment sets it.
        num_nodes: the SuperNodes (node ids `FIRST_NODE_ID` + k).
        client_threads: torch's intra-op threads while clients compute (None: unchanged).
        run_id: the Flower run id of the contexts.
    """

    def __init__(self, run_config: dict[str, Any], state_root: Path, num_nodes: int,
                 client_threads: int | None = None, run_id: int = 1):
        self.contexts = {
            FIRST_NODE_ID + k: Context(
                run_id=run_id, node_id=FIRST_NODE_ID + k, state=RecordDict(), run_config=dict(run_config),
                node_config={"num-partitions": num_nodes, "state-dir": str(state_root),
                             **own_clients_settings(run_config, os.environ)},
            )
            for k in range(num_nodes)
        }
        self.client_threads = client_threads
        self.replies: dict[str, Message] = {}

    def set_run(self, run) -> None:
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
        """Deliver the messages to their nodes' ClientApps now, one after another; keep the
        replies for `pull_messages`."""
        ids = []
        with torch_threads(self.client_threads):
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
        """The ClientApp's reply to `message` (`client_reply`), with a message id."""
        reply = client_reply(client_app.app, message, self.contexts[message.metadata.dst_node_id])
        reply.metadata.__dict__["_message_id"] = uuid4().hex
        return reply


def client_reply(handler, message: Message, context: Context) -> Message:
    """`handler`'s (the ClientApp's, or one of its handlers') reply to `message`, or the error
    reply Flower's simulation makes when it raises (code CLIENT_APP_RAISED_EXCEPTION, the
    exception as the reason)."""
    try:
        return handler(message, context)
    except Exception as err:  # noqa: BLE001 - a raising client is a fault the server records
        reason = f"{type(err)}:<'{err}'>\n{traceback.format_exc(limit=3)}"
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `count` (None: unchanged) for the block."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _server_task(run_id: int) -> Iterator[None]:
    """Act as the ServerApp's Flower task of run `run_id` (the messages it creates carry the
    task's identity), restoring the previous identity afterwards."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = run_id, 1, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def run_in_process(run_config: dict[str, Any], state_root: Path, client_threads: int | None = None,
                   run_id: int = 1, num_supernodes: int | None = None) -> RunDirectory:
    """Run (or resume) the run of `run_config` as the ServerApp would (`federated_run`, then the
    strategy's `start`) on an `InProcessGrid` of `num_supernodes` nodes (None: as the
    launchers', `RunConfig.for_launchers`) whose private state lives below `state_root`
    (clients on `client_threads` torch threads); return its run directory."""
    nodes = num_supernodes or RunConfig.from_flower(run_config).for_launchers().num_clients
    grid = InProcessGrid(run_config, state_root, nodes, client_threads, run_id)
    with _server_task(run_id):
        run = federated_run(grid, run_config, run_id)
        run.start(grid)
    return run.run_dir
