"""The server's run directory and the caches beside it: `RunDirectory` names every path in it
and owns its writers, so that no other module builds one of these paths by hand.

    <output-dir>/                          the run config's output-dir (absolute once resolved)
        00003-digits-collafuse-tz200/      one run: NNNNN-<dataset>-<strategy>[-tz<t_zeta>]
            config.json                    the resolved run config
            run-key                        the run's key (32 hex digits), sent with every message
            partition.csv, partition.png   who holds what (data/report.py)
            metrics.csv                    long format: round, client, metric, value (appended every round)
            log.txt                        one line per round, and one per client fault
            summary.json                   the latest figures and the cost so far (summary.py)
            samples/round-004-handover.png     the server's handed-over states, one row per client
            samples/round-004-server-only.png  the server's own samples of the whole chain (disclosure audit)
            checkpoints/round-004/         the server's state after round 4 (checkpoint.py)
            figures/                       collafuse-plot's figures (tools/plots.py)
        .cache/fd_classifier-<digest>.safetensors   the evaluation's feature network, shared by runs
        .cache/features/                   features of the real images the disclosure audit compares with
        .runs/<flower run id>              the absolute path of the run directory that Flower run
                                           writes into (how collafuse-run learns it)

Only the ServerApp writes here. The clients' state (their private denoisers, their generated
images) is no part of it: each client keeps it below a root of its own choosing
(clients/state.py), never in the server's directory.

Every write is atomic and durable: a file is replaced with `write_atomically`, a directory
written as a whole with `write_directory_atomically` (outputs.py), and an append to metrics.csv
or log.txt is fsync'd before it returns, so a crash or power loss leaves each file (or
directory) either as it was or as it is meant to be.
"""

from __future__ import annotations

import csv
import json
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from collafuse_flwr.config import ConfigError, RunConfig
from collafuse_flwr.outputs import DamagedFileError, complete_rounds, fsync_path, round_dir, write_atomically
from collafuse_flwr.wire import RUN_KEY

METRICS_HEADER = ("round", "client", "metric", "value")
RUN_INDEX = re.compile(r"(\d{5})-")


def check_output_dir(output_dir: str) -> Path:
    """The absolute output directory, created if needed; `ConfigError` if the file system
    refuses it (a file, no permission, a symlink loop, a name too long); an empty value and
    NUL bytes were already refused by `RunConfig.validate`."""
    try:
        root = Path(output_dir).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
    except RuntimeError as err:  # resolve() meets a symlink loop
        raise ConfigError(f"output-dir={output_dir!r}: cannot be created ({err})") from None
    except OSError as err:
        raise ConfigError(f"output-dir={output_dir!r}: cannot be created ({err.strerror})") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise ConfigError(f"output-dir={output_dir!r}: {root} is not writable")
    return root


@dataclass(frozen=True)
class RunDirectory:
    """One run directory of the server at `path` (any path-like); the directories `create`
    and `runs_of` give are absolute."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        """The directory's name, NNNNN-<run name>."""
        return self.path.name

    # ------------------------------------------------------- in the output directory
    @staticmethod
    def name_for(config: RunConfig) -> str:
        """The run name of `config`: dataset, strategy and (except for FedAvg) the cut point."""
        cut = "" if config.strategy == "fedavg" else f"-tz{config.t_zeta}"
        return f"{config.dataset}-{config.strategy}{cut}"

    @classmethod
    def create(cls, config: RunConfig) -> RunDirectory:
        """Make `<output-dir>/<NNNNN>-<run name>/` with the next free index (the output
        directory is created if needed: `ConfigError` if it cannot be)."""
        root = check_output_dir(config.output_dir)
        taken = [int(m.group(1)) for p in root.iterdir() if (m := RUN_INDEX.match(p.name))]
        first = max(taken, default=-1) + 1
        for index in range(first, first + 1000):
            path = root / f"{index:05d}-{cls.name_for(config)}"
            try:
                path.mkdir()
            except FileExistsError:  # another run took it meanwhile
                continue
            fsync_path(root)
            return cls(path)
        raise RuntimeError(f"could not create a run directory under {root}")

    @classmethod
    def runs_of(cls, config: RunConfig) -> Iterator[RunDirectory]:
        """The run directories `<output-dir>/NNNNN-<run name>` of `config`'s configuration
        (their config.json has its `identity_hash`), newest first. Skipped: one without
        config.json and without checkpoints (killed before its config was written: nothing to
        resume) and one whose config.json another version of this package wrote (a key or value
        this one refuses). A config.json that is empty, cut off, not a JSON object or unreadable,
        or missing beside checkpoints, raises `DamagedFileError` naming it: that directory may
        be this configuration's run, and a silent new run would leave it behind."""
        root = Path(config.output_dir).expanduser().resolve()
        name = cls.name_for(config)
        pattern = re.compile(rf"\d{{5}}-{re.escape(name)}$")
        for path in sorted((d for d in root.glob(f"*-{name}") if pattern.match(d.name)), reverse=True):
            run_dir = cls(path)
            try:
                same = run_dir.read_config().identity_hash() == config.identity_hash()
            except ConfigError:
                continue
            except DamagedFileError as err:
                if not run_dir.config_json.exists() and not complete_rounds(run_dir.checkpoints, Path.is_dir):
                    continue
                raise DamagedFileError(
                    f"{err}. The run directory {run_dir} may hold a run of this configuration, so the run stops: "
                    "restore that file, move the directory out of the output-dir, or run with resume=false to "
                    "start a new run"
                ) from None
            if same:
                yield run_dir

    @staticmethod
    def flower_run_file(output_dir: Path, flower_run_id: int | str) -> Path:
        """`<output_dir>/.runs/<flower_run_id>`: the path of the run directory that Flower run
        writes into."""
        return Path(output_dir) / ".runs" / str(flower_run_id)

    def record_flower_run(self, flower_run_id: int) -> None:
        """Write (atomically) this directory's path into `flower_run_file`, for a launcher that
        knows Flower's run id and the output directory."""
        write_atomically(self.flower_run_file(self.root, flower_run_id), f"{self.path}\n")

    @classmethod
    def of_flower_run(cls, output_dir: Path, flower_run_id: int | str) -> RunDirectory | None:
        """The run directory that Flower run `flower_run_id` recorded in `output_dir`, or None
        (it failed before its run directory was known)."""
        path = cls.flower_run_file(output_dir, flower_run_id)
        return cls(path.read_text().strip()) if path.exists() else None

    @property
    def root(self) -> Path:
        """The output directory the run directory is in."""
        return self.path.parent

    @property
    def cache(self) -> Path:
        """`<output-dir>/.cache/`, shared by the runs of the output directory."""
        return self.root / ".cache"

    def feature_network_file(self, digest: str) -> Path:
        """The cached fd_classifier feature network identified by `digest`."""
        return self.cache / f"fd_classifier-{digest}.safetensors"

    @property
    def features_cache(self) -> Path:
        """The cached features of the real images the disclosure audit compares with."""
        return self.cache / "features"

    # ---------------------------------------------------------------- its files
    @property
    def config_json(self) -> Path:
        return self.path / "config.json"

    @property
    def run_key_file(self) -> Path:
        return self.path / "run-key"

    @property
    def partition_csv(self) -> Path:
        return self.path / "partition.csv"

    @property
    def partition_png(self) -> Path:
        return self.path / "partition.png"

    @property
    def metrics_csv(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def log_txt(self) -> Path:
        return self.path / "log.txt"

    @property
    def summary_json(self) -> Path:
        return self.path / "summary.json"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    def handover_grid(self, server_round: int) -> Path:
        """The grid of the states the server hands over in `server_round`."""
        return self.samples / f"round-{server_round:03d}-handover.png"

    def server_only_grid(self, server_round: int) -> Path:
        """The grid of the server's own samples of the whole chain in `server_round`."""
        return self.samples / f"round-{server_round:03d}-server-only.png"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, server_round: int) -> Path:
        """The directory of the server's checkpoint after `server_round`."""
        return round_dir(self.checkpoints, server_round)

    @property
    def figures(self) -> Path:
        return self.path / "figures"

    # ------------------------------------------------------------- its writers
    def write_config(self, config: dict) -> None:
        """Write the resolved run config (kebab-case keys) as config.json (atomically)."""
        write_atomically(self.config_json, json.dumps(config, indent=2, sort_keys=True) + "\n")

    def read_config(self) -> RunConfig:
        """The run config of config.json: `DamagedFileError` naming it if it is missing,
        unreadable, empty, not JSON (cut off) or not a JSON object; `ConfigError` if it holds
        keys or values this version refuses."""
        path = self.config_json
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise DamagedFileError(f"{path}: cannot be read ({err})") from None
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            reason = "empty" if not text.strip() else f"not JSON, cut off? ({err})"
            raise DamagedFileError(f"{path}: {reason}") from None
        if not isinstance(values, dict):
            raise DamagedFileError(f"{path}: not a run config (a JSON object): {text[:200]!r}")
        return RunConfig.from_flower(values)

    def run_key(self) -> str:
        """The run's key: 32 random hex digits made with the run directory (its file run-key)
        and read back when the run resumes. Every message carries it; clients keep their state
        of the run under it. It names the run and is no secret: the clients' secrets are their own."""
        if not self.run_key_file.exists():
            write_atomically(self.run_key_file, secrets.token_hex(16) + "\n")
        key = self.run_key_file.read_text().strip()
        if not RUN_KEY.fullmatch(key):
            raise RuntimeError(f"{self.run_key_file} holds no run key (32 hex digits); the run directory is damaged")
        return key

    def append_metrics(self, rows: list[tuple[int, str, str, float]]) -> None:
        """Append (round, client, metric, value) rows to metrics.csv (header on first write),
        on the disk when this returns."""
        new = not self.metrics_csv.exists()
        with open(self.metrics_csv, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(METRICS_HEADER)
            writer.writerows(rows)
            _flush(f)

    def append_log(self, line: str) -> None:
        """Append one line to log.txt, on the disk when this returns."""
        with open(self.log_txt, "a") as f:
            f.write(line + "\n")
            _flush(f)

    def truncate_metrics(self, completed_rounds: int) -> None:
        """Keep only the metrics.csv rows of rounds 1..`completed_rounds` (a resumed run writes
        round 0 and every later round again); unparsable lines of a cut-off write go too."""
        if not self.metrics_csv.exists():
            return
        table = pd.read_csv(self.metrics_csv, dtype={"client": str}, on_bad_lines="skip")
        rounds = pd.to_numeric(table["round"], errors="coerce")
        table = table[(rounds >= 1) & (rounds <= completed_rounds)]
        write_atomically(self.metrics_csv, lambda tmp: table.to_csv(tmp, index=False, columns=list(METRICS_HEADER)))


def _flush(f) -> None:
    f.flush()
    os.fsync(f.fileno())
