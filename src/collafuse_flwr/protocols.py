"""What differs between the exact CollaFuse protocol and the authors' published variant.

strategy "collafuse" (PROTOCOL.md): the server trains on the sub-chain from the received x_r
(`losses.server_loss`); sampling hands over at t_zeta; the handed-over state is never clipped.

strategy "published" (the authors' code, for comparison only): the server noises x_r again with
the full marginal (`losses.published_server_loss`); to patch the resulting mismatch the client
starts sampling at t_h = T rho (2 - rho), rho = t_zeta / T (e.g. 360 for t_zeta = 200, T = 1000),
and the handed-over state is clamped to [-1, 1]. Clients train on t <= t_zeta in both.
"""

from __future__ import annotations

from typing import Callable

from collafuse_flwr.config import RunConfig
from collafuse_flwr.losses import published_server_loss, server_loss
from collafuse_flwr.schedule import CutSchedule


def handover_time(config: RunConfig) -> int:
    """The protocol time at which the server hands the sampling state to the client."""
    if config.strategy == "published":
        rho = config.t_zeta / config.timesteps
        return round(config.timesteps * rho * (2 - rho))
    return config.t_zeta


def clamps_handover(config: RunConfig) -> bool:
    """Whether the handed-over state is clamped to [-1, 1] (the published variant only)."""
    return config.strategy == "published"


def server_objective(config: RunConfig, schedule: CutSchedule) -> Callable:
    """The server's loss as `loss(net, x_r, generator)`."""
    if config.strategy == "published":
        return lambda net, x_r, g: published_server_loss(net, schedule, x_r, g)
    weighting = config.server_loss_weighting
    return lambda net, x_r, g: server_loss(net, schedule, x_r, g, weighting)
