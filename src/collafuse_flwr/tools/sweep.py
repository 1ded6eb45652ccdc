"""Sweeps: datasets x variants x strategies x t_zeta x seeds, each a real `flwr run`, then one table.

    collafuse-sweep simulations/sweep-digits-privacy.toml [--out DIR] [--project .]

A sweep file (TOML):

    [sweep]
    datasets = ["digits"]              # one run per dataset ...
    strategies = ["collafuse"]         # ... strategy ...
    t-zeta = [0, 200, 1000]            # ... cut point ...
    seeds = [0, 1]                     # ... and seed
    num-supernodes = 5                 # the simulation federation (num-clients: 0 or the same)
    overlay = "cifar10.toml"           # optional: a run-config overlay (relative to this file)

    [run-config]                       # run config of every run
    num-server-rounds = 4

    [dataset.cifar10]                  # run config of one dataset's runs (e.g. its data-dir)
    data-dir = "../shared/data/cifar10-mini"

    [strategy.published]               # one strategy's runs: its own cut points (and run config)
    t-zeta = [200, 500]

    [variant.class]                    # optional: a run-config variant compared within the sweep
    strategies = ["collafuse"]         # sweep-only: the strategies it runs (default: all of [sweep])
    t-zeta = [0, 200]                  # sweep-only: its own cut points (default: the strategy's, [sweep]'s)
    condition = "class"                # run config of its runs, above [run-config], [dataset.<name>]
    server-condition = "full"          # and [strategy.<name>]

The four lists are non-empty and name each value once (datasets and strategies are strings,
t-zeta and seeds integers; a bool is no integer); num-supernodes is an integer >= 1. The sweep
gives every run its dataset, strategy, t-zeta, seed and output-dir: no table sets them, except
that [strategy.<name>] and [variant.<name>] may list their own t-zeta (a variant's wins).
Overlay and sweep file are UTF-8 TOML.

Without [variant.<name>] tables every strategy runs once per dataset, cut point and seed, named
`<dataset>-<strategy>-tz<t>-seed<s>`. With them, the runs are the variants' own, in file order:
each variant (a name of lowercase letters, digits and '-') runs its strategies (a subset of
[sweep] strategies; each of those is run by some variant) once per dataset, cut point and seed,
named `<dataset>-<variant>-<strategy>-tz<t>-seed<s>`. A variant's run config comes on top of all
other tables, so two variants may differ in conditioning or in their training budgets.

A `fedavg` run has no cut point: it runs once per dataset (and variant) and seed, named
`<dataset>[-<variant>]-fedavg-seed<s>` (its t_zeta column holds T). Every run's config is
validated before the first run starts. Run `<name>` writes into `<out>/runs/<name>/` and, when
it ends, `status.json` there with the final status `flwr ls` reports (`flwr run` exits 0 even
when the run failed) and its run directory. The sweep's runs share one local SuperLink, stopped
when the sweep ends (`stopping_local_superlink`). A relaunch skips runs whose status is
`finished:completed` for the same run config and retries the others. Runs under
server-condition "full" need the simulated clients' consent to send their conditions
(COLLAFUSE_SHARE_CONDITIONS=1, clients/state.py): without it the sweep stops before any run. The
simulated clients trust the runs' evaluator and take the weights files the runs name
(`launch.own_clients_settings`), through the environment of that one SuperLink: pending runs
that name different weights files stop the sweep before any run. Afterwards
`<out>/summary.csv` holds one row per run and metric (quality pooled and averaged over clients,
disclosure averaged over clients, cost per party; with the run's variant, "" without variants,
and number of clients), `<out>/results.md` the table of mean ± standard deviation over seeds per
dataset, variant, strategy and t_zeta, and `<out>/figures/` the figures against t_zeta, with the
t_zeta = 0 (global), t_zeta = T (local) and FedAvg runs as reference levels (with variants: one
line per variant and strategy). `--tables-only` runs nothing and writes these from the runs
completed so far (a sweep in progress, or one whose runs were made by several launches).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from collafuse_flwr.clients.state import SHARE_CONDITIONS_VARIABLE, ClientStateError, shares_conditions
from collafuse_flwr.config import LAUNCHER_SUPERNODES, PATH_KEYS, ConfigError, RunConfig
from collafuse_flwr.outputs import write_atomically
from collafuse_flwr.run_dir import RunDirectory
from collafuse_flwr.tools.launch import (
    command_parser,
    flwr_run,
    format_run_config,
    own_clients_settings,
    stopping_local_superlink,
)

SWEEP_KEYS = {"datasets", "strategies", "t-zeta", "seeds", "num-supernodes", "overlay"}
# [sweep]'s lists and the type of their entries
SWEEP_LISTS = {"datasets": str, "strategies": str, "t-zeta": int, "seeds": int}
SECTIONS = {"sweep", "run-config", "dataset", "strategy", "variant"}
# Run-config keys the sweep gives every run itself ([sweep] lists, --out): no table may set them
# (a strategy's or a variant's table may set its own t-zeta list)
SET_BY_SWEEP = ("dataset", "strategy", "t-zeta", "seed", "output-dir")
VARIANT_NAME = re.compile(r"[a-z0-9-]+")


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its name, full run config and where it writes."""

    name: str
    dataset: str
    variant: str  # "" in a sweep without variants
    strategy: str
    t_zeta: int
    seed: int
    num_clients: int
    timesteps: int
    run_config: dict
    out_dir: Path

    @property
    def config_hash(self) -> str:
        """Identity of the run's configuration; where it writes is not part of it, so a moved
        results directory is still recognised as complete."""
        config = {k: v for k, v in self.run_config.items() if k != "output-dir"}
        return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def status_path(self) -> Path:
        return self.out_dir / "status.json"

    def completed(self) -> bool:
        """Finished earlier with the same run config, and its run directory is still there."""
        if not self.status_path.exists():
            return False
        status = json.loads(self.status_path.read_text())
        run_dir = self.run_dir(status)
        return (status.get("status") == "finished:completed" and status.get("config_hash") == self.config_hash
                and run_dir is not None and run_dir.summary_json.exists())

    def run_dir(self, status: dict) -> RunDirectory | None:
        """The run directory a status names (stored relative to `out_dir`)."""
        return RunDirectory(self.out_dir / status["run_dir"]) if status.get("run_dir") else None


@dataclass(frozen=True)
class Variant:
    """One [variant.<name>] of a sweep: the strategies it runs, its own cut points (None: the
    strategy's or [sweep]'s) and the run config it sets."""

    strategies: list[str]
    t_zeta: list[int] | None
    run_config: dict


def load_sweep(path: Path, out: Path) -> tuple[list[SweepRun], int]:
    """The runs of sweep file `path` writing below `out`, and the number of SuperNodes;
    raises `ConfigError` naming the file and the key for bad TOML, an unknown key or section,
    a list entry of the wrong type or listed twice, or any invalid run config, before anything
    runs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    spec = _read_toml(path)
    if set(spec) - SECTIONS or "sweep" not in spec:
        raise ConfigError(f"{path}: sections must be [sweep] (required), [run-config], [dataset.<name>], "
                          f"[strategy.<name>], [variant.<name>]; got {sorted(spec)}")
    sweep = _table(path, "sweep", spec["sweep"])
    if set(sweep) - SWEEP_KEYS or not set(SWEEP_LISTS) <= set(sweep):
        raise ConfigError(f"{path}: [sweep] needs datasets, strategies, t-zeta, seeds (and may set "
                          f"num-supernodes, overlay); got {sorted(sweep)}")
    for key, kind in SWEEP_LISTS.items():
        _distinct(path, "sweep", key, sweep[key], kind)
    supernodes = sweep.get("num-supernodes", LAUNCHER_SUPERNODES)
    if isinstance(supernodes, bool) or not isinstance(supernodes, int) or supernodes < 1:
        raise ConfigError(f"{path}: [sweep] num-supernodes={supernodes!r}: must be an integer >= 1")
    tables = {"run-config": _table(path, "run-config", spec.get("run-config", {}))}
    for section, listed in (("dataset", sweep["datasets"]), ("strategy", sweep["strategies"])):
        named = _table(path, section, spec.get(section, {}))
        unknown = set(named) - set(listed)
        if unknown:
            raise ConfigError(f"{path}: [{section}.{sorted(unknown)[0]}] is not one of the sweep's {section} values")
        tables |= {f"{section}.{name}": _table(path, f"{section}.{name}", table) for name, table in named.items()}
    for name, table in tables.items():
        _check_not_set_by_sweep(path, name, table, own_cuts=name.startswith("strategy.") and name != "strategy.fedavg")
    variants = _variants(path, _table(path, "variant", spec.get("variant", {})), sweep["strategies"])
    run_config = tables["run-config"]
    if "overlay" in sweep:
        if not isinstance(sweep["overlay"], str):
            raise ConfigError(f"{path}: [sweep] overlay={sweep['overlay']!r}: must be a file name (a string)")
        overlay = path.parent / sweep["overlay"]
        if not overlay.is_file():
            raise ConfigError(f"{path}: overlay {overlay} does not exist")
        run_config = {**_read_toml(overlay), **run_config}
    strategies = {name: dict(tables.get(f"strategy.{name}", {})) for name in sweep["strategies"]}
    for name, table in strategies.items():
        if "t-zeta" in table:
            _distinct(path, f"strategy.{name}", "t-zeta", table["t-zeta"], int)
    runs = []
    for dataset, variant, seed in itertools.product(sweep["datasets"], variants, sweep["seeds"]):
        own = variants[variant]
        for strategy in own.strategies:
            overrides = dict(strategies[strategy])
            cuts = overrides.pop("t-zeta", sweep["t-zeta"])
            base = {**run_config, **tables.get(f"dataset.{dataset}", {}), **overrides, **own.run_config,
                    "dataset": dataset, "strategy": strategy, "seed": seed}
            if strategy == "fedavg":  # no cut point: one run, recorded at t_zeta = T
                cuts = [base.get("timesteps", RunConfig().timesteps)]
            elif own.t_zeta is not None:
                cuts = own.t_zeta
            label = f"{dataset}-{variant}-{strategy}" if variant else f"{dataset}-{strategy}"
            for t_zeta in cuts:
                name = f"{label}-seed{seed}" if strategy == "fedavg" else f"{label}-tz{t_zeta}-seed{seed}"
                runs.append(_sweep_run(path, out, name, variant, {**base, "t-zeta": t_zeta}, supernodes))
    runs.sort(key=lambda r: (sweep["datasets"].index(r.dataset), list(variants).index(r.variant),
                             sweep["strategies"].index(r.strategy), r.t_zeta, r.seed))
    return runs, supernodes


def _check_not_set_by_sweep(path: Path, name: str, table: dict, own_cuts: bool) -> None:
    """A `ConfigError` naming the file and [name] if `table` sets a key the sweep gives every
    run (t-zeta is allowed when `own_cuts`: a table of runs with cut points)."""
    taken = [key for key in SET_BY_SWEEP if key in table and not (key == "t-zeta" and own_cuts)]
    if taken:
        raise ConfigError(f"{path}: [{name}] sets {taken[0]}, which the sweep gives every run "
                          "([sweep] datasets, strategies, t-zeta, seeds; output-dir: --out; "
                          "fedavg has no cut point)")


def _variants(path: Path, tables: dict, strategies: list[str]) -> dict[str, Variant]:
    """The [variant.<name>] tables of sweep file `path` in file order, checked against the
    sweep's `strategies`; without any, one unnamed variant "" that runs every strategy."""
    if not tables:
        return {"": Variant(strategies, None, {})}
    variants = {}
    for name, table in tables.items():
        where = f"variant.{name}"
        config = dict(_table(path, where, table))
        if not VARIANT_NAME.fullmatch(name):
            raise ConfigError(f"{path}: [{where}]: a variant's name must consist of lowercase letters, "
                              "digits and '-'")
        runs = config.pop("strategies", strategies)
        _distinct(path, where, "strategies", runs, str)
        foreign = [s for s in runs if s not in strategies]
        if foreign:
            raise ConfigError(f"{path}: [{where}] strategies: {foreign[0]!r} is not one of the sweep's strategy values")
        _check_not_set_by_sweep(path, where, config, own_cuts=any(s != "fedavg" for s in runs))
        cuts = config.pop("t-zeta", None)
        if cuts is not None:
            _distinct(path, where, "t-zeta", cuts, int)
        variants[name] = Variant(runs, cuts, config)
    idle = [s for s in strategies if not any(s in v.strategies for v in variants.values())]
    if idle:
        raise ConfigError(f"{path}: [sweep] strategies lists {idle[0]!r}, which no [variant.<name>] runs")
    return variants


def _read_toml(path: Path) -> dict:
    """The TOML file `path` (UTF-8), or a `ConfigError` naming it."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # TOMLDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"{path}: not a readable TOML file ({err})") from None


def _table(path: Path, name: str, value: Any) -> dict:
    """`value` if it is a TOML table, else a `ConfigError` naming the file and [name]."""
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: [{name}] must be a table; got {value!r}")
    return value


def _distinct(path: Path, table: str, key: str, value: Any, kind: type) -> None:
    """A `ConfigError` naming the file, [table] and key unless `value` is a non-empty list of
    `kind` (a bool is no integer) with no entry twice (two runs would share one directory)."""
    if not isinstance(value, list) or not value or any(isinstance(v, bool) or not isinstance(v, kind) for v in value):
        what = "integers" if kind is int else "strings"
        raise ConfigError(f"{path}: [{table}] {key} must be a non-empty list of {what}; got {value!r}")
    twice = sorted({v for v in value if value.count(v) > 1})
    if twice:
        raise ConfigError(f"{path}: [{table}] {key} lists {twice} more than once; each value names one run")


def _sweep_run(path: Path, out: Path, name: str, variant: str, config: dict, supernodes: int) -> SweepRun:
    """One validated run of sweep file `path` (relative paths resolved, output below `out`) in
    a federation of `supernodes` SuperNodes (its num-clients 0, or equal to it)."""
    run_out = (out / "runs" / name).resolve()
    config = {**config, "output-dir": str(run_out)}
    try:
        # before resolving: refuses NUL bytes, unknown homes
        checked = RunConfig.from_flower(config).for_federation(supernodes)
    except ConfigError as err:
        raise ConfigError(f"{path}, run {name}: {err}") from err
    for key in PATH_KEYS:  # runs start elsewhere: relative paths are resolved here
        if config.get(key):
            try:
                config[key] = str(Path(config[key]).expanduser().resolve())
            except RuntimeError as err:  # a symlink loop
                raise ConfigError(f"{path}, run {name}: {key}={config[key]!r}: {err}") from None
    return SweepRun(name, checked.dataset, variant, checked.strategy, checked.t_zeta, checked.seed,
                    checked.num_clients, checked.timesteps, config, run_out)


def run_sweep(runs: list[SweepRun], project: Path, supernodes: int, env: dict | None = None,
              echo=print) -> list[dict]:
    """Run every run not completed before; return their statuses (in sweep order). The local
    SuperLink the runs start is stopped at the end (also when a run raises or Ctrl-C)."""
    federation = f"num-supernodes={supernodes} client-resources-num-cpus=1 client-resources-num-gpus=0"
    statuses = []
    with stopping_local_superlink(env):
        for i, run in enumerate(runs, 1):
            if run.completed():
                echo(f"[{i}/{len(runs)}] {run.name}: already completed, skipped")
                statuses.append(json.loads(run.status_path.read_text()))
                continue
            echo(f"[{i}/{len(runs)}] {run.name}: running")
            outcome = flwr_run(project, format_run_config(run.run_config), federation, env=env)
            status = {"name": run.name, "status": outcome.status, "run_id": outcome.run_id,
                      "run_dir": os.path.relpath(outcome.run_dir, run.out_dir) if outcome.run_dir else None,
                      "config_hash": run.config_hash, "run_config": run.run_config}
            write_atomically(run.out_dir / "flwr.log", outcome.log)
            write_atomically(run.status_path, json.dumps(status, indent=2) + "\n")
            echo(f"[{i}/{len(runs)}] {run.name}: {outcome.status}")
            statuses.append(status)
    return statuses


def summary_table(runs: list[SweepRun]) -> pd.DataFrame:
    """One row per run and metric: quality (`pooled`, `client-mean`), disclosure
    (`client-mean`, `pooled`), cost (`server`, `client-mean`), the largest epsilon of any
    client (`max`; none for FedAvg, null when infinite); a run not `completed()` (failed,
    missing, or finished with another run config than the sweep file's) gives one row with
    metric "status" and no value. Every row names its run's variant ("" without variants),
    number of clients and T."""
    rows = []
    for run in runs:
        status = json.loads(run.status_path.read_text()) if run.status_path.exists() else {"status": "not run"}
        done = run.completed()
        if not done and status["status"] == "finished:completed":
            status["status"] = "stale: another run config"
        base = {"run": run.name, "dataset": run.dataset, "variant": run.variant, "strategy": run.strategy,
                "t_zeta": run.t_zeta, "seed": run.seed, "num_clients": run.num_clients,
                "status": status["status"], "timesteps": run.timesteps}
        if not done:
            rows.append({**base, "party": "", "metric": "status", "value": None})
            continue
        summary = json.loads(run.run_dir(status).summary_json.read_text())
        for section in ("quality", "disclosure"):
            block = summary[section]
            for metric, value in block.get("pooled", {}).items():
                rows.append({**base, "party": "pooled", "metric": metric, "value": value})
            for metric, value in _mean_over(block.get("clients", {})).items():
                rows.append({**base, "party": "client-mean", "metric": metric, "value": value})
        for party, values in (("server", summary["cost"]["server"]), ("client-mean", summary["cost"]["clients_mean"])):
            rows += [{**base, "party": party, "metric": m, "value": v} for m, v in values.items()]
        if summary.get("privacy"):
            rows.append({**base, "party": "max", "metric": "epsilon", "value": summary["privacy"]["max_epsilon"]})
    return pd.DataFrame(rows)


def _mean_over(clients: dict) -> dict[str, float]:
    table = pd.DataFrame.from_dict(clients, orient="index").apply(pd.to_numeric, errors="coerce")
    return table.mean().dropna().to_dict() if len(table) else {}


def write_tables(runs: list[SweepRun], out: Path) -> None:
    """Write `out`/summary.csv, results.md and figures/ from the runs of `runs` completed so far
    (the others are rows with their status and no value)."""
    from collafuse_flwr.tools.sweep_plots import plot_sweep
    from collafuse_flwr.tools.sweep_tables import results_table, to_markdown

    table = summary_table(runs)
    write_atomically(out / "summary.csv", lambda tmp: table.to_csv(tmp, index=False))
    write_atomically(out / "results.md", to_markdown(results_table(table)))
    for figure in plot_sweep(table, out / "figures"):
        print(figure)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser(
        "collafuse-sweep",
        "Run every combination of a sweep file (datasets x variants x strategies x t_zeta x\n"
        "seeds), each a real `flwr run`, skipping runs already completed, then write one\n"
        "table of mean and sd over seeds, and its figures.",
        "  collafuse-sweep simulations/sweep-digits-privacy.toml\n"
        "    writes results/sweeps/sweep-digits-privacy/: runs/, summary.csv, results.md, figures/;\n"
        "    the sweep file format: docs/experiments.md",
    )
    parser.add_argument("sweep_file", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: results/sweeps/<sweep file name>")
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--tables-only", action="store_true",
                        help="run nothing: write the tables and figures of the runs completed so far")
    args = parser.parse_args(argv)
    out = (args.out or Path("results") / "sweeps" / args.sweep_file.stem).resolve()
    try:
        runs, supernodes = load_sweep(args.sweep_file, out)
    except ConfigError as err:
        parser.error(str(err))
    if args.tables_only:
        completed = sum(run.completed() for run in runs)
        write_tables(runs, out)
        print(f"{completed}/{len(runs)} runs completed so far; nothing run; summary: {out / 'summary.csv'}")
        return 0
    asking = [run.name for run in runs
              if not run.completed() and RunConfig.from_flower(run.run_config).sends_conditions]
    try:
        allowed = shares_conditions({})
    except ClientStateError as err:
        parser.error(str(err))
    if asking and not allowed:
        parser.error(f"{len(asking)} run(s) ask the simulated clients for their conditions (server-condition='full'; "
                     f"{asking[0]}, ...), which they send only if allowed: set {SHARE_CONDITIONS_VARIABLE}=1")
    given = {json.dumps(own_clients_settings(run.run_config, os.environ), sort_keys=True)
             for run in runs if not run.completed()}
    if len(given) > 1:
        parser.error("the pending runs name different fid-weights, fcd-weights or text-weights, but their simulated "
                     "clients share the environment of the sweep's one SuperLink (set by its first run): sweep them "
                     "separately, or give the clients their weights through COLLAFUSE_FID_WEIGHTS, "
                     "COLLAFUSE_FCD_WEIGHTS, COLLAFUSE_TEXT_WEIGHTS")
    statuses = run_sweep(runs, args.project, supernodes)
    write_tables(runs, out)
    failed = [s["name"] for s in statuses if s["status"] != "finished:completed"]
    print(f"{len(runs) - len(failed)}/{len(runs)} runs completed; summary: {out / 'summary.csv'}")
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
