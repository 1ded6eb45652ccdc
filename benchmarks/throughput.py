"""Training and sampling speed of the default denoiser on this machine.

    python benchmarks/throughput.py [--repeats 5] [--threads 2]

Prints the median over repeats of: client training (t <= t_zeta), server training
(t > t_zeta, sub-chain loss) in images/s, and the time of the server's and the client's
halves of a 50-step DDIM sampler for 64 images. These figures size the budgets of the
default run (`client-images-per-round`, `server-images-per-round`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from collafuse_flwr.config import RunConfig
from collafuse_flwr.data import client_data
from collafuse_flwr.diffusion.losses import client_loss
from collafuse_flwr.diffusion.models import Denoiser, build_denoiser
from collafuse_flwr.diffusion.protocol import Protocol
from collafuse_flwr.diffusion.sampling import initial_noise
from collafuse_flwr.diffusion.training import train_for_images


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=1024, help="images per training measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = RunConfig()
    protocol = Protocol.of(config)
    schedule = protocol.schedule
    data = client_data(config, 0).train
    generator = torch.Generator().manual_seed(0)

    def make() -> Denoiser:
        net = build_denoiser(config.image_size, 1, config.block_channels)
        return Denoiser(net, config.client_lr, config.ema_decay)

    client, server = make(), make()
    x_cut = schedule.noise_to_cut(data, torch.randn(data.shape, generator=generator))
    sampler = protocol.sampler(config)
    runs = {"client train img/s": [], "server train img/s": [], "server half s": [], "client half s": []}
    for _ in range(args.repeats + 1):  # the first repeat warms up and is dropped
        c = timed(lambda: train_for_images(client, data, args.images, config.batch_size,
                                           lambda n, b, g: client_loss(n, schedule, b, g), generator))
        s = timed(lambda: train_for_images(server, x_cut, args.images, config.batch_size,
                                           protocol.server_loss, generator))
        x = initial_noise(config.eval_num_samples, (1, config.image_size, config.image_size), 0)
        hs = timed(lambda x=x: sampler.run(server.for_sampling(), x, sampler.server_steps, 0))
        hc = timed(lambda x=x: sampler.run(client.for_sampling(), x, sampler.client_steps, 0))
        for key, value in zip(runs, (args.images / c, args.images / s, hs, hc)):
            runs[key].append(value)
    print(f"threads={args.threads} model={config.unet_block_channels} image={config.image_size} "
          f"batch={config.batch_size} repeats={args.repeats}")
    for key, values in runs.items():
        print(f"{key:>20}: median {statistics.median(values[1:]):8.2f}  "
              f"(min {min(values[1:]):.2f}, max {max(values[1:]):.2f})")


if __name__ == "__main__":
    main()
