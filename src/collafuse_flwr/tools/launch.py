"""Launch `flwr run`, report how the run really ended and where it wrote, and leave no local
SuperLink behind.

`flwr run` takes either one TOML overlay or key=value strings, not both; this wrapper merges
any number of each (later ones win) into one `--run-config`, so an overlay can be combined
with, e.g., the data directory of this machine.

`flwr run --stream` exits 0 even when the ServerApp failed, so this wrapper reads the run id
from its output, asks `flwr ls --run-id ID --format json` for the final status, and exits
non-zero unless the status is `finished:completed`.

The run directory: the wrapper makes output-dir absolute before the run (a relative one, and
the project's default "results/runs", are taken relative to the directory the wrapper runs
in, not to the SuperLink's, and so are a relative data-dir and weights files); the ServerApp
records the run directory it writes into under Flower's run id in that output directory
(`RunDirectory.record_flower_run`), and the wrapper reads it from there after the run
(`RunDirectory.of_flower_run`) and prints it.

The local SuperLink: `flwr run` starts one in the background (`flower-superlink --simulation`
on FLWR_LOCAL_SUPERLINK_HTTP_API_PORT, default 39091) when none answers there, and leaves it
running. collafuse-run stops, by PID, the one started during its run, with every process
below it (SuperExec, the simulation with the ServerApp, Ray), when the run ends, fails or is
interrupted (`stopping_local_superlink`); one that was running before is left alone.

    collafuse-run [PROJECT_DIR] [--run-config "t-zeta=200 ..."] [--run-config simulations/x.toml]
                  [--num-supernodes N] [--cpus-per-client 1] [--gpus-per-client 0]

The federation has --num-supernodes SuperNodes, else the run config's num-clients where it sets
one, else `LAUNCHER_SUPERNODES`; the ServerApp takes num-clients = 0 from it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from flwr.common.config import get_project_config, parse_config_args

from collafuse_flwr.clients.release import TRUST_RUN_EVALUATOR_KEY, TRUST_RUN_EVALUATOR_VARIABLE, WEIGHTS_KEYS
from collafuse_flwr.config import LAUNCHER_SUPERNODES, PATH_KEYS
from collafuse_flwr.run_dir import RunDirectory

RUN_ID = re.compile(r"Successfully started run (\d+)")
# What every Flower process the launchers start runs with unless the caller's environment says
# otherwise: no dependency installation per run (uv sync of torch: gigabytes, the package index),
# no update check (Flower 1.42's CLI, SuperLink and SuperNode would ask the internet)
FLOWER_DEFAULTS = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1"}
SUPERLINK_PORT = "39091"  # flwr's default FLWR_LOCAL_SUPERLINK_HTTP_API_PORT
# The environment variables of the clients' own settings, for simulated SuperNodes (no node config)
CLIENT_VARIABLES = {TRUST_RUN_EVALUATOR_KEY: TRUST_RUN_EVALUATOR_VARIABLE, **WEIGHTS_KEYS}


@dataclass
class RunOutcome:
    """What one `flwr run` did: its id, final status, run directory and full log."""

    run_id: str | None
    status: str
    run_dir: Path | None
    log: str

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


def flwr_run(
    project_dir: Path,
    run_config: str = "",
    federation_config: str = "",
    env: dict | None = None,
    cwd: Path | None = None,
    echo: bool = False,
    superlink: str = "",
) -> RunOutcome:
    """Run `flwr run PROJECT [SUPERLINK] --stream` with the given configs ("key=value ..."
    strings) and their paths made absolute (`absolute_paths`); return its `RunOutcome`.
    `superlink` names a connection of the CLI's config.toml ("": the local simulation one, whose
    simulated clients get `own_clients_settings` through the environment: a SuperLink that
    `flwr run` starts passes it on, one already running keeps its own). A local SuperLink that
    `flwr run` starts is left running (`stopping_local_superlink` stops it)."""
    project_dir = Path(project_dir).resolve()
    config = absolute_paths(parse_config_args([run_config]), project_dir)
    output_dir = absolute_path(config["output-dir"])
    command = [venv_command(), "run", str(project_dir), *([superlink] if superlink else []), "--stream"]
    if config:
        command += ["--run-config", format_run_config(config)]
    if federation_config:
        command += ["--federation-config", federation_config]
    env = {**FLOWER_DEFAULTS, **(os.environ if env is None else env)}
    if not superlink:  # a local simulation: its SuperLink passes this environment to the simulated clients
        env.update({CLIENT_VARIABLES[key]: value for key, value in own_clients_settings(config, env).items()})
    # the local SuperLink is started as `flower-superlink` from PATH: use this environment's
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    lines = []
    with subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        for line in process.stdout:
            lines.append(line)
            if echo:
                print(line, end="", flush=True)
    log = "".join(lines)
    run_id = m.group(1) if (m := RUN_ID.search(log)) else None
    status = run_status(run_id, env, cwd, superlink) if run_id else f"not started (flwr exited {process.returncode})"
    run_dir = RunDirectory.of_flower_run(output_dir, run_id) if run_id and output_dir else None
    return RunOutcome(run_id, status, run_dir.path if run_dir else None, log)


def absolute_paths(config: dict, project_dir: Path) -> dict:
    """`config` with every path key (`PATH_KEYS`: data-dir, the weights files, output-dir, the
    latter defaulting to the project's) absolute, taken relative to this process's working
    directory; an empty or unusable value is passed on as it is (the ServerApp and the clients
    judge it)."""
    config = {**config, "output-dir": config.get("output-dir", _default_output_dir(project_dir))}
    for key in PATH_KEYS:
        path = absolute_path(config.get(key))
        if path:
            config[key] = str(path)
    return config


def absolute_path(value) -> Path | None:
    """The path `value` as an absolute path (a relative one is relative to this process's
    working directory), or None if it names nothing (empty, not a string, NUL bytes, a symlink
    loop)."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        return Path(value).expanduser().resolve()
    except (ValueError, RuntimeError):
        return None


def _default_output_dir(project_dir: Path) -> str:
    """The output-dir of the project's run config ([tool.flwr.app.config] of its pyproject.toml)."""
    return get_project_config(project_dir)["tool"]["flwr"]["app"]["config"]["output-dir"]


def own_clients_settings(run_config: Mapping, env: Mapping[str, str]) -> dict[str, str]:
    """{node config key: value} that a launcher gives the simulated clients of its own run, where
    one user is every party (clients/release.py): trust the evaluator the run's server trains
    (trust-run-evaluator), and the pretrained weights files the run config names (fid-weights,
    fcd-weights, text-weights; absolute) that exist, each unless `env` (the user's environment)
    sets it. A file that does not exist is left to the server, which stops the run naming it
    before any work; passed on, it would reach every later run of a SuperLink that keeps this
    environment (and their servers, which read the same variables). A client in a deployment
    decides these in its own node config."""
    settings = {} if env.get(TRUST_RUN_EVALUATOR_VARIABLE) else {TRUST_RUN_EVALUATOR_KEY: "1"}
    for key, variable in WEIGHTS_KEYS.items():
        value = run_config.get(key)
        if isinstance(value, str) and value.strip() and not env.get(variable):
            path = Path(value).expanduser().resolve()
            if path.is_file():
                settings[key] = str(path)
    return settings


def isolated_env(home: Path) -> dict[str, str]:
    """An environment for `flwr run` with a local SuperLink of its own, e.g. for tests and
    benchmarks beside other runs: FLWR_HOME=`home`, two free ports for its APIs
    (FLWR_LOCAL_SUPERLINK_HTTP_API_PORT, FLWR_LOCAL_CONTROL_API_PORT), no runtime dependency
    installation, the Hugging Face hub offline, the clients' private state under
    `home`/client-state, and empty torch / Hugging Face caches under `home` with no weights
    variables (FID, KID and FCD are skipped unless a run names weights), no consent of the
    simulated clients to send their conditions (COLLAFUSE_SHARE_CONDITIONS) and none of their
    evaluation settings (`flwr_run` gives them `own_clients_settings`). The local
    SuperLink the first `flwr run` starts keeps this environment for every simulation it runs."""
    env = dict(
        os.environ,
        FLWR_HOME=str(home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
        **FLOWER_DEFAULTS,
        HF_HUB_OFFLINE="1",
        RAY_DEDUP_LOGS="0",
        TORCH_HOME=str(Path(home) / "torch"),
        HF_HOME=str(Path(home) / "hf"),
        COLLAFUSE_CLIENT_STATE=str(Path(home) / "client-state"),
    )
    for var in ("HF_HUB_CACHE", "COLLAFUSE_SHARE_CONDITIONS", *CLIENT_VARIABLES.values()):
        env.pop(var, None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def merge_run_configs(items: list[str]) -> str:
    """TOML overlay files and "key=value ..." strings merged in order (later keys win), as one
    "key=value ..." string for `flwr run --run-config`."""
    merged: dict = {}
    for item in items:
        merged.update(parse_config_args([item]))
    return format_run_config(merged)


def format_run_config(config: dict) -> str:
    """A run config dict as one "key=value ..." string for `flwr run --run-config`."""
    return " ".join(f"{key}={_toml_value(key, value)}" for key, value in config.items())


def _toml_value(key: str, value) -> str:
    """`value` as Flower's run-config parser reads it back (quoted strings, true/false)."""
    if isinstance(value, bool):
        return str(value).lower()
    if not isinstance(value, str):
        return repr(value)
    for quote in ("'", '"'):
        if quote not in value:
            return f"{quote}{value}{quote}"
    raise ValueError(f"{key}={value!r}: a run-config string cannot hold both kinds of quotes")


def venv_command(name: str = "flwr") -> str:
    """The command `name` (flwr, flower-superlink, ...) of this Python environment."""
    return str(Path(sys.executable).with_name(name))


def run_status(run_id: str, env: dict, cwd: Path | None = None, superlink: str = "") -> str:
    """The final status of run `run_id` as `flwr ls [SUPERLINK]` reports it, e.g. "finished:completed"."""
    out = subprocess.run(
        [venv_command(), "ls", *([superlink] if superlink else []), "--run-id", run_id, "--format", "json"],
        env=env, cwd=cwd, capture_output=True, text=True, check=False,
    )
    try:
        runs = json.loads(out.stdout)["runs"]
        return f"{runs[0]['status']} {runs[0].get('status-details', '')}".replace(" N/A", "").strip()
    except (ValueError, KeyError, IndexError):
        return f"unknown (flwr ls said: {out.stdout.strip() or out.stderr.strip()})"


@dataclass(frozen=True)
class Process:
    """What /proc says about one process; (pid, start) tells it from a later process that
    gets the same pid."""

    pid: int
    ppid: int
    start: int  # clock ticks after boot
    zombie: bool
    args: tuple[bytes, ...]

    @property
    def identity(self) -> tuple[int, int]:
        return self.pid, self.start

    @property
    def name(self) -> str:
        """The program, e.g. `flwr-simulation` (not its interpreter) or `ray::ClientAppActor.run`."""
        names = [os.path.basename(a.decode(errors="replace")) for a in self.args]
        return next((n for n in names if not n.startswith(("python", "-"))), "?")[:40]


def process_table() -> dict[int, Process]:
    """Every process now alive, by pid (read from /proc: Linux only)."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            args = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:  # ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # the name in parentheses may hold spaces
        pid = int(entry.name)
        table[pid] = Process(pid, int(fields[1]), int(fields[19]), fields[0] == "Z", tuple(a for a in args if a))
    return table


def descendants(table: dict[int, Process], roots: Iterable[int]) -> set[int]:
    """`roots` (those alive) and every process below them."""
    children = defaultdict(list)
    for pid, p in table.items():
        children[p.ppid].append(pid)
    found, todo = set(), [r for r in roots if r in table]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children[pid])
    return found


def local_superlinks(table: dict[int, Process], env: Mapping[str, str] | None = None) -> list[int]:
    """PIDs of the local SuperLink `flwr run` uses in the environment `env` (default: this
    process's): a `flower-superlink` serving its FLWR_LOCAL_SUPERLINK_HTTP_API_PORT."""
    port = (os.environ if env is None else env).get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", SUPERLINK_PORT)
    return [pid for pid, p in table.items()
            if any(a.endswith(b"flower-superlink") for a in p.args) and _option(p.args, b"--port") == port.encode()]


def _option(args: tuple[bytes, ...], name: bytes) -> bytes | None:
    """The value after `name` in a command line, or None."""
    return args[args.index(name) + 1] if name in args[:-1] else None


def alive(processes: Iterable[tuple[int, int]]) -> dict[int, Process]:
    """Those of `processes` ((pid, start) pairs) still running (zombies count as ended)."""
    table = process_table()
    return {pid: table[pid] for pid, start in processes
            if pid in table and table[pid].start == start and not table[pid].zombie}


def end_processes(processes: Iterable[tuple[int, int]], grace: float = 20.0) -> None:
    """SIGTERM `processes` ((pid, start) pairs), SIGKILL those still running after `grace`
    seconds, and wait (as long again) until they are gone."""
    processes = set(processes)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive(processes):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while alive(processes) and time.monotonic() < deadline:
            time.sleep(0.2)


class ProcessGroup:
    """Processes started here (a deployment's SuperLink and SuperNodes, a Ray cluster's nodes)
    and everything they start, stopped together by PID. Entering runs `start` (each kind of
    group defines it); leaving, also on an error or Ctrl-C, runs `stop`."""

    _roots: list[tuple[int, int]]  # (pid, start ticks) of every process `spawn` started

    def start(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def spawn(self, command: list[str], env: dict, cwd: Path, log: Path) -> subprocess.Popen:
        """Start `command` in `cwd` (created) with its output appended to `log`; remembered."""
        cwd.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            process = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        self._roots.append(process_table()[process.pid].identity)
        return process

    def strays(self, table: dict[int, Process]) -> set[tuple[int, int]]:
        """Processes of the group no longer below one it started (none unless a group knows them)."""
        return set()

    def stop(self) -> None:
        """End every process started and all below them, found in one snapshot of the process
        table before the first signal (a child outlives its parent: it is found first), and the
        `strays`; raise if any survives."""
        table = process_table()
        group = {table[pid].identity for pid in descendants(table, list(alive(self._roots)))} | self.strays(table)
        end_processes(group)
        left = alive(group)
        if left:
            raise RuntimeError(f"processes still alive after stopping them: {sorted(left)}")


@contextlib.contextmanager
def stopping_local_superlink(env: Mapping[str, str] | None = None) -> Iterator[None]:
    """On leaving the block, however it is left (an error, Ctrl-C), stop the local SuperLink
    of `env` (`local_superlinks`) if it was started inside the block (by `flwr run`, or any
    `flwr` command), with every process below it (SuperExec, the simulation, Ray); one that
    was running on entry is left alone."""
    table = process_table()
    before = {table[pid].identity for pid in local_superlinks(table, env)}
    try:
        yield
    finally:
        table = process_table()
        started = [pid for pid in local_superlinks(table, env) if table[pid].identity not in before]
        end_processes(table[pid].identity for pid in descendants(table, started))


def command_parser(prog: str, description: str, example: str) -> argparse.ArgumentParser:
    """The argument parser of a project command whose --help says, in lines kept as written,
    what it does (`description`) and shows one `example` (a command and what it gives)."""
    return argparse.ArgumentParser(prog=prog, description=description, epilog=f"example:\n{example}",
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser(
        "collafuse-run",
        "Run CollaFuse as one `flwr run` in a local simulation: merge TOML overlays and\n"
        "key=value strings into one run config, wait for the run, print its final status\n"
        "and run directory, and stop the local SuperLink the run started.",
        "  collafuse-run . --run-config simulations/cifar10-cpu.toml \\\n"
        "      --run-config \"data-dir='/data/cifar10' t-zeta=500\"\n"
        "    CIFAR-10 on 2 CPU cores, 5 simulated clients; prints the run directory, exits 0 only when\n"
        "    the run finished:completed (docs/running.md)",
    )
    parser.add_argument("project_dir", nargs="?", default=".", help="the Flower app (default: .)")
    parser.add_argument(
        "--run-config", action="append", default=[],
        help="passed to flwr run --run-config (repeatable: TOML files and key=value strings, later ones win)",
    )
    parser.add_argument(
        "--num-supernodes", type=int, default=None,
        help=f"simulated SuperNodes (default: num-clients if the run config sets it, else {LAUNCHER_SUPERNODES})",
    )
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--gpus-per-client", type=float, default=0.0, help="e.g. 0.25: four clients per GPU")
    args = parser.parse_args(argv)
    run_config = merge_run_configs(args.run_config)
    supernodes = args.num_supernodes or parse_config_args([run_config]).get("num-clients") or LAUNCHER_SUPERNODES
    federation = (
        f"num-supernodes={supernodes} client-resources-num-cpus={args.cpus_per_client} "
        f"client-resources-num-gpus={args.gpus_per_client:g}"
    )
    with stopping_local_superlink():
        outcome = flwr_run(Path(args.project_dir), run_config, federation, echo=True)
    print(f"\nrun {outcome.run_id}: {outcome.status}")
    if outcome.run_dir:
        print(f"results: {outcome.run_dir}")
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
