"""Training and sampling speed of a run's denoisers on this machine, outside any run.

    .venv/bin/python benchmarks/throughput.py [--repeats 5] [--threads 2] [--images 1024]
                                              [--run-config ITEM ...]

`--run-config` takes TOML overlays and "key=value ..." strings as `collafuse-run` does (default:
the project's default run). The denoisers are built as the run builds them (architecture,
conditioning of each side) and trained with the run's losses, batch size, condition dropout
and conditions (client 0's images and conditions; the server's on their uploads x_{t_zeta}).
Prints the median over repeats (after one warm-up repeat) of client training (t <= t_zeta) and
server training (t > t_zeta) in images/s, and the seconds of the server's and of the client's
half of the run's sampler for `eval-num-samples` images. These figures size the budgets of a
run (`client-images-per-round`, `server-images-per-round`) and are the isolated reference of
the throughput inside a run (benchmarks/flower_overhead.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from flwr.common.config import parse_config_args

from collafuse_flwr.config import RunConfig
from collafuse_flwr.data import client_data
from collafuse_flwr.diffusion.conditions import run_conditioning
from collafuse_flwr.diffusion.losses import client_loss
from collafuse_flwr.diffusion.models import Denoiser, build_denoiser
from collafuse_flwr.diffusion.protocol import Protocol
from collafuse_flwr.diffusion.sampling import initial_noise
from collafuse_flwr.diffusion.training import train_for_images
from collafuse_flwr.tools.inprocess import torch_threads
from collafuse_flwr.tools.launch import merge_run_configs

KEYS = ("client train img/s", "server train img/s", "server half s", "client half s")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_config(items: list[str]) -> RunConfig:
    """The run config of `items` (overlays and key=value strings) over the defaults."""
    return RunConfig.from_flower(parse_config_args([merge_run_configs(items)]) if items else {})


def measure(config: RunConfig, threads: int, images: int, repeats: int) -> dict[str, float]:
    """Median over `repeats` (after a warm-up) of each of `KEYS` on `threads` torch threads."""
    with torch_threads(threads):
        return _measure(config, images, repeats)


def _measure(config: RunConfig, images: int, repeats: int) -> dict[str, float]:
    protocol, conditioning = Protocol.of(config), run_conditioning(config)
    schedule, dropout = protocol.schedule, conditioning.dropout
    data = client_data(config, 0)
    shape = tuple(data.train.shape[1:])
    generator = torch.Generator().manual_seed(0)

    def make(space) -> Denoiser:
        net = build_denoiser(config.image_size, shape[0], config.block_channels, config.unet_layers_per_block,
                             config.unet_attention, condition_dim=space.size if space else 0)
        return Denoiser(net, config.client_lr, config.ema_decay)

    client, server = make(conditioning.client), make(conditioning.server)
    client_c = None if conditioning.client is None else conditioning.client.encode(data.train_conditions)
    server_c = conditioning.server_conditions(0, data.train_conditions, len(data.train))
    x_cut = schedule.noise_to_cut(data.train, torch.randn(data.train.shape, generator=generator))
    requested = data.held_out_conditions
    sampler = protocol.sampler(config)
    n = config.eval_num_samples
    sample_c = None if requested is None else requested[torch.arange(n) % len(requested)]
    x_T = initial_noise(n, shape, 0)
    server_side = conditioning.server_conditions(0, sample_c, n)
    client_side = None if conditioning.client is None else conditioning.client.encode(sample_c)
    runs = {key: [] for key in KEYS}
    for _ in range(repeats + 1):  # the first repeat warms up and is dropped
        c = timed(lambda: train_for_images(client, data.train, images, config.batch_size,
                                           lambda net, x0, g, cond: client_loss(net, schedule, x0, g, cond, dropout),
                                           generator, client_c))
        s = timed(lambda: train_for_images(server, x_cut, images, config.batch_size,
                                           lambda net, x_r, g, cond: protocol.server_loss(net, x_r, g, cond, dropout),
                                           generator, server_c))
        hs = timed(lambda: sampler.run(server.for_sampling(), x_T, sampler.server_steps, 0, server_side))
        hc = timed(lambda: sampler.run(client.for_sampling(), x_T, sampler.client_steps, 0, client_side))
        for key, value in zip(KEYS, (images / c, images / s, hs, hc), strict=True):
            runs[key].append(value)
    return {key: statistics.median(values[1:]) for key, values in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=1024, help="images per training measurement")
    parser.add_argument("--run-config", action="append", default=[], help="TOML files and key=value strings")
    args = parser.parse_args()
    config = run_config(args.run_config)
    figures = measure(config, args.threads, args.images, args.repeats)
    print(f"threads={args.threads} dataset={config.dataset} model={config.unet_block_channels} "
          f"image={config.image_size} batch={config.batch_size} condition={config.condition}/"
          f"{config.server_condition} repeats={args.repeats}")
    for key, value in figures.items():
        print(f"{key:>20}: median {value:8.2f}")


if __name__ == "__main__":
    main()
