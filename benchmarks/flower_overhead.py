"""What Flower's runtime costs: one configuration run through `flwr run` and in process.

    .venv/bin/python benchmarks/flower_overhead.py [--repeats 3] [--run-config ITEM ...]
                                                   [--cpus-per-client 1] [--work-dir DIR] [--echo]

`--run-config` takes TOML overlays and "key=value ..." strings as `collafuse-run` does (default:
none, the project's default run, which `make run` runs). Each repeat runs the configuration
twice, the order alternating from repeat to repeat:

- through `flwr run` (`collafuse_flwr.tools.launch.flwr_run`, as `make run`) on a local
  SuperLink of its own (`isolated_env`: own FLWR_HOME and ports), `num-clients` SuperNodes of
  `--cpus-per-client` CPUs: Ray runs cores / cpus-per-client ClientApps at once, each actor
  with that many torch threads; timed from the launch until `flwr_run` returns (the run
  finished and its status read); the SuperLink is stopped afterwards, untimed;
- in process: a fresh Python process runs `collafuse_flwr.tools.inprocess.run_in_process`
  (the ServerApp's setup, Flower's strategy loop and the ClientApp's handlers, each message
  handed over in that process, one client at a time on all the process's torch threads);
  timed from its launch to its exit.

Both use the same clients' state root, so the same clients (their secrets) compute the same
thing: their metrics.csv are compared without the seconds rows ("same": equal to the last bit;
else the largest relative difference). Printed per repeat: the seconds of each, their ratio
flwr / in process, whether the results are the same, and the training throughput inside each
run (median over rounds, and over clients, of images-seen / train-seconds; a client's
train-seconds include saving its checkpoint and noising its uploads); then the medians and the
median of the paired ratios, and `benchmarks/throughput.py`'s isolated training throughput of
the same denoisers, batch and data with the threads each side had (client: --cpus-per-client,
the actors' thread count; server: the process's own, as the ServerApp's) as the reference of
the in-run figures. Measure on an idle machine; the figures of one invocation are comparable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from flwr.common.config import get_project_config, parse_config_args

from collafuse_flwr.config import LAUNCHER_SUPERNODES
from collafuse_flwr.run_dir import RunDirectory
from collafuse_flwr.summary import read_metrics, reproducible_metrics
from collafuse_flwr.tools.inprocess import run_in_process
from collafuse_flwr.tools.launch import (
    flwr_run,
    format_run_config,
    merge_run_configs,
    stopping_local_superlink,
)
from many_clients import run_env
from throughput import measure, run_config

PROJECT = Path(__file__).resolve().parents[1]


def flower_run_config(project: Path, items: list[str], output_dir: Path) -> dict:
    """The run config a ServerApp of `project` receives for `items`: the project's
    [tool.flwr.app.config] with the items on top and `output_dir`, its num-clients the
    launcher's federation where it is 0 (both runs are given that many SuperNodes)."""
    config = dict(get_project_config(project)["tool"]["flwr"]["app"]["config"])
    if items:
        config.update(parse_config_args([merge_run_configs(items)]))
    return dict(config, **{"output-dir": str(output_dir), "num-clients": config["num-clients"] or LAUNCHER_SUPERNODES})


def through_flower(config: dict, env: dict, cpus: int, work: Path, echo: bool) -> tuple[float, Path | None, str]:
    """(wall seconds, run directory, status) of a `flwr run` of `config`."""
    federation = f"num-supernodes={config['num-clients']} client-resources-num-cpus={cpus} client-resources-num-gpus=0"
    with stopping_local_superlink(env):
        start = time.perf_counter()
        outcome = flwr_run(PROJECT, format_run_config(config), federation, env=env, cwd=work, echo=echo)
        seconds = time.perf_counter() - start
    if not outcome.ok:
        print(f"flwr run: {outcome.status}; end of its log:\n{outcome.log[-3000:]}", file=sys.stderr)
    return seconds, outcome.run_dir, outcome.status


def in_process(config: dict, env: dict, work: Path) -> tuple[float, Path | None, str]:
    """(wall seconds, run directory, status) of `run_in_process` in a fresh Python process."""
    config_file = work / "in-process-config.json"
    config_file.write_text(json.dumps(config))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", str(config_file), env["COLLAFUSE_CLIENT_STATE"]],
                          env=env, cwd=work, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        print(f"in process: exit {done.returncode}; end of its output:\n{done.stderr[-3000:]}", file=sys.stderr)
        return seconds, None, f"exit {done.returncode}"
    return seconds, Path(done.stdout.strip().splitlines()[-1]), "completed"


def compare(a: Path | None, b: Path | None) -> str:
    """"same" if the two runs' results are equal to the last bit, else their largest relative
    difference (or why they cannot be compared)."""
    if a is None or b is None:
        return "n/a (a run failed)"
    left, right = reproducible_metrics(RunDirectory(a)), reproducible_metrics(RunDirectory(b))
    if not left[["round", "client", "metric"]].equals(right[["round", "client", "metric"]]):
        return "different rows"
    if left["value"].equals(right["value"]):
        return "same"
    scale = left["value"].abs().clip(lower=1e-12)
    return f"max rel. diff {((left['value'] - right['value']).abs() / scale).max():.2e}"


def throughput(run_dir: Path | None) -> tuple[float, float]:
    """(client, server) training images/s inside a run: median over rounds (and clients) of
    images-seen / train-seconds."""
    if run_dir is None:
        return float("nan"), float("nan")
    metrics = read_metrics(RunDirectory(run_dir))
    wide = metrics[metrics["metric"].isin(["images-seen", "train-seconds"])].pivot_table(
        index=["round", "client"], columns="metric", values="value").dropna()
    wide = wide[wide["images-seen"] > 0]
    rate = wide["images-seen"] / wide["train-seconds"]
    server = rate[rate.index.get_level_values("client") == "server"]
    client = rate[rate.index.get_level_values("client") != "server"]
    median = lambda s: float(statistics.median(s)) if len(s) else float("nan")  # noqa: E731
    return median(client), median(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--run-config", action="append", default=[], help="TOML files and key=value strings")
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--work-dir", type=Path, help="keep FLWR_HOME, client state and run directories here")
    parser.add_argument("--echo", action="store_true", help="stream the flwr runs' output to stderr")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG_JSON", "STATE_ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_dir = run_in_process(json.loads(Path(args.child[0]).read_text()), Path(args.child[1]))
        print(run_dir.path)
        return
    work = (args.work_dir or Path(tempfile.mkdtemp(prefix="flower-overhead-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = run_env(work / "flwr-home", PROJECT)
    print(f"work directory: {work}", file=sys.stderr)
    rows = []
    for repeat in range(args.repeats):
        configs = {kind: flower_run_config(PROJECT, args.run_config, work / f"{kind}-{repeat}")
                   for kind in ("flwr", "in-process")}
        runs = {}
        order = ("flwr", "in-process") if repeat % 2 == 0 else ("in-process", "flwr")
        for kind in order:
            runs[kind] = (through_flower(configs[kind], env, args.cpus_per_client, work, args.echo) if kind == "flwr"
                          else in_process(configs[kind], env, work))
        (fs, fdir, fstatus), (ps, pdir, pstatus) = runs["flwr"], runs["in-process"]
        rows.append({"repeat": repeat + 1, "first": order[0], "flwr s": round(fs, 1), "in-process s": round(ps, 1),
                     "ratio": round(fs / ps, 3), "results": compare(fdir, pdir),
                     "flwr client/server img/s": "{:.0f} / {:.0f}".format(*throughput(fdir)),
                     "in-process client/server img/s": "{:.0f} / {:.0f}".format(*throughput(pdir)),
                     "status": f"{fstatus}; {pstatus}"})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    ratios = [row["ratio"] for row in rows]
    print(f"\nmedian flwr {statistics.median(r['flwr s'] for r in rows):.1f} s, in process "
          f"{statistics.median(r['in-process s'] for r in rows):.1f} s, median paired ratio "
          f"{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}), {len(rows)} pairs")
    config = run_config(args.run_config)
    isolated_client = measure(config, args.cpus_per_client, 1024, 3)["client train img/s"]
    isolated_server = measure(config, torch.get_num_threads(), 1024, 3)["server train img/s"]
    print(f"isolated training throughput (benchmarks/throughput.py, 1024 images, median of 3): client "
          f"{isolated_client:.0f} img/s on {args.cpus_per_client} thread(s), server {isolated_server:.0f} img/s "
          f"on {torch.get_num_threads()} thread(s)")


if __name__ == "__main__":
    main()
