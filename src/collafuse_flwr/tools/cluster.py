"""A Ray cluster of several nodes on this machine, for running a simulation across Ray nodes
as on a real cluster and checking from Ray's own records where the ClientApps ran.

`RayCluster(work_dir, nodes=2, cpus_per_node=1)` is a context manager: it starts a head node
(`ray start --head --block`) and attaches the other nodes to it (`ray start --address HEAD
--block`), each with its own free ports, its own temporary directory below a short private
root (Ray's socket paths must stay under about 100 characters), `--num-cpus` and a custom
resource naming it (`node-0`, `node-1`, ...) and its own loopback address (`node_ip`), and
waits until Ray lists them all alive. `env_for_flwr(env)` attaches `flwr run`'s SuperLink to
it by the explicit address `RAY_ADDRESS=127.0.0.1:<port>`, never `auto` (which attaches to
whichever cluster runs on the machine). Leaving the context stops every process it started
by PID, never `ray stop` (which ends every Ray cluster of the machine).

Ray's workers inherit the environment of the `ray start` that made their node (Flower passes
only the project's path), so everything a ClientApp needs in its environment
(COLLAFUSE_CLIENT_STATE, HF_HUB_OFFLINE, TORCH_HOME, ...) goes into `env` of the cluster, on
every node.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from collafuse_flwr.clients.release import TRUST_RUN_EVALUATOR_VARIABLE
from collafuse_flwr.tools.launch import ProcessGroup, alive, free_port, venv_command

# every port a Ray node opens, beside its worker port range, each chosen free per node
NODE_PORTS = ("--node-manager-port", "--object-manager-port", "--ray-client-server-port",
              "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
              "--metrics-export-port")
WORKER_PORTS = 40  # per node


def node_ip(index: int) -> str:
    """Node `index`'s own loopback address (127.0.0.2 for the head, 127.0.0.3, ...), so that
    Ray's records tell the nodes apart by address as on separate machines (Ray replaces
    127.0.0.1 by the machine's network address)."""
    return f"127.0.0.{index + 2}"


def client_app_nodes(timeline: list[dict]) -> dict[str, int]:
    """How many ClientApp executions ran on each node, from Ray's task records
    (`ray.timeline()`: one event per executed task, `cat` "task::ClientAppActor.run" for a
    Flower ClientApp, `pid` the address of the node that ran it)."""
    counts: dict[str, int] = {}
    for event in timeline:
        if event.get("cat") == "task::ClientAppActor.run":
            counts[event["pid"]] = counts.get(event["pid"], 0) + 1
    return counts


class ClusterError(RuntimeError):
    """A node of the cluster did not start, or the cluster did not reach the expected nodes."""


def ray_records(address: str, what: str, env: dict | None = None) -> list[dict]:
    """A record list of the state of the Ray cluster at `address`, from a short-lived driver
    attached to it: "nodes" (`ray.nodes()`) or "timeline" (`ray.timeline()`: the executed
    tasks, each with the address of its node)."""
    script = (
        "import json, ray\n"
        f"ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False)\n"
        f"records = ray.nodes() if {what!r} == 'nodes' else ray.timeline()\n"
        "print('RECORDS' + json.dumps(records, default=str))\n"
    )
    env = dict(os.environ if env is None else env)
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("RECORDS"):
            return json.loads(line[len("RECORDS"):])
    raise ClusterError(f"asking Ray at {address} for {what} failed: {done.stderr.strip()[-2000:]}")


@dataclass
class RayCluster(ProcessGroup):
    """Ray nodes on this machine (see the module).

    Args:
        work_dir: where each node's log goes (created).
        nodes: how many Ray nodes (the first is the head).
        cpus_per_node: `--num-cpus` of each node (Flower places one ClientApp actor per
            `client-resources-num-cpus` of them).
        env: the environment of every node and of its workers (default: this process's).
        object_store_bytes: each node's object store.
        timeout: seconds to wait for the nodes to come up.
    """

    work_dir: Path
    nodes: int = 2
    cpus_per_node: int = 1
    env: dict | None = None
    object_store_bytes: int = 200_000_000
    timeout: float = 120.0
    _roots: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self):
        self.work_dir = Path(self.work_dir).resolve()
        self.port = free_port()
        self.temp_root = Path(tempfile.mkdtemp(prefix="cfray-", dir="/tmp"))

    @property
    def address(self) -> str:
        return f"{node_ip(0)}:{self.port}"

    def env_for_flwr(self, base: dict) -> dict:
        """`base` with RAY_ADDRESS set to this cluster (explicitly: never "auto")."""
        return dict(base, RAY_ADDRESS=self.address)

    def start(self) -> None:
        (self.work_dir / "logs").mkdir(parents=True, exist_ok=True)
        for index in range(self.nodes):
            self._start_node(index)
            if index == 0:
                self._wait(1)
        self._wait(self.nodes)

    def _start_node(self, index: int) -> None:
        head = index == 0
        command = [venv_command("ray"), "start", "--block", "--node-ip-address", node_ip(index),
                   "--num-cpus", str(self.cpus_per_node), "--num-gpus", "0",
                   "--resources", json.dumps({f"node-{index}": 1}),
                   "--temp-dir", str(self.temp_root / f"n{index}"),
                   "--object-store-memory", str(self.object_store_bytes), "--disable-usage-stats"]
        command += (["--head", "--port", str(self.port), "--include-dashboard", "false"] if head
                    else ["--address", self.address])
        for option in NODE_PORTS:
            command += [option, str(free_port())]
        low = 20_000 + 1_000 * index + (os.getpid() % 20) * 50  # disjoint per node, unlikely in use
        command += ["--min-worker-port", str(low), "--max-worker-port", str(low + WORKER_PORTS - 1)]
        env = dict(os.environ if self.env is None else self.env)
        env.pop("RAY_ADDRESS", None)
        env.setdefault(TRUST_RUN_EVALUATOR_VARIABLE, "1")  # a simulation: its clients trust the run's evaluator
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        self.spawn(command, env, self.work_dir, self.work_dir / "logs" / f"ray-node-{index}.log")

    def node_records(self) -> list[dict]:
        """Ray's records of the cluster's alive nodes: NodeID, NodeManagerAddress, Resources."""
        return [n for n in self.query("nodes") if n.get("Alive")]

    def query(self, what: str) -> list[dict]:
        """`ray_records` of this cluster."""
        return ray_records(self.address, what, self.env)

    def _wait(self, count: int) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                if len(self.node_records()) >= count:
                    return
            except ClusterError:
                pass
            if time.monotonic() > deadline or len(alive(self._roots)) < len(self._roots):
                raise ClusterError(f"the Ray cluster did not reach {count} nodes; see {self.work_dir / 'logs'}")
            time.sleep(2.0)

    def strays(self, table) -> set[tuple[int, int]]:
        """Ray processes reparented away from a node's `ray start`, found by the cluster's
        private temporary directory in their command line."""
        marker = str(self.temp_root).encode()
        return {p.identity for p in table.values() if any(marker in a for a in p.args)}

    def stop(self) -> None:
        """End every process of the cluster by PID; remove its temporary directory."""
        try:
            super().stop()
        finally:
            shutil.rmtree(self.temp_root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m collafuse_flwr.tools.cluster HEAD:PORT`: the cluster's alive nodes and how many
    ClientApp executions each ran, from Ray's own records."""
    parser = argparse.ArgumentParser(
        prog="python -m collafuse_flwr.tools.cluster",
        description="The Ray cluster's alive nodes and how many ClientApp executions each ran, from Ray's records.")
    parser.add_argument("address", help="the head node's HOST:PORT (never 'auto')")
    args = parser.parse_args(argv)
    ran = client_app_nodes(ray_records(args.address, "timeline"))
    for node in ray_records(args.address, "nodes"):
        if node.get("Alive"):
            address = node["NodeManagerAddress"]
            print(f"{address}\tnode {node['NodeID'][:8]}\t{ran.pop(address, 0)} ClientApp runs")
    for address, count in ran.items():
        print(f"{address}\t(no longer alive)\t{count} ClientApp runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
