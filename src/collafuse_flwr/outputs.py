"""The self-describing run directory: config, metrics.csv, sample grids, checkpoints, log.

    <output-dir>/00003-digits-collafuse-tz200/
        config.json              the resolved run config
        partition.csv, .png      who holds what (data/report.py)
        metrics.csv              long format: round, client, metric, value (appended every round)
        log.txt                  one line per round
        samples/round-004-client-2.png     a client's generated images
        samples/round-004-handover.png     the server's handed-over states, one row per client
        checkpoints/round-004/   the server's state after round 4 (checkpoint.py)
        clients/client-2/round-004/  a client's private denoiser after round 4 (stays on the client)
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import torch
from torchvision.utils import save_image

from collafuse_flwr.config import ConfigError

METRICS_HEADER = ("round", "client", "metric", "value")


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


def create_run_dir(output_dir: str, name: str) -> Path:
    """Make `<output_dir>/<NNNNN>-<name>/` with the next free index; return its absolute path."""
    root = check_output_dir(output_dir)
    taken = [int(m.group(1)) for p in root.iterdir() if (m := re.match(r"(\d{5})-", p.name))]
    for index in range(max(taken, default=-1) + 1, max(taken, default=-1) + 1000):
        run_dir = root / f"{index:05d}-{name}"
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run directory under {root}")


def write_config(run_dir: Path, config: dict) -> None:
    """Write the resolved config as `config.json`."""
    (run_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def append_metrics(run_dir: Path, rows: list[tuple[int, str, str, float]]) -> None:
    """Append (round, client, metric, value) rows to `metrics.csv` (header on first write)."""
    path = run_dir / "metrics.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(METRICS_HEADER)
        writer.writerows(rows)


def append_log(run_dir: Path, line: str) -> None:
    """Append one line to `log.txt`."""
    with open(run_dir / "log.txt", "a") as f:
        f.write(line + "\n")


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    """Save images (n, C, H, W) in [-1, 1] as a PNG grid (values outside are clamped for
    display only), scaled up so that small images stay visible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shown = (images.float().clamp(-1, 1) + 1) / 2
    if shown.shape[-1] < 64:
        factor = 64 // shown.shape[-1]
        shown = torch.nn.functional.interpolate(shown, scale_factor=factor, mode="nearest")
    save_image(shown, path, nrow=nrow, padding=2, pad_value=0.5)
