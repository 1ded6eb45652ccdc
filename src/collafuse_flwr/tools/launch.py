"""Launch `flwr run` and report how the run really ended.

`flwr run` takes either one TOML overlay or key=value strings, not both; this wrapper merges
any number of each (later ones win) into one `--run-config`, so an overlay can be combined
with, e.g., the data directory of this machine.

`flwr run --stream` exits 0 even when the ServerApp failed, so this wrapper reads the run id
from its output, asks `flwr ls --run-id ID --format json` for the final status, and exits
non-zero unless the status is `finished:completed`. It also prints the run directory.

    collafuse-run [PROJECT_DIR] [--run-config "t-zeta=200 ..."] [--run-config simulations/x.toml]
                  [--num-supernodes 5] [--cpus-per-client 1] [--gpus-per-client 0]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

RUN_ID = re.compile(r"Successfully started run (\d+)")
RUN_DIR = re.compile(r"CollaFuse run directory: (\S+)")


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
) -> RunOutcome:
    """Run `flwr run PROJECT --stream` with the given configs; return its `RunOutcome`."""
    command = [_flwr(), "run", str(Path(project_dir).resolve()), "--stream"]
    if run_config:
        command += ["--run-config", run_config]
    if federation_config:
        command += ["--federation-config", federation_config]
    env = dict(os.environ if env is None else env)
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
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
    run_dir = Path(m.group(1)) if (m := RUN_DIR.search(log)) else None
    status = run_status(run_id, env, cwd) if run_id else f"not started (flwr exited {process.returncode})"
    return RunOutcome(run_id, status, run_dir, log)


def isolated_env(home: Path) -> dict[str, str]:
    """An environment for `flwr run` with a local SuperLink of its own, e.g. for tests and
    benchmarks beside other runs: FLWR_HOME=`home`, two free ports for its APIs
    (FLWR_LOCAL_SUPERLINK_HTTP_API_PORT, FLWR_LOCAL_CONTROL_API_PORT), no runtime dependency
    installation, the Hugging Face hub offline, the clients' private state under
    `home`/client-state, and empty torch / Hugging Face caches under `home` with no weights
    variables (FID, KID and FCD are skipped unless a run names weights)."""
    env = dict(
        os.environ,
        FLWR_HOME=str(home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(_free_port()),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        HF_HUB_OFFLINE="1",
        RAY_DEDUP_LOGS="0",
        TORCH_HOME=str(Path(home) / "torch"),
        HF_HOME=str(Path(home) / "hf"),
        COLLAFUSE_CLIENT_STATE=str(Path(home) / "client-state"),
    )
    for var in ("COLLAFUSE_FID_WEIGHTS", "COLLAFUSE_FCD_WEIGHTS", "HF_HUB_CACHE"):
        env.pop(var, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def merge_run_configs(items: list[str]) -> str:
    """TOML overlay files and "key=value ..." strings merged in order (later keys win), as one
    "key=value ..." string for `flwr run --run-config`."""
    from flwr.common.config import parse_config_args

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


def _flwr() -> str:
    """The `flwr` command of this Python environment."""
    return str(Path(sys.executable).with_name("flwr"))


def run_status(run_id: str, env: dict, cwd: Path | None = None) -> str:
    """The final status of run `run_id` as `flwr ls` reports it, e.g. "finished:completed"."""
    out = subprocess.run(
        [_flwr(), "ls", "--run-id", run_id, "--format", "json"],
        env=env, cwd=cwd, capture_output=True, text=True, check=False,
    )
    try:
        runs = json.loads(out.stdout)["runs"]
        return f"{runs[0]['status']} {runs[0].get('status-details', '')}".replace(" N/A", "").strip()
    except (ValueError, KeyError, IndexError):
        return f"unknown (flwr ls said: {out.stdout.strip() or out.stderr.strip()})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("project_dir", nargs="?", default=".")
    parser.add_argument(
        "--run-config", action="append", default=[],
        help="passed to flwr run --run-config (repeatable: TOML files and key=value strings)",
    )
    parser.add_argument("--num-supernodes", type=int, default=5)
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--gpus-per-client", type=float, default=0.0, help="e.g. 0.25: four clients per GPU")
    args = parser.parse_args(argv)
    federation = (
        f"num-supernodes={args.num_supernodes} client-resources-num-cpus={args.cpus_per_client} "
        f"client-resources-num-gpus={args.gpus_per_client:g}"
    )
    outcome = flwr_run(Path(args.project_dir), merge_run_configs(args.run_config), federation, echo=True)
    print(f"\nrun {outcome.run_id}: {outcome.status}")
    if outcome.run_dir:
        print(f"results: {outcome.run_dir}")
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
