"""The ServerApp: Flower glue only. It reads the run config, sets the run up
(strategies/setup.py: checks, run directory, feature network, strategy; the run directory is
recorded under Flower's run id for the launcher), waits for the SuperNodes and starts the
strategy."""

from __future__ import annotations

import time

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from collafuse_flwr.config import RunConfig
from collafuse_flwr.strategies.setup import prepare_run

app = ServerApp()


def wait_for_clients(grid: Grid, count: int, seconds: float) -> list[int]:
    """Block until `count` SuperNodes registered; fail with a clear message after `seconds`."""
    deadline = time.monotonic() + seconds
    while len(nodes := list(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"num-clients={count} but only {len(nodes)} SuperNode(s) registered within "
                f"{seconds:.0f}s; run with --federation-config 'num-supernodes={count}'"
            )
        time.sleep(0.5)
    return nodes


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = RunConfig.from_flower(context.run_config)
    run = prepare_run(config, context.run_id)
    wait_for_clients(grid, config.num_clients, config.wait_for_clients_seconds)
    run.start(grid)
