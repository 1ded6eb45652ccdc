"""A Ray cluster of two nodes on this machine (a head and a node attached to it, each with its
own resources and address), a real `flwr run` simulation attached to it by its explicit
address, Ray's own task records showing ClientApps ran on both nodes, and every Ray process
stopped by PID afterwards."""

from __future__ import annotations

import pandas as pd

from collafuse_flwr.tools.cluster import RayCluster, client_app_nodes, main
from collafuse_flwr.tools.launch import (
    alive,
    flwr_run,
    format_run_config,
    isolated_env,
    local_superlinks,
    process_table,
    stopping_local_superlink,
)
from conftest import TINY
from test_flwr_run import PROJECT


def test_a_simulation_on_a_two_node_ray_cluster_runs_client_apps_on_both_nodes(tmp_path, capsys):
    env = isolated_env(tmp_path / "home")
    config = dict(TINY, **{"num-clients": 4, "num-server-rounds": 2, "classes-per-client": 3,
                           "output-dir": str(tmp_path / "runs")})
    federation = "num-supernodes=4 client-resources-num-cpus=1 client-resources-num-gpus=0"
    with RayCluster(tmp_path / "cluster", nodes=2, cpus_per_node=1, env=env) as cluster:
        nodes = {n["NodeManagerAddress"]: n for n in cluster.node_records()}
        assert sorted(nodes) == ["127.0.0.2", "127.0.0.3"]
        assert nodes["127.0.0.2"]["Resources"]["node-0"] == 1 and nodes["127.0.0.3"]["Resources"]["node-1"] == 1
        flwr_env = cluster.env_for_flwr(env)
        with stopping_local_superlink(flwr_env):
            outcome = flwr_run(PROJECT, format_run_config(config), federation, env=flwr_env, cwd=tmp_path)
        assert outcome.ok, outcome.log[-3000:]
        assert not local_superlinks(process_table(), flwr_env)
        ran_on = client_app_nodes(cluster.query("timeline"))
        assert set(ran_on) == {"127.0.0.2", "127.0.0.3"}, ran_on
        assert all(count >= 1 for count in ran_on.values())
        assert main([cluster.address]) == 0  # the README's command for the same records
        printed = capsys.readouterr().out
        assert all(f"{node}\tnode " in printed and f"\t{count} ClientApp runs" in printed
                   for node, count in ran_on.items()), printed
        roots = list(cluster._roots)
    assert not alive(roots), "a Ray node outlived the cluster"
    assert not [p for p in process_table().values() if any(str(cluster.temp_root).encode() in a for a in p.args)]
    metrics = pd.read_csv(outcome.run_dir / "metrics.csv", dtype={"client": str})
    assert set(metrics[metrics["metric"] == "fd_classifier"]["client"]) == {"0", "1", "2", "3", "pooled"}
