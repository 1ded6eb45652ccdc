"""Checkpoints of the server's side of a run after every round, and finding the run to resume.

    <run_dir>/checkpoints/round-003/     the state after round 3 (the last two rounds are kept)
        model/         the server's denoiser (CollaFuse) or the global model (FedAvg):
                       weights, AdamW state and EMA (`Denoiser.save`)
        strategy.pt    the strategy's own state: its RNG, the pool of uploads, the audit's views
        state.json     {"round", "num_server_rounds", "config_hash"}, written last

A checkpoint is written into `round-NNN.tmp/` and renamed when complete, so a kill leaves either
the new checkpoint or none of it. The clients checkpoint their private denoisers per round in
their own directories (`ClientRound.save`). The hash is `RunConfig.identity_hash()`: a
checkpoint is only ever loaded by a run of the same configuration (another cut point, seed or
budget gets a new run directory).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from collafuse_flwr.config import ConfigError, RunConfig
from collafuse_flwr.models import Denoiser
from collafuse_flwr.outputs import METRICS_HEADER

ROUND_DIR = re.compile(r"round-(\d{3,})$")


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint: the round it ends, the model's directory, the strategy's state."""

    server_round: int
    model_dir: Path
    strategy_state: dict


def complete_rounds(root: Path, is_complete: Callable[[Path], bool]) -> dict[int, Path]:
    """The complete `round-NNN` directories in `root` by round (a `round-NNN.tmp` cut off by a
    kill never counts); used for the server's checkpoints and each client's."""
    if not root.exists():
        return {}
    return {int(m.group(1)): d for d in root.iterdir() if (m := ROUND_DIR.match(d.name)) and is_complete(d)}


def drop_rounds_before(root: Path, server_round: int) -> None:
    """Delete the `round-NNN` directories in `root` of rounds before `server_round`."""
    for directory in root.iterdir():
        match = ROUND_DIR.match(directory.name)
        if match and int(match.group(1)) < server_round:
            shutil.rmtree(directory, ignore_errors=True)


def save_checkpoint(run_dir: Path, server_round: int, config: RunConfig, model: Denoiser, strategy_state: dict) -> None:
    """Write the checkpoint of `server_round` atomically; drop those older than the previous round."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"round-{server_round:03d}", root / f"round-{server_round:03d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save(tmp / "model")
    torch.save(strategy_state, tmp / "strategy.pt")
    state = {"round": server_round, "num_server_rounds": config.num_server_rounds,
             "config_hash": config.identity_hash()}
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    drop_rounds_before(root, server_round - 1)


def _latest(run_dir: Path, config: RunConfig) -> tuple[int, Path] | None:
    """(round, directory) of the newest complete checkpoint in `run_dir`, or None; raises
    `ConfigError` if it was written by another configuration (it must never be reused)."""
    rounds = complete_rounds(Path(run_dir) / "checkpoints", lambda d: (d / "state.json").exists())
    if not rounds:
        return None
    server_round = max(rounds)
    state = json.loads((rounds[server_round] / "state.json").read_text())
    if state["config_hash"] != config.identity_hash():
        raise ConfigError(
            f"{rounds[server_round]} was written by a run of another configuration (hash {state['config_hash']}, "
            f"this run {config.identity_hash()}); it is never reused"
        )
    return server_round, rounds[server_round]


def latest_checkpoint(run_dir: Path, config: RunConfig) -> Checkpoint | None:
    """The newest complete checkpoint in `run_dir`, or None. Raises `ConfigError` if it was
    written by another configuration (it must never be reused)."""
    latest = _latest(run_dir, config)
    if latest is None:
        return None
    server_round, directory = latest
    return Checkpoint(server_round, directory / "model", torch.load(directory / "strategy.pt", weights_only=False))


def resumable_run(output_dir: str, name: str, config: RunConfig) -> Path | None:
    """The newest run directory `<output_dir>/NNNNN-<name>` of the same configuration (by
    `identity_hash`) that has not completed all its rounds, or None."""
    root = Path(output_dir).expanduser().resolve()
    pattern = re.compile(rf"\d{{5}}-{re.escape(name)}$")
    for run_dir in sorted((d for d in root.glob(f"*-{name}") if pattern.match(d.name)), reverse=True):
        try:
            same = RunConfig.from_flower(json.loads((run_dir / "config.json").read_text())).identity_hash() \
                == config.identity_hash()
            latest = _latest(run_dir, config) if same else None
        except (OSError, ValueError, KeyError):  # no or unreadable config.json, another config
            continue
        if same and (latest is None or latest[0] < config.num_server_rounds):
            return run_dir
    return None


def truncate_metrics(run_dir: Path, completed_rounds: int) -> None:
    """Keep only the metrics.csv rows of rounds 1..`completed_rounds` (a resumed run writes
    round 0 and every later round again); unparsable lines of a cut-off write go too."""
    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        return
    table = pd.read_csv(path, dtype={"client": str}, on_bad_lines="skip")
    rounds = pd.to_numeric(table["round"], errors="coerce")
    table = table[(rounds >= 1) & (rounds <= completed_rounds)]
    tmp = path.with_suffix(".csv.tmp")
    table.to_csv(tmp, index=False, columns=list(METRICS_HEADER))
    tmp.replace(path)
