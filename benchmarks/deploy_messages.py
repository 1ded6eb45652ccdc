"""Paper-scale messages through a real deployment: bytes on the wire against the strategy's
counters, and time per round over loopback.

    .venv/bin/python benchmarks/deploy_messages.py [--rounds 3] [--images 2500] [--direct]
                                                   [--only collafuse|fedavg] [--work-dir DIR] [--echo]

Two runs, each through `collafuse_flwr.tools.deploy.Deployment` (a SuperLink and 2 SuperNodes
as separate processes, TLS from a local CA, SuperNode authentication, `client-data = "own"`):

- collafuse: each client holds `--images` RGB images of 64x64 (the paper's CelebA size) of
  which 20 % are held out, so with 2,500 it uploads 2,000 images noised to the cut point as
  float16: 2000 x 3 x 64 x 64 x 2 B = 49,152,000 B per client (the paper's client scale); a
  small U-Net (8,16) and minimal budgets, so that the messages, not training, take the time.
- fedavg: the same data with the paper's U-Net (`simulations/celeba.toml`: widths
  64,128,256,256, 2 layers per block, attention; 25.3 M parameters): every train message and
  reply carries the net and its EMA as float32 (about 2 x 101 MB), every evaluate message the
  EMA net.

The images are seeded noise written as an image folder (labels.csv, 10 classes, the CIFAR-10
layout at 64x64) below the work directory: the bytes of every message depend on the shapes and
dtypes, not on the pixels, and no dataset is needed. The server's data-dir is a folder of 500
more (the evaluation feature network's images, which no client holds).

Bytes on the wire: unless `--direct`, the SuperNodes dial a TCP relay in this process
(`Relay`), which forwards to the SuperLink and counts the bytes each way (TLS records as they
are: the certificate names 127.0.0.1, which the relay also listens on). Everything a SuperNode
exchanges with the SuperLink passes it: messages in 5 MiB chunks over HTTPS, heartbeats,
polls (every few seconds) and the ClientApps' own calls. The counters are read at each
streamed log line; a round's bytes are those between its `[ROUND k/N]` line and the strategy's
`round k/N |` line, the evaluation's from there to `Strategy execution finished` (stamps are
late by up to about a second: a few polls may fall into the neighbouring phase). They are
compared with metrics.csv: bytes-down-train, bytes-up-train, bytes-down-sample,
bytes-down-evaluation and bytes-up-evaluation, Flower's own serialized size of each message
content (`wire.content_bytes`), summed over the clients. "wire / counted" above 1 is the cost
of HTTP, protobuf framing, TLS, polling and heartbeats. Two things make it differ more: round
1's downstream carries the app bundle (FAB) that each SuperNode fetches once, which no counter
sees; and Flower stores a message's arrays as content-addressed objects, so an array equal to
another of the same message crosses once (FedAvg's net and its EMA are equal at the start, and
diffusers' EMA copies the net at its first step, so round 1's replies and round 2's average
show about 0.5; from then on they differ).

Time per round: from `[ROUND k/N]` to `round k/N |` (`many_clients.phases`), rounds 2.. are warm
(round 1 of FedAvg also sends the initial model); `--direct` repeats without the relay so
that its cost can be seen. Peak RSS per process name (the ServerApp decodes every reply of a
round at once) is sampled from /proc every 0.2 s (`many_clients.TreeMemory`).

Caveats: one run per configuration on whatever else the machine is doing; loopback has no
bandwidth limit worth the name, so the times are CPU (serialization, TLS, the ClientApp
process that a SuperNode starts for every message, polling), not network.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

from collafuse_flwr.data.cifar10 import CLASSES as CIFAR10_CLASSES
from collafuse_flwr.data.export import write_folder
from collafuse_flwr.data.table import ImageTable
from collafuse_flwr.tools.deploy import Deployment
from collafuse_flwr.tools.launch import alive, format_run_config, free_port
from many_clients import LineClock, TreeMemory, phase_marks, phases, run_env

PROJECT = Path(__file__).resolve().parents[1]
CLIENTS = 2
SIZE = 64
BASE = {
    "dataset": "cifar10", "image-size": SIZE, "client-data": "own", "num-clients": CLIENTS,
    "timesteps": 100, "t-zeta": 20, "batch-size": 8,
    "client-images-per-round": 8, "server-images-per-round": 8, "sampling-steps": 2,
    "eval-num-samples": 4, "metric-classifier-epochs": 1, "upload-dtype": "float16",
    "held-out-fraction": 0.2, "round-timeout-seconds": 3600,
}
RUNS = {
    "collafuse": {"strategy": "collafuse", "unet-block-channels": "8,16"},
    "fedavg": {"strategy": "fedavg", "unet-block-channels": "64,128,256,256", "unet-layers-per-block": 2,
               "unet-attention": True},
}
COUNTERS = ("bytes-down-train", "bytes-up-train", "bytes-down-sample", "bytes-down-evaluation", "bytes-up-evaluation")


class Relay(threading.Thread):
    """A TCP relay on 127.0.0.1 that forwards every connection to `target` (host, port) and
    counts the bytes each way: `up` (towards the target) and `down`."""

    def __init__(self, target: tuple[str, int]):
        super().__init__(daemon=True)
        self.target, self.port = target, free_port()
        self.up = self.down = 0
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def run(self) -> None:
        self.loop = asyncio.new_event_loop()
        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        server = await asyncio.start_server(self._connection, "127.0.0.1", self.port)
        self.ready.set()
        async with server:
            await server.serve_forever()

    async def _connection(self, reader, writer) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, target_writer, "up"), self._pipe(target_reader, writer, "down"))

    async def _pipe(self, reader, writer, direction: str) -> None:
        try:
            while chunk := await reader.read(1 << 16):
                setattr(self, direction, getattr(self, direction) + len(chunk))
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def stop(self) -> None:
        if self.loop is not None:
            for task in asyncio.all_tasks(self.loop):
                self.loop.call_soon_threadsafe(task.cancel)


class CountingClock(LineClock):
    """LineClock that also keeps the relay's counters (up, down) at each stamped line."""

    def __init__(self, relay: Relay | None, echo: bool):
        super().__init__(echo)
        self.relay, self.counters = relay, []

    def write(self, text: str) -> int:
        before = len(self.lines)
        written = super().write(text)
        snapshot = (self.relay.up, self.relay.down) if self.relay else (0, 0)
        self.counters += [snapshot] * (len(self.lines) - before)
        return written


def write_data(root: Path, images: int, seed: int = 0) -> tuple[list[Path], Path]:
    """Client folders of `images` seeded-noise RGB images each and a reference folder of 500."""
    rng = np.random.default_rng(seed)

    def folder(n: int, path: Path) -> Path:
        table = ImageTable(rng.integers(0, 256, (n, 3, SIZE, SIZE), dtype=np.uint8),
                           rng.integers(0, 10, n), CIFAR10_CLASSES, None, (), "seeded noise")
        return write_folder(table, np.arange(n), path)

    return [folder(images, root / f"client-{k}") for k in range(CLIENTS)], folder(500, root / "reference")


def wire_bytes(clock: CountingClock, rounds: int) -> dict[str, tuple[int, int]]:
    """(up, down) bytes through the relay in each training round and in the evaluation."""
    starts, trained, finished = phase_marks(clock.lines)
    spans = {f"round {k}": (starts.get(k), trained.get(k)) for k in range(1, rounds + 1)}
    spans["evaluation"] = (trained.get(rounds), finished)
    out = {}
    for name, (a, b) in spans.items():
        if a is not None and b is not None:
            out[name] = tuple(clock.counters[b][i] - clock.counters[a][i] for i in (0, 1))
    return out


def measure(name: str, rounds: int, clients: list[Path], reference: Path, work: Path, relay_on: bool,
            echo: bool) -> dict:
    env = run_env(work / "home", PROJECT)
    nodes = [{"data-dir": str(d), "state-dir": str(work / "nodes" / str(k) / "state")} for k, d in enumerate(clients)]
    deployment = Deployment(work / "deploy", nodes, env=env)
    relay = Relay(("127.0.0.1", deployment.port)) if relay_on else None
    if relay:
        relay.start()
        relay.ready.wait(10)
        deployment.node_superlink = relay.address
    config = dict(BASE, **RUNS[name], **{"num-server-rounds": rounds, "eval-every": rounds,
                                         "data-dir": str(reference), "output-dir": str(work / "runs")})
    clock = CountingClock(relay, echo)
    memory = None
    try:
        with deployment:
            memory = TreeMemory(lambda table: list(alive(deployment._roots)))
            memory.start()
            launched = time.monotonic()
            with contextlib.redirect_stdout(clock):
                outcome = deployment.run(PROJECT, format_run_config(config), echo=True)
            total = time.monotonic() - launched
    finally:
        if memory:
            memory.stop()
        if relay:
            relay.stop()
    if not outcome.ok:
        print(f"{name}: run {outcome.status}; end of its log:\n{outcome.log[-4000:]}", file=sys.stderr)
        return {"run": name, "status": outcome.status}
    metrics = pd.read_csv(outcome.run_dir / "metrics.csv", dtype={"client": str})
    counted = metrics[metrics["metric"].isin(COUNTERS)].groupby(["round", "metric"])["value"].sum()
    row = {"run": name, "relay": relay_on, "status": outcome.status, **phases(clock.lines, launched, rounds),
           "total s": round(total, 1),
           "peak RSS MB": {k: round(v / 1024) for k, v in
                           sorted(memory.peak_by_name.items(), key=lambda kv: -kv[1])[:4]},
           "counted": {f"{r}:{m}": int(v) for (r, m), v in counted.items()}}
    upload = metrics[metrics["metric"] == "bytes-up-train"]
    row["largest reply B"] = int(upload["value"].max())
    if relay_on:
        wire = wire_bytes(clock, rounds)
        row["wire"] = {k: {"up": up, "down": down} for k, (up, down) in wire.items()}
        for k in range(1, rounds + 1):
            if f"round {k}" in wire:
                up_counted = counted.get((k, "bytes-up-train"), 0)
                down_counted = counted.get((k, "bytes-down-train"), 0)
                row[f"round {k} up wire/counted"] = round(wire[f"round {k}"][0] / up_counted, 4) if up_counted else None
                row[f"round {k} down wire/counted"] = (round(wire[f"round {k}"][1] / down_counted, 4)
                                                       if down_counted else None)
        total_counted = counted.sum()
        row["all wire/counted"] = round((relay.up + relay.down) / total_counted, 4) if total_counted else None
        row["wire total B"] = relay.up + relay.down
        row["counted total B"] = int(total_counted)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=2500, help="images per client (80 %% are uploaded)")
    parser.add_argument("--only", choices=tuple(RUNS), action="append")
    parser.add_argument("--direct", action="store_true", help="also run without the relay")
    parser.add_argument("--work-dir", type=Path)
    parser.add_argument("--echo", action="store_true", help="print the streamed flwr log")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="deploy-messages-"))
    clients, reference = write_data(work / "data", args.images)
    rows = []
    for name in args.only or RUNS:
        for relay_on in (True, False) if args.direct else (True,):
            run_work = work / f"{name}-{'relay' if relay_on else 'direct'}"
            rows.append(measure(name, args.rounds, clients, reference, run_work, relay_on, args.echo))
            print(json.dumps(rows[-1], indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
