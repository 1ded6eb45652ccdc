"""What drives runs, apart from the protocol core: the launcher (collafuse-run), sweeps and
their tables and plots (collafuse-sweep), and the plots of one run (collafuse-plot)."""
