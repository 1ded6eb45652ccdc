"""A real deployment on this machine: a SuperLink and SuperNodes as separate processes with TLS
and SuperNode authentication, each client holding only its own folder, a server that holds no
client image, and every process stopped by PID afterwards."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import time
import zipfile

import pandas as pd
import pytest

from collafuse_flwr.config import RunConfig
from collafuse_flwr.data.export import export_partitions
from collafuse_flwr.tools.deploy import CONNECTION, Deployment
from collafuse_flwr.tools.launch import (
    alive,
    descendants,
    end_processes,
    format_run_config,
    free_port,
    isolated_env,
    own_clients_settings,
    process_table,
    venv_command,
)
from conftest import TINY
from test_flwr_run import PROJECT

pytestmark = pytest.mark.xdist_group("deployment")  # one worker runs the module: one deployment

NUM_CLIENTS = 3
VICTIM = 2  # the SuperNode killed in round 2 and started again


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """Three SuperNodes holding one exported digits partition each; the server's data-dir is
    the reference folder and its process has a HOME and data cache of its own, empty. One run
    of 4 rounds (min-replies 2), during which SuperNode `VICTIM` is killed in round 2, waited
    for until the SuperLink declares it offline, and started again with the same key, data and
    state directory. The tests below read that run; the deployment is up while they do."""
    import threading

    root = tmp_path_factory.mktemp("deploy")
    config = dict(TINY, **{"num-clients": NUM_CLIENTS, "classes-per-client": 4})
    clients, reference = export_partitions(RunConfig.from_flower(config), root / "data")
    env = isolated_env(root / "home")
    server_env = {"HOME": str(root / "server-home"), "COLLAFUSE_DATA_CACHE": str(root / "server-cache"),
                  "COLLAFUSE_CLIENT_STATE": str(root / "nowhere")}
    run_config = dict(config, **{"client-data": "own", "data-dir": str(reference), "num-server-rounds": 4,
                                 "min-replies": 2, "output-dir": str(root / "runs"), "disclosure-num-images": 0})
    # one user runs every party here, as collafuse-deploy does: its clients trust the run's evaluator
    nodes = [{"data-dir": str(d), "state-dir": str(root / "nodes" / str(k) / "state"),
              **own_clients_settings(run_config, env)} for k, d in enumerate(clients)]
    with Deployment(root / "work", nodes, env=env, server_env=server_env) as running:
        outcome = {}
        submit = lambda: outcome.update(result=running.run(PROJECT, format_run_config(run_config)))  # noqa: E731
        runner = threading.Thread(target=submit)
        runner.start()
        victim_log = running.work_dir / "logs" / f"supernode-{VICTIM}.log"
        while runner.is_alive() and victim_log.read_text().count("Receiving: train message") < 2:
            time.sleep(0.5)
        running.kill_node(VICTIM)
        running.wait_status([VICTIM], "offline", timeout=180)
        # Started again only once the server has been answered for it: the SuperLink answers a
        # pending message in a node's place only while the node is offline, and the server polls
        # every 3 s, so a node back before that poll leaves its message unanswered until
        # round-timeout-seconds.
        deadline = time.monotonic() + 180
        while runner.is_alive() and time.monotonic() < deadline and not _logged(root / "runs", "round 2/4 |"):
            time.sleep(0.5)
        running.start_node(VICTIM)
        runner.join(timeout=900)
        assert not runner.is_alive(), f"the run did not end within 900 s; see {running.work_dir / 'logs'}"
        result = outcome["result"]
        assert result.ok, result.log[-3000:]
        yield running, result, root
    assert not alive(running._roots), "a process of the deployment outlived it"


def _logged(output_dir, line: str) -> bool:
    """Whether the log.txt of a run below `output_dir` has `line`."""
    return any(line in log.read_text() for log in output_dir.glob("*/log.txt"))


def _metrics(result) -> pd.DataFrame:
    return pd.read_csv(result.run_dir / "metrics.csv", dtype={"client": str})


def test_a_deployment_with_tls_and_authentication_runs_on_the_clients_own_data(deployment):
    running, result, root = deployment
    metrics = _metrics(result)
    quality = metrics[(metrics["metric"] == "fd_classifier") & (metrics["round"] == 4)]
    assert sorted(quality["client"]) == ["0", "1", "2", "pooled"]
    assert set(metrics[metrics["metric"] == "views-per-image"]["client"]) == {"0", "1", "2"}
    assert not metrics["metric"].str.startswith(("linkage-", "reconstruction-")).any()
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert "simulation only" in summary["notes"]["disclosure"]
    assert not (result.run_dir / "partition.csv").exists()
    # the feature network arrived with the messages: counted apart from the protocol's bytes
    assert (metrics["metric"] == "bytes-down-evaluation").sum() == NUM_CLIENTS
    for k in range(NUM_CLIENTS):  # each client's secret and denoisers below its own state root
        secret = root / "nodes" / str(k) / "state" / "own" / "secret"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert not (root / "nowhere").exists() and not list(result.run_dir.rglob("secret"))
    superlink_log = (running.work_dir / "logs" / "superlink.log").read_text()
    assert "running on https://" in superlink_log  # TLS on the one port of the Fleet and Control APIs
    assert superlink_log.count("[Fleet.ActivateNode] Activated node_id=") >= NUM_CLIENTS  # by registered keys


def test_a_killed_supernode_is_missing_and_rejoins_with_its_state(deployment):
    """The SuperNode killed in round 2 is recorded as missing once the SuperLink declares it
    offline (its pending message is answered for it) and the round goes on above min-replies;
    restarted with the same key, data and state directory, it takes part again, and its uploads
    (noise policy once) are byte-identical to those before: still one view per image."""
    running, result, _ = deployment
    metrics = _metrics(result)
    log = (result.run_dir / "log.txt").read_text()
    victim = re.search(rf"client (\d+) \(node {running.nodes[VICTIM].node_id}\) missing: the SuperLink answered", log)
    assert victim and "node-1" not in log, log
    faults = metrics[metrics["metric"].str.contains("fault")]
    assert faults[["round", "client", "metric"]].values.tolist() == [[2, victim[1], "train-fault-missing"]]
    assert "round 2/4 | 2/3 clients accepted" in log
    accepted = metrics[(metrics["metric"] == "num-examples") & (metrics["round"] == 4)]
    assert sorted(accepted["client"]) == ["0", "1", "2"]  # back in the last round
    views = metrics[(metrics["metric"] == "views-per-image") & (metrics["round"] == 4)].set_index("client")["value"]
    assert views.to_dict() == {"0": 1.0, "1": 1.0, "2": 1.0}


def test_a_supernode_with_an_unregistered_key_cannot_join(deployment):
    running, _, root = deployment
    from collafuse_flwr.tools.pki import write_node_key

    key = write_node_key(root / "stranger")
    command = [venv_command("flower-supernode"), "--superlink", running.address,
               "--root-certificates", str(running.credentials.ca_certificate),
               "--auth-supernode-private-key", str(key.private_key), "--max-retries", "0",
               "--port", str(free_port())]
    with open(root / "stranger.log", "wb") as log:
        stranger = subprocess.Popen(command, env=running.cli_env(), cwd=root, stdout=log, stderr=subprocess.STDOUT)
    started = set()  # everything it starts, seen while it runs: stopped by PID afterwards
    deadline = time.monotonic() + 120
    while stranger.poll() is None and time.monotonic() < deadline:
        table = process_table()
        started |= {table[pid].identity for pid in descendants(table, [stranger.pid])}
        time.sleep(0.2)
    end_processes(started)
    assert stranger.wait(timeout=30) != 0
    assert "305" in (root / "stranger.log").read_text()  # Flower's exit code: the SuperLink refused the node
    listed = json.loads(running.flwr("supernode", "ls", CONNECTION, "--format", "json").stdout)["nodes"]
    assert len(listed) == NUM_CLIENTS and all(n["status"] == "online" for n in listed)


def test_the_app_bundle_every_supernode_fetches_holds_the_code_only(tmp_path):
    """`flwr build` (what `flwr run` sends to a deployment): the package's modules, the README
    and the generated pyproject.toml, none of the committed results, tests or benchmarks."""
    subprocess.run([venv_command("flwr"), "build", "--app", str(PROJECT)], cwd=tmp_path, check=True,
                   capture_output=True, env=isolated_env(tmp_path / "home"))
    (fab,) = tmp_path.glob("*.fab")
    with zipfile.ZipFile(fab) as bundle:
        names = bundle.namelist()
    assert {name.split("/")[0] for name in names} == {".info", "README.md", "pyproject.toml", "src"}
    assert {"src/collafuse_flwr/server_app.py", "src/collafuse_flwr/client_app.py"} <= set(names)
    assert all(name.endswith(".py") for name in names if name.startswith("src/"))
