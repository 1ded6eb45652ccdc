"""A real Flower deployment on this machine: a SuperLink and one SuperNode per data holder as
separate processes, with TLS and SuperNode authentication, and `flwr run` against it.

`Deployment(work_dir, node_configs)` is a context manager. Entering it

1. writes a local CA, the SuperLink's certificate for 127.0.0.1 and one OpenSSH EC key pair per
   SuperNode (`pki`; under `work_dir/pki` and `work_dir/nodes/<k>/`);
2. starts `flower-superlink` with `--ssl-*` and `--enable-supernode-auth` on a free port, its
   state in memory (with a `--database` file, writes wait at most 5 s for SQLite's lock, and
   two SuperNodes pushing 200 MB FedAvg replies on a busy machine fail with "database is
   locked"), waits until it answers, and registers every
   SuperNode's public key (`flwr supernode register`: the node ids are fixed there and survive
   a node's restart);
3. starts one `flower-supernode` per entry of `node_configs` (its node config, e.g. its
   `state-dir`), each with its own key, runtime port, working directory and Flower home, and
   `OMP_NUM_THREADS` = `threads_per_node`;
4. waits until `flwr supernode ls` lists every node online.

`run(project_dir, run_config)` runs `flwr run PROJECT deployment --stream` and returns its
`launch.RunOutcome` (the status from `flwr ls`, not the exit code). Leaving the context, also on
an exception or Ctrl-C, ends every process it started and everything below them (SuperExecs,
ServerApp and ClientApp processes) by PID, from a snapshot of the process table taken before the
first signal; nothing else on the machine is touched.

The CLI (`flwr run`, `flwr ls`, `flwr supernode ...`) finds the SuperLink through the
connection `deployment` in `work_dir/cli/config.toml` (address and CA certificate). Each process
logs to `work_dir/logs/`.

`collafuse-deploy` runs a configuration this way, each client with its own data:

    collafuse-deploy [PROJECT] --work-dir DIR [--run-config ...]...
        [--client-dir D0 --client-dir D1 ... --reference-dir R]

With no `--client-dir`, it first cuts the configured dataset's simulation partitions into
`DIR/data/client-<k>/` and `DIR/data/reference/` (`data.export`). SuperNode k gets node config
`data-dir=<its folder>`, `state-dir=DIR/nodes/<k>/state` and, as one user runs every party
here, `launch.own_clients_settings` (trust in the run's evaluator, the run's weights files);
the run gets `client-data='own'`, `data-dir=<the reference folder>` (images no client holds,
for the evaluation feature network)
and `output-dir=DIR/runs` unless given. It prints the final status, the run directory and the
wall time, and exits non-zero unless the run completed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from flwr.common.config import get_project_config, parse_config_args

from collafuse_flwr.config import RunConfig
from collafuse_flwr.data.export import export_partitions
from collafuse_flwr.tools.launch import (
    FLOWER_DEFAULTS,
    ProcessGroup,
    RunOutcome,
    alive,
    command_parser,
    descendants,
    flwr_run,
    format_run_config,
    free_port,
    own_clients_settings,
    process_table,
    venv_command,
)
from collafuse_flwr.tools.pki import NodeKey, ServerCredentials, write_node_key, write_server_credentials

CONNECTION = "deployment"
HOST = "127.0.0.1"


class DeploymentError(RuntimeError):
    """A process of the deployment failed to start or to reach the state it was waited for."""


@dataclass
class Node:
    """One SuperNode: its node config, key pair, directories, node id and process."""

    index: int
    node_config: dict
    key: NodeKey
    directory: Path
    node_id: int | None = None
    process: subprocess.Popen | None = None
    identity: tuple[int, int] | None = None  # (pid, start ticks): survives pid reuse


@dataclass
class Deployment(ProcessGroup):
    """A SuperLink and SuperNodes with TLS and SuperNode authentication (see the module).

    Args:
        work_dir: where keys, state, logs and the CLI's home go (created).
        node_configs: one node config per SuperNode (keys of `context.node_config`).
        env: the environment of every process (default: this one's); the SuperLink's
            (hence the ServerApp's) can differ by `server_env`, entries of which replace it.
        threads_per_node: torch threads of each SuperNode's ClientApp processes (default:
            this machine's cores shared out, at least 1).
        timeout: seconds to wait for the SuperLink to answer and the nodes to come online.
        node_superlink: the address the SuperNodes dial (default: the SuperLink's own; e.g. a
            relay in front of it that counts the bytes on the wire).
    """

    work_dir: Path
    node_configs: list[dict]
    env: dict | None = None
    server_env: dict = field(default_factory=dict)
    threads_per_node: int | None = None
    timeout: float = 120.0
    node_superlink: str | None = None

    def __post_init__(self):
        self.work_dir = Path(self.work_dir).resolve()
        self.port = free_port()
        self.nodes: list[Node] = []
        self.superlink: subprocess.Popen | None = None
        self._roots: list[tuple[int, int]] = []
        self.credentials: ServerCredentials | None = None

    # --- the CLI -----------------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def cli_env(self) -> dict:
        """The environment for `flwr` commands against this deployment."""
        return dict(self._base_env(), FLWR_HOME=str(self.work_dir / "cli"))

    def flwr(self, *args: str) -> subprocess.CompletedProcess:
        """`flwr ARGS` with this deployment's CLI home, output captured."""
        return subprocess.run([venv_command("flwr"), *args], env=self.cli_env(), cwd=self.work_dir,
                              capture_output=True, text=True, check=False)

    def node_status(self) -> dict[int, str]:
        """Each node's status as the SuperLink reports it ("online", "offline", "registered",
        ...), by node index; nodes the SuperLink does not list are absent."""
        out = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        try:
            listed = {int(n["node-id"]): n["status"] for n in json.loads(out.stdout)["nodes"]}
        except (ValueError, KeyError, TypeError):
            raise DeploymentError(f"flwr supernode ls failed: {out.stdout.strip() or out.stderr.strip()}") from None
        return {node.index: listed[node.node_id] for node in self.nodes if node.node_id in listed}

    def wait_status(self, indices, status: str, timeout: float | None = None) -> None:
        """Wait until every node of `indices` has `status`; raise DeploymentError after
        `timeout` seconds (default: the deployment's), naming the nodes and their logs."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        indices = list(indices)
        while True:
            current = self.node_status()
            if all(current.get(i) == status for i in indices):
                return
            exited = [n.index for n in self.nodes if n.index in indices and n.process and n.process.poll() is not None]
            if exited and status == "online" or time.monotonic() > deadline:
                raise DeploymentError(
                    f"SuperNodes {indices} not all {status!r} (now {current}; exited: {exited}); "
                    f"see {self.work_dir / 'logs'}"
                )
            time.sleep(1.0)

    # --- processes ---------------------------------------------------------------------
    def start(self) -> None:
        for sub in ("logs", "cli", "superlink"):
            (self.work_dir / sub).mkdir(parents=True, exist_ok=True)
        self.credentials = write_server_credentials(self.work_dir / "pki", [HOST, "localhost"])
        (self.work_dir / "cli" / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.address}"\nroot-certificates = "{self.credentials.ca_certificate}"\n'
        )
        self._start_superlink()
        for index, node_config in enumerate(self.node_configs):
            directory = self.work_dir / "nodes" / str(index)
            node = Node(index, dict(node_config), write_node_key(directory / "key"), directory)
            self.nodes.append(node)
            node.node_id = self._register(node)
            self.start_node(index)
        self.wait_status(range(len(self.nodes)), "online")

    def _start_superlink(self) -> None:
        creds = self.credentials
        command = [
            venv_command("flower-superlink"), "--host", HOST, "--port", str(self.port),
            "--ssl-ca-certfile", str(creds.ca_certificate), "--ssl-certfile", str(creds.certificate),
            "--ssl-keyfile", str(creds.private_key), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
        ]
        env = dict(self._base_env(), FLWR_HOME=str(self.work_dir / "superlink" / "home"), **self.server_env)
        self.superlink = self.spawn(command, env, self.work_dir / "superlink", self.work_dir / "logs" / "superlink.log")
        deadline = time.monotonic() + self.timeout
        while True:  # answers once the CLI can list its (no) nodes over TLS
            out = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
            if out.returncode == 0 and '"nodes"' in out.stdout:
                return
            if self.superlink.poll() is not None or time.monotonic() > deadline:
                raise DeploymentError(f"the SuperLink did not come up; see {self.work_dir / 'logs' / 'superlink.log'}")
            time.sleep(1.0)

    def _register(self, node: Node) -> int:
        out = self.flwr("supernode", "register", str(node.key.public_key), CONNECTION, "--format", "json")
        try:
            return int(json.loads(out.stdout)["node-id"])
        except (ValueError, KeyError, TypeError):
            raise DeploymentError(
                f"registering SuperNode {node.index}'s key failed: {out.stdout.strip() or out.stderr.strip()}"
            ) from None

    def start_node(self, index: int) -> None:
        """Start (or restart, with the same key, node config and directories) SuperNode `index`."""
        node = self.nodes[index]
        config = format_run_config(node.node_config)
        command = [
            venv_command("flower-supernode"), "--superlink", self.node_superlink or self.address,
            "--root-certificates", str(self.credentials.ca_certificate),
            "--auth-supernode-private-key", str(node.key.private_key),
            "--port", str(free_port()), "--max-retries", "0",
        ]
        if config:
            command += ["--node-config", config]
        threads = self.threads_per_node or max(1, (os.cpu_count() or 1) // max(1, len(self.node_configs)))
        env = dict(self._base_env(), FLWR_HOME=str(node.directory / "home"),
                   OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        node.process = self.spawn(command, env, node.directory, self.work_dir / "logs" / f"supernode-{index}.log")
        node.identity = self._roots[-1]

    def kill_node(self, index: int) -> None:
        """SIGKILL SuperNode `index` and everything below it (a crash, not a shutdown)."""
        node = self.nodes[index]
        table = process_table()
        for pid in descendants(table, list(alive([node.identity]))):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        node.process.wait()

    def _base_env(self) -> dict:
        env = {**FLOWER_DEFAULTS, **(os.environ if self.env is None else self.env)}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def stop(self) -> None:
        """End every process this deployment started and all below them, by PID."""
        super().stop()
        for process in [self.superlink, *(n.process for n in self.nodes)]:
            if process is not None:
                process.wait()

    # --- runs --------------------------------------------------------------------------
    def run(self, project_dir: Path, run_config: str = "", echo: bool = False) -> RunOutcome:
        """`flwr run PROJECT deployment --stream` with `run_config`; its outcome."""
        return flwr_run(project_dir, run_config, env=self.cli_env(), cwd=self.work_dir, echo=echo,
                        superlink=CONNECTION)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser(
        "collafuse-deploy",
        "Run CollaFuse as a real Flower deployment on this machine: a SuperLink and one\n"
        "SuperNode per client as separate processes, with TLS and SuperNode authentication,\n"
        "each client reading only its own image folder (client-data = own).",
        "  collafuse-deploy . --work-dir /tmp/cf --run-config simulations/cifar10-cpu.toml \\\n"
        "      --client-dir /data/hospital-a --client-dir /data/hospital-b --reference-dir /data/public\n"
        "    two clients on their own folders; without --client-dir the simulation's partitions are\n"
        "    written as folders first; logs in <work-dir>/logs/ (docs/deployment.md)",
    )
    parser.add_argument("project_dir", nargs="?", default=".", type=Path)
    parser.add_argument("--work-dir", type=Path, required=True, help="keys, state, logs, data and runs go here")
    parser.add_argument("--run-config", action="append", default=[], help="TOML files and key=value strings")
    parser.add_argument("--client-dir", action="append", type=Path, default=[], help="one per SuperNode")
    parser.add_argument("--reference-dir", type=Path, help="the server's images (no client holds them)")
    args = parser.parse_args(argv)
    given: dict = {}
    for item in args.run_config:
        given.update(parse_config_args([item]))
    work = args.work_dir.resolve()
    values = {**get_project_config(args.project_dir)["tool"]["flwr"]["app"]["config"],
              "output-dir": str(work / "runs"), **given}
    if args.client_dir:
        if args.reference_dir is None:
            parser.error("--client-dir needs --reference-dir (the server's own images)")
        clients, reference = [d.resolve() for d in args.client_dir], args.reference_dir.resolve()
    else:  # the simulation's partitions, one folder per client
        simulated = RunConfig.from_flower(dict(values, **{"client-data": "partition"})).for_launchers()
        clients, reference = export_partitions(simulated, work / "data")
    values.update({"client-data": "own", "data-dir": str(reference), "num-clients": len(clients)})
    RunConfig.from_flower(values)  # a bad key stops here, before any process starts
    # one user runs every party on this machine: its clients trust the run's evaluator and use the run's weights
    nodes = [{"data-dir": str(d), "state-dir": str(work / "nodes" / str(k) / "state"),
              **own_clients_settings(values, os.environ)} for k, d in enumerate(clients)]
    start = time.perf_counter()
    with Deployment(work, nodes) as deployment:
        outcome = deployment.run(args.project_dir, format_run_config(values), echo=True)
    print(f"\nrun {outcome.run_id}: {outcome.status} ({time.perf_counter() - start:.0f} s with start and stop)")
    if outcome.run_dir:
        print(f"results: {outcome.run_dir}")
    return 0 if outcome.ok else 1
