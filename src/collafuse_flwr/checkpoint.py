"""Checkpoints of the server's side of a run after every round, and which run to resume.

    <run_dir>/checkpoints/round-003/     the state after round 3 (the last two rounds are kept;
                                         `RunDirectory.checkpoint` names it)
        model/         the server's denoiser (CollaFuse) or the global model (FedAvg):
                       weights, AdamW state and EMA (`Denoiser.save`)
        strategy.pt    the strategy's own state: its RNG, the pool of uploads, the audit's views
        state.json     {"round", "num_server_rounds", "config_hash"}

A checkpoint directory is written whole (`write_directory_atomically`: into `round-NNN.tmp/`,
every file fsync'd, then renamed), so a kill leaves either the new checkpoint or none of it; a
`round-NNN.tmp/` is never read. The clients checkpoint their private denoisers per round in
their own directories (`ClientRound.save`). The hash is `RunConfig.identity_hash()`: a
checkpoint is only ever loaded by a run of the same configuration (another cut point, seed or
budget gets a new run directory).

A damaged checkpoint stops the run. The newest `round-NNN/` of the run to resume is read in
full before anything is written: state.json (present, JSON, its keys and their types, its
round, the configuration's hash), strategy.pt (tensors and plain values only, never a pickle)
and model/ (`Denoiser.load`). Anything wrong raises `DamagedFileError` naming the file and
what is wrong, and saying how to go on: delete that directory to resume from the round before,
or run with resume=false to start a new run. It never steps back on its own: the clients keep
their denoisers of the last two rounds only, so a silent step back could restart clients from
scratch beside a server that is a round behind them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from collafuse_flwr.config import ConfigError, RunConfig
from collafuse_flwr.diffusion.models import Denoiser
from collafuse_flwr.outputs import (
    DamagedFileError,
    complete_rounds,
    drop_rounds_before,
    read_tensors,
    write_directory_atomically,
)
from collafuse_flwr.run_dir import RunDirectory


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint: the round it ends, its model (loaded), the strategy's state."""

    server_round: int
    model: Denoiser
    strategy_state: dict


def checkpoint_rounds(run_dir: RunDirectory) -> dict[int, Path]:
    """The complete checkpoint directories of `run_dir` by round."""
    return complete_rounds(run_dir.checkpoints, Path.is_dir)


def save_checkpoint(
    run_dir: RunDirectory, server_round: int, config: RunConfig, model: Denoiser, strategy_state: dict
) -> None:
    """Write the checkpoint of `server_round` into `run_dir` atomically; drop those older than
    the previous round. `strategy_state` holds tensors, containers of them and plain values
    only (it is loaded with `weights_only=True`)."""
    state = {"round": server_round, "num_server_rounds": config.num_server_rounds,
             "config_hash": config.identity_hash()}

    def write(tmp: Path) -> None:
        model.save(tmp / "model")
        torch.save(strategy_state, tmp / "strategy.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")

    write_directory_atomically(run_dir.checkpoint(server_round), write)
    drop_rounds_before(run_dir.checkpoints, server_round - 1)


STATE_KEYS = {"round": int, "num_server_rounds": int, "config_hash": str}


def latest_checkpoint(
    run_dir: RunDirectory, config: RunConfig, device: torch.device | str = "cpu"
) -> Checkpoint | None:
    """The newest checkpoint in `run_dir`, read and checked in full (see above; its model is
    loaded onto `device` with the server's learning rate and EMA decay), or None if there is
    none. `DamagedFileError` if it is damaged; `ConfigError` if it was written by another
    configuration (it is never reused)."""
    rounds = checkpoint_rounds(run_dir)
    if not rounds:
        return None
    server_round = max(rounds)
    directory = rounds[server_round]
    try:
        _check_state(directory / "state.json", server_round, config)
        strategy_state = read_tensors(directory / "strategy.pt")
        if not isinstance(strategy_state, dict):
            raise DamagedFileError(f"{directory / 'strategy.pt'}: not a strategy state (a dict)")
        model = Denoiser.load(directory / "model", config.server_lr, config.ema_decay, device)
    except DamagedFileError as err:
        raise DamagedFileError(
            f"{err}. The newest checkpoint {directory} is damaged, so the run stops: delete that directory "
            "to resume from the round before it, or run with resume=false to start a new run"
        ) from None
    return Checkpoint(server_round, model, strategy_state)


def _check_state(path: Path, server_round: int, config: RunConfig) -> None:
    """Check `round-NNN/state.json`: `DamagedFileError` if it is missing, empty, not JSON, lacks
    a key of `STATE_KEYS` or names another round; `ConfigError` if another configuration wrote it."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DamagedFileError(f"{path}: cannot be read ({err})") from None
    if not text.strip():
        raise DamagedFileError(f"{path}: empty")
    try:
        state = json.loads(text)
    except json.JSONDecodeError as err:
        raise DamagedFileError(f"{path}: not JSON, cut off? ({err})") from None
    if not isinstance(state, dict) or any(type(state.get(k)) is not t for k, t in STATE_KEYS.items()):
        raise DamagedFileError(f"{path}: not a checkpoint state (needs "
                               f"{', '.join(f'{k}: {t.__name__}' for k, t in STATE_KEYS.items())}): {text[:200]!r}")
    if state["round"] != server_round:
        raise DamagedFileError(f"{path}: says round {state['round']}, its directory round {server_round}")
    if state["config_hash"] != config.identity_hash():
        raise ConfigError(
            f"{path} was written by a run of another configuration (hash {state['config_hash']}, "
            f"this run {config.identity_hash()}); it is never reused"
        )


def resumable_run(config: RunConfig) -> RunDirectory | None:
    """The newest run directory of `config`'s configuration (`RunDirectory.runs_of`) whose
    newest checkpoint is of a round before the last, or None. Its checkpoint is checked by
    `latest_checkpoint`."""
    return next((run_dir for run_dir in RunDirectory.runs_of(config)
                 if max(checkpoint_rounds(run_dir), default=0) < config.num_server_rounds), None)
