"""Counted compute of the paper-scale overlays, and the GPU hours it implies.

    python benchmarks/paper_scale_cost.py [--tflops 50 100] [overlay ...]

For each overlay (default: simulations/{cifar10,celeba,awa2}.toml) builds its U-Net, counts the
FLOPs of one training image (forward + backward) and of one denoiser evaluation with torch's
FlopCounterMode (the counter the runs' cost rows use), and multiplies by the overlay's budgets:
clients (client-images-per-round x rounds x clients), server (server-images-per-round x rounds),
sampling (eval-num-samples x sampling-steps per client and evaluation round). The GPU hours
assume a sustained rate in TFLOP/s (an A100 sustains roughly 50 in TF32 and 100 in bf16 on
U-Nets of this size; measure yours); data loading, metrics and Flower's overhead are not in
them. A run at t_zeta = 200 is charged in full for both parties: the budgets do not depend on
t_zeta (at t_zeta = 0 the clients train nothing, at t_zeta = T the server trains nothing).
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

from collafuse_flwr.config import RunConfig
from collafuse_flwr.diffusion.models import build_denoiser
from collafuse_flwr.metrics.cost import forward_flops, training_flops

PROJECT = Path(__file__).resolve().parents[1]
CHANNELS = {"digits": 1, "cifar10": 3, "celeba": 3, "awa2": 3}


def overlay_cost(path: Path) -> dict[str, float]:
    """FLOPs of one run of the overlay: per party and for sampling."""
    config = RunConfig.from_flower(tomllib.loads(path.read_text())).for_launchers()
    shape = (CHANNELS[config.dataset], config.image_size, config.image_size)
    net = build_denoiser(config.image_size, shape[0], config.block_channels, config.unet_layers_per_block,
                         config.unet_attention)
    train, forward = training_flops(net, shape), forward_flops(net, shape)
    rounds, clients = config.num_server_rounds, config.num_clients
    evaluations = sum(config.is_eval_round(r) for r in range(1, rounds + 1))
    return {
        "params (M)": sum(p.numel() for p in net.parameters()) / 1e6,
        "clients": train * config.client_images_per_round * rounds * clients,
        "server": train * config.server_images_per_round * rounds,
        "sampling": forward * config.eval_num_samples * config.sampling_steps * clients * evaluations,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overlays", nargs="*", type=Path,
                        default=[PROJECT / "simulations" / f"{d}.toml" for d in ("cifar10", "celeba", "awa2")])
    parser.add_argument("--tflops", nargs="+", type=float, default=[50.0, 100.0])
    args = parser.parse_args()
    print("| overlay | U-Net params (M) | client PFLOPs (all clients) | server PFLOPs | sampling PFLOPs | "
          + " | ".join(f"GPU hours at {t:g} TFLOP/s" for t in args.tflops) + " |")
    print("|---|---|---|---|---|" + "---|" * len(args.tflops))
    for path in args.overlays:
        cost = overlay_cost(path)
        total = cost["clients"] + cost["server"] + cost["sampling"]
        hours = [total / (t * 1e12) / 3600 for t in args.tflops]
        print(f"| {path.name} | {cost['params (M)']:.1f} | {cost['clients'] / 1e15:.0f} | "
              f"{cost['server'] / 1e15:.0f} | {cost['sampling'] / 1e15:.1f} | "
              + " | ".join(f"{h:.1f}" for h in hours) + " |")


if __name__ == "__main__":
    main()
