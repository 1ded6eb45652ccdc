"""How one real `flwr run` of CollaFuse scales with the number of virtual clients.

    .venv/bin/python benchmarks/many_clients.py [--clients 5 20 100] [--rounds 3] [--csv PATH]
                                                [--clients-per-round K] [--eval-clients M]
                                                [--copies C] [--client-images N] [--project DIR]
                                                [--work-dir DIR] [--echo]

For each client count N, one `flwr run` (through `collafuse_flwr.tools.launch.flwr_run`) of the
project in `--project` (default: this repository; its `src/` is put first on PYTHONPATH, so a
snapshot such as `git archive HEAD` can be measured while the work tree is being edited) on
its own local SuperLink (`collafuse_flwr.tools.launch.isolated_env`, as the tests use it: own
FLWR_HOME and ports, no pretrained weights, so FID/KID/FCD are skipped),
N SuperNodes of 1 CPU, the embedded digits at 8x8 (default partition label-groups, 2 classes
per client: about 14 training and 4 held-out images per client at N = 100; with `--copies C`
an image folder of C shifted copies of every digit, `shifted_digits`, for up to a thousand
clients), a U-Net of widths 8,16, T = 100, t_zeta = 20, 64 client (`--client-images`) and 256 server
images per round, DDIM-10, 4 generated images per client and 8 disclosure images; `--clients-per-round`
and `--eval-clients` draw a sample of the clients for each round and for the evaluation. The SuperLink is stopped by PID
after the run with everything below it (`collafuse_flwr.tools.launch.stopping_local_superlink`),
and any process of the run still alive 30 s later is ended and reported.

What is measured, per run:

- time: every line of the streamed `flwr run --stream` output is stamped when it reaches
  this process (Flower's log lines carry no timestamps, and metrics.csv and log.txt hold
  only the parties' own compute seconds, not wall time). A round's training time runs from
  `[ROUND k/N]` to the strategy's `round k/N | ...` line (all clients train and upload, the
  server validates, trains and checkpoints); "s/round" is their median, "rounds s" lists them.
  "eval s" runs from the last round's `round N/N |` line to `Strategy execution finished`
  (the server's half of the sampler, every client's half and quality metrics, the disclosure
  audit; only the last round evaluates). "strategy s" is Flower's own figure for all rounds
  with the evaluation (`Strategy execution finished in ...s`, its clock, not a stamp).
  "startup s" runs from the launch to `[ROUND 1/N]` (SuperLink start, FAB, Ray, dataset
  decoding, partition report, feature network); "total s" until `flwr_run` returns (Ray's
  shutdown, and `flwr ls` asked for the final status). Logs reach the CLI by polling (Flower
  uploads them every 0.2 s and streams every 0.5 s), so each stamp is late by up to about a
  second; differences between stamps are good to about +-1 s.
- memory: every 0.2 s, /proc is read for this process's descendants (the `flwr` CLI) and for
  the SuperLink of the run's port (`collafuse_flwr.tools.launch.local_superlinks`, found by
  its command line; it is daemonised) with all of its descendants (flwr-simulation running the ServerApp, Ray's GCS,
  raylet and worker/actor processes). "RSS sum" is the peak over samples of the summed
  resident set sizes; it counts every shared page (libtorch, Ray's object store) once per
  process that maps it, so "PSS sum" (proportional set size, shared pages split between
  their users) is given beside it as the better estimate of the RAM the run really takes; it
  is sampled every 2 s only, since the kernel needs several ms per large process for it (at
  every 0.2 s the sampler took a quarter of a core; now about 5 %). "max RSS" is the peak
  RSS of the largest single process, named in "largest"; "processes" the most processes
  seen at once. Peaks shorter than the sampling interval can be missed. psutil is not
  importable from the project's environment (Ray vendors its own copy), hence /proc: Linux
  only.
- disk: the bytes on disk (allocated blocks) of the clients' state of the run at its end
  (below their state root, COLLAFUSE_CLIENT_STATE, under the run's key: never in the server's
  run directory), i.e. their private denoisers, optimizers and EMAs (every checkpoint they
  keep) and generated images, in total and per client.

Caveats: one run per N, timed on whatever else the machine is doing: measure on an idle
machine (on 2 busy cores the server's per-client evaluation loops, small torch calls on 2
intra-op threads, ran 8 times slower). Round 1 includes the Ray actors' first imports, so
use 3 or more rounds for a median of warm rounds. With 1 CPU per client, Ray runs as many
ClientApps at a time as there are cores. Per-client quality figures rest on the few held-out
images a client has (about 4 at N = 100): this benchmark measures cost, not quality.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import math
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from collafuse_flwr.config import RunConfig
from collafuse_flwr.data import load_table
from collafuse_flwr.data.export import write_folder
from collafuse_flwr.run_dir import RunDirectory
from collafuse_flwr.tools.launch import (
    alive,
    descendants,
    end_processes,
    flwr_run,
    format_run_config,
    isolated_env,
    local_superlinks,
    process_table,
    stopping_local_superlink,
)

PROJECT = Path(__file__).resolve().parents[1]
ROUND_START = re.compile(r"\[ROUND (\d+)/\d+\]")
ROUND_TRAINED = re.compile(r"\bround (\d+)/\d+ \|")
FINISHED = re.compile(r"Strategy execution finished in ([\d.]+)s")
MB = 1024 * 1024
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
COLUMNS = ("clients", "per round", "evaluated", "rounds", "status", "startup s", "s/round", "rounds s", "eval s",
           "strategy s", "total s", "RSS sum MB", "PSS sum MB", "max RSS MB", "largest", "processes",
           "client models MB", "per client KB")


def rss_kb(pid: int) -> int | None:
    """Resident set size of `pid` in kB (cheap), or None if it has ended."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KB
    except OSError:
        return None


def pss_kb(pid: int) -> int:
    """Proportional set size of `pid` in kB (0 if it has ended); the kernel walks the
    process's page tables for it, several ms for a process of 1 GB."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in lines if line.startswith("Pss:")), 0)


class TreeMemory(threading.Thread):
    """Samples the RSS of the run's processes (this process's descendants and those of
    `roots(process_table)`) every `interval` seconds, and their PSS every `pss_every`-th
    sample, until `stop()`; `peak_by_name` keeps each process name's peak RSS (kB)."""

    def __init__(self, roots: Callable[[dict], Iterable[int]], interval: float = 0.2, pss_every: int = 10):
        super().__init__(daemon=True)
        self.roots, self.interval, self.pss_every, self.halt = roots, interval, pss_every, threading.Event()
        self.samples = 0
        self.rss_sum = self.pss_sum = self.max_rss = self.processes = 0  # peaks, kB and count
        self.largest = ""
        self.peak_by_name: dict[str, int] = {}
        self.seen: set[tuple[int, int]] = set()  # (pid, start) of every process of the run

    def run(self) -> None:
        while not self.halt.is_set():
            self.sample()
            self.halt.wait(self.interval)

    def stop(self) -> None:
        self.halt.set()
        self.join()

    def sample(self) -> None:
        table = process_table()
        me = os.getpid()
        members = descendants(table, {me, *self.roots(table)}) - {me}
        rss = {pid: kb for pid in members if (kb := rss_kb(pid)) is not None}
        self.seen.update(table[pid].identity for pid in rss)
        for pid, kb in rss.items():
            self.peak_by_name[table[pid].name] = max(kb, self.peak_by_name.get(table[pid].name, 0))
            if kb > self.max_rss:
                self.max_rss, self.largest = kb, table[pid].name
        self.rss_sum, self.processes = max(self.rss_sum, sum(rss.values())), max(self.processes, len(rss))
        if self.samples % self.pss_every == 0:
            self.pss_sum = max(self.pss_sum, sum(map(pss_kb, rss)))
        self.samples += 1


class LineClock(io.TextIOBase):
    """A stdout stand-in that stamps each complete line with the monotonic time it arrived."""

    def __init__(self, echo: bool):
        self.lines: list[tuple[float, str]] = []
        self.partial, self.echo = "", echo

    def write(self, text: str) -> int:
        now = time.monotonic()
        *done, self.partial = (self.partial + text).split("\n")
        for line in done:
            self.lines.append((now, line))
            if self.echo:
                print(line, file=sys.stderr, flush=True)
        return len(text)


def run_env(home: Path, project: Path) -> dict[str, str]:
    """`isolated_env` (as the tests use it), unbuffered, with `project`'s sources first."""
    env = isolated_env(home)
    env["PYTHONUNBUFFERED"] = "1"  # the CLI's streamed lines must not wait in a pipe buffer
    # The clients are the user's own (simulated or deployed on this machine): they trust the run's
    # evaluator and release statistics of the few images a timing run generates (clients/release.py).
    env.update(COLLAFUSE_TRUST_RUN_EVALUATOR="1", COLLAFUSE_MIN_RELEASE_IMAGES="2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(project / "src"), os.environ.get("PYTHONPATH")) if p)
    return env


def run_config(clients: int, rounds: int, output_dir: Path, per_round: int = 0, evaluated: int = 0,
               data_dir: Path | None = None, client_images: int = 64) -> str:
    """The benchmark's run config (the sampling keys only when set, so that a `--project`
    snapshot from before they existed runs too)."""
    return format_run_config({
        "num-server-rounds": rounds, "num-clients": clients, "image-size": 8, "timesteps": 100,
        "t-zeta": 20, "unet-block-channels": "8,16", "client-images-per-round": client_images,
        "server-images-per-round": 256, "sampling-steps": 10, "eval-num-samples": 4,
        "metric-classifier-epochs": 1, "disclosure-num-images": 8, "output-dir": str(output_dir),
        **({"clients-per-round": per_round} if per_round else {}), **({"eval-clients": evaluated} if evaluated else {}),
        **({"data-dir": str(data_dir)} if data_dir else {}),
    })


def shifted_digits(copies: int, directory: Path) -> Path:
    """An image folder (labels.csv) of the embedded digits at 8x8, each digit `copies` times,
    copy k shifted by (k // 3 - 1, k % 3 - 1) pixels (background shifted in; 1 to 9 copies):
    enough images for a thousand clients of a cost measurement (not a dataset to judge quality
    on)."""
    if not 1 <= copies <= 9:
        raise ValueError(f"--copies {copies}: 1 to 9 (the shifts by -1, 0, 1 pixel in each direction)")
    table = load_table(RunConfig.from_flower({"image-size": 8}))
    shifted = []
    for k in range(copies):
        dy, dx = k // 3 % 3 - 1, k % 3 - 1
        images = np.roll(table.images, (dy, dx), axis=(2, 3)).copy()
        if dy:
            images[:, :, 0 if dy > 0 else -1, :] = -1.0
        if dx:
            images[:, :, :, 0 if dx > 0 else -1] = -1.0
        shifted.append(images)
    many = dataclasses.replace(table, images=np.concatenate(shifted), labels=np.tile(table.labels, copies),
                               source=f"{copies} shifted copies of {table.source}")
    return write_folder(many, np.arange(len(many.images)), directory)


def phase_marks(lines: list[tuple[float, str]]) -> tuple[dict[int, int], dict[int, int], int | None]:
    """Indices into `lines` of the first `[ROUND k/N]` line of each round k, of the first
    `round k/N |` line (the round trained), and of `Strategy execution finished` (None if absent)."""
    starts, trained, finished = {}, {}, None
    for index, (_, line) in enumerate(lines):
        if m := ROUND_START.search(line):
            starts.setdefault(int(m.group(1)), index)
        elif m := ROUND_TRAINED.search(line):
            trained.setdefault(int(m.group(1)), index)
        elif finished is None and FINISHED.search(line):
            finished = index
    return starts, trained, finished


def phases(lines: list[tuple[float, str]], launched: float, rounds: int) -> dict[str, object]:
    """Startup, training seconds of each round and their median, evaluation and the strategy's
    own total, from the stamped lines; NaN where a marker is missing (a failed run)."""
    nan = math.nan
    starts, trained, finished = phase_marks(lines)
    stamp = lambda index: nan if index is None else lines[index][0]  # noqa: E731
    strategy = nan if finished is None else float(FINISHED.search(lines[finished][1]).group(1))
    per_round = [stamp(trained.get(k)) - stamp(starts.get(k)) for k in range(1, rounds + 1)]
    return {
        "startup s": round(stamp(starts.get(1)) - launched, 1),
        "s/round": round(statistics.median(per_round), 1),
        "rounds s": ";".join(f"{s:.1f}" for s in per_round),
        "eval s": round(stamp(finished) - stamp(trained.get(rounds)), 1),
        "strategy s": round(strategy, 1),
    }


def disk_bytes(root: Path) -> int:
    """Allocated bytes of the files under `root` (as `du` counts them)."""
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file()) if root.exists() else 0


def measure(clients: int, rounds: int, project: Path, work: Path, echo: bool, per_round: int = 0,
            evaluated: int = 0, data_dir: Path | None = None, client_images: int = 64) -> dict[str, object]:
    """One `flwr run` with `clients` SuperNodes on a SuperLink of its own (`per_round` of them
    drawn per round, `evaluated` evaluated; 0: all; `client_images` per client and round);
    one table row."""
    (work / "cwd").mkdir()
    env = run_env(work / "flwr-home", project)
    federation = f"num-supernodes={clients} client-resources-num-cpus=1 client-resources-num-gpus=0"
    memory, clock = TreeMemory(lambda table: local_superlinks(table, env)), LineClock(echo)
    memory.start()
    launched = time.monotonic()
    try:
        with stopping_local_superlink(env):
            with contextlib.redirect_stdout(clock):
                config = run_config(clients, rounds, work / "runs", per_round, evaluated, data_dir, client_images)
                outcome = flwr_run(project, config, federation, env=env, cwd=work / "cwd", echo=True)
            total = time.monotonic() - launched
    finally:
        memory.stop()
        deadline = time.monotonic() + 30  # the simulation and Ray wind down on their own
        while (left := alive(memory.seen)) and time.monotonic() < deadline:
            time.sleep(0.5)
        if left:
            names = {pid: p.name for pid, p in left.items()}
            print(f"warning: {clients} clients: still running 30 s after the SuperLink stopped, "
                  f"now ended: {names}", file=sys.stderr)
            end_processes(memory.seen)
    if not outcome.ok:
        print(f"{clients} clients: run {outcome.status}; end of its log:\n{outcome.log[-4000:]}",
              file=sys.stderr)
    # the clients' private state of this run: below their state root, under the run's key
    key = RunDirectory(outcome.run_dir).run_key_file.read_text().strip() if outcome.run_dir else None
    state_root = Path(env["COLLAFUSE_CLIENT_STATE"])
    models = sum(disk_bytes(d) for d in state_root.glob(f"partition-*/runs/{key}")) if key else 0
    return {
        "clients": clients, "per round": per_round or clients, "evaluated": evaluated or clients,
        "rounds": rounds, "status": outcome.status,
        **phases(clock.lines, launched, rounds), "total s": round(total, 1),
        "RSS sum MB": round(memory.rss_sum / 1024), "PSS sum MB": round(memory.pss_sum / 1024),
        "max RSS MB": round(memory.max_rss / 1024), "largest": memory.largest,
        "processes": memory.processes,
        "client models MB": round(models / MB, 2), "per client KB": round(models / clients / 1024, 1),
    }


def markdown(rows: list[dict[str, object]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[5, 20, 100])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients-per-round", type=int, default=0, help="clients drawn per round (0: all)")
    parser.add_argument("--eval-clients", type=int, default=0, help="clients evaluated (0: all)")
    parser.add_argument("--copies", type=int, default=0,
                        help="1 to 9: a folder of that many shifted copies of every digit instead of the 1,797 digits")
    parser.add_argument("--client-images", type=int, default=64,
                        help="client-images-per-round (a client of fewer images trains several smaller steps)")
    parser.add_argument("--project", type=Path, default=PROJECT, help="the Flower app to run")
    parser.add_argument("--csv", type=Path, help="also write the table here")
    parser.add_argument("--work-dir", type=Path, help="keep FLWR_HOMEs and run directories here")
    parser.add_argument("--echo", action="store_true", help="stream the runs' output to stderr")
    args = parser.parse_args()
    project = args.project.resolve()
    with contextlib.ExitStack() as stack:
        work = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="many-clients-")))
        work.mkdir(parents=True, exist_ok=True)
        data_dir = shifted_digits(args.copies, work / "shifted-digits") if args.copies else None
        rows = []
        for n in args.clients:
            run_work = Path(tempfile.mkdtemp(prefix=f"{n}-clients-", dir=work))
            rows.append(measure(n, args.rounds, project, run_work.resolve(), args.echo, min(args.clients_per_round, n),
                                min(args.eval_clients, n), data_dir, args.client_images))
            print(f"{n} clients: {rows[-1]['status']} in {rows[-1]['total s']} s", file=sys.stderr, flush=True)
    print(markdown(rows))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
