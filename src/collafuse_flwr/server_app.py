"""The ServerApp: Flower glue only. It sets the run up (strategies/setup.py: the federation's
size, checks, run directory, feature network, strategy; the run directory is recorded under
Flower's run id for the launcher), waits for the SuperNodes and starts the strategy."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from collafuse_flwr.strategies.setup import federated_run, wait_for_clients

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = federated_run(grid, context.run_config, context.run_id)
    wait_for_clients(grid, run.config.num_clients, run.config.wait_for_clients_seconds)
    run.start(grid)
