"""collafuse-privacy: the uploads' epsilon against the cut point, per dataset image size.

    collafuse-privacy --out results/privacy [--datasets digits cifar10 celeba] [--clip-norms 0 10]
                      [--views 1 4] [--targets 1 10 100] [--delta 1e-5] [--timesteps 1000]
                      [--beta-schedule linear]

For every dataset's default image size (C, H, W), clip norm (0: the pixels' own bound
sqrt(C H W)) and number of views per image (1: noise policy "once"; K: "fresh" over K rounds),
the epsilon at `--delta` of the uploads at every cut point (`RunConfig.upload_epsilon`, the
code a run reports with), and the smallest cut point that meets each target
(`RunConfig.smallest_private_cut_point`, what `t-zeta-from-target` picks). Writes
`epsilon.csv` (dataset, image_shape, clip_norm, views, t_zeta, epsilon), `cut_points.csv`,
`cut_points.md` and `epsilon.png`. Computation only: no run, no data.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from collafuse_flwr.config import DATASETS, ConfigError, RunConfig  # noqa: E402
from collafuse_flwr.tools.sweep_tables import to_markdown  # noqa: E402


def configurations(args: argparse.Namespace) -> list[RunConfig]:
    """One validated run config per dataset, clip norm and view count (views K > 1: "fresh"
    over K rounds)."""
    configs = []
    for dataset, clip_norm, views in itertools.product(args.datasets, args.clip_norms, args.views):
        config = RunConfig.from_flower({
            "dataset": dataset, "clip-norm": clip_norm, "privacy-delta": args.delta, "timesteps": args.timesteps,
            "beta-schedule": args.beta_schedule, "t-zeta": 0, "sampling-steps": 1,
            "noise-policy": "once" if views == 1 else "fresh", "num-server-rounds": views,
        })
        configs.append(config)
    return configs


def tables(configs: list[RunConfig], targets: list[float]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(epsilon at every cut point, the smallest cut point per target) for `configs`."""
    curves, cuts = [], []
    for config in configs:
        key = {"dataset": config.dataset, "image_shape": "x".join(map(str, config.image_shape)),
               "clip_norm": config.clip_norm, "views": config.max_views}
        curves += [{**key, "t_zeta": t, "epsilon": config.upload_epsilon(t, config.max_views)}
                   for t in range(config.timesteps + 1)]
        for target in targets:
            picked = dataclasses.replace(config, target_epsilon=target).smallest_private_cut_point()
            cuts.append({**key, "target_epsilon": target, "delta": config.privacy_delta,
                         "smallest_t_zeta": picked if picked < config.timesteps else None})
    return pd.DataFrame(curves), pd.DataFrame(cuts)


def plot(curves: pd.DataFrame, path: Path) -> None:
    """epsilon (log scale) against t_zeta, one panel per dataset, one line per clip norm and views."""
    datasets = list(dict.fromkeys(curves.dataset))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.6), squeeze=False, sharey=True)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        rows = curves[(curves.dataset == dataset) & (curves.epsilon > 0)]
        for (clip_norm, views), line in rows.groupby(["clip_norm", "views"]):
            clipping = f"C = {clip_norm:g}" if clip_norm else "no clipping"
            label = f"{clipping}, {views} view{'s' * (views > 1)}"
            ax.plot(line.t_zeta, line.epsilon, label=label)
        ax.set(yscale="log", xlabel="t_zeta", title=f"{dataset} {rows.image_shape.iloc[0]}", ylim=(0.1, 1e5))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("epsilon")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="collafuse-privacy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--datasets", nargs="+", default=["digits", "cifar10", "celeba"], choices=DATASETS)
    parser.add_argument("--clip-norms", nargs="+", type=float, default=[0.0, 10.0])
    parser.add_argument("--views", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--targets", nargs="+", type=float, default=[1.0, 10.0, 100.0])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--timesteps", type=int, default=1000)
    parser.add_argument("--beta-schedule", default="linear")
    args = parser.parse_args(argv)
    try:
        configs = configurations(args)  # every value checked before anything is written
    except ConfigError as err:
        parser.error(str(err))
    curves, cuts = tables(configs, args.targets)
    args.out.mkdir(parents=True, exist_ok=True)
    curves.to_csv(args.out / "epsilon.csv", index=False)
    cuts.to_csv(args.out / "cut_points.csv", index=False)
    wide = cuts.assign(cut=cuts.smallest_t_zeta.map(lambda t: "none < T" if pd.isna(t) else str(int(t)))).pivot(
        index=["dataset", "image_shape", "clip_norm", "views"], columns="target_epsilon", values="cut")
    wide = wide.rename(columns=lambda t: f"t_zeta for epsilon {t:g}").reset_index()
    (args.out / "cut_points.md").write_text(to_markdown(wide))
    plot(curves, args.out / "epsilon.png")
    print(wide.to_string(index=False))


if __name__ == "__main__":
    main()
