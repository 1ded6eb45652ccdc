"""Whole runs of the tiny config of test_flwr_run in process (`run_in_process`: the ServerApp's
setup and strategy, the ClientApp's handlers with their mods, no Flower runtime): what a run
does at the ends of the chain, with faulty clients and with weights files. What Flower's runtime
adds (messages on the wire, the run's status, kill and resume, deployments) is test_flwr_run's
and test_deploy's."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from collafuse_flwr.summary import read_metrics
from collafuse_flwr.tools.inprocess import run_in_process
from test_flwr_run import _values


def _run(tmp_path, **overrides) -> tuple[pd.DataFrame, dict, str]:
    """metrics.csv, summary.json and log.txt of a run of `_values` with `overrides`."""
    run_dir = run_in_process(_values(tmp_path, **overrides), tmp_path / "clients")
    return read_metrics(run_dir), json.loads(run_dir.summary_json.read_text()), run_dir.log_txt.read_text()


@pytest.mark.parametrize("t_zeta", [0, 100])
def test_a_run_at_the_ends_of_the_chain(tmp_path, t_zeta):
    """t_zeta = 0: one global model, clients train nothing; t_zeta = T: clients alone."""
    metrics, _, _ = _run(tmp_path, **{"t-zeta": t_zeta, "num-server-rounds": 1})
    value = lambda who, m: metrics[(metrics["client"] == who) & (metrics["metric"] == m)]["value"]
    clients = metrics[~metrics["client"].isin(["server"])]
    client_seen = clients[clients["metric"] == "images-seen"]["value"]
    if t_zeta == 0:
        assert (client_seen == 0).all() and (value("server", "images-seen") == 64).all()
        assert (clients[clients["metric"] == "client-sampling-steps"]["value"] == 0).all()
        # the server holds the images themselves: linkage and reconstruction are exact
        assert (clients[clients["metric"] == "linkage-top1"]["value"] == 1.0).all()
        assert (clients[clients["metric"] == "reconstruction-psnr-wiener"]["value"] == 100.0).all()
    else:
        assert (client_seen == 64).all() and (value("server", "images-seen") == 0).all()
        assert (clients[clients["metric"] == "num-examples"]["value"] == 0).all()
        assert (clients[clients["metric"] == "bytes-up-train"]["value"] < 1000).all()  # counts only
        assert not clients["metric"].str.startswith(("linkage", "reconstruction", "upload-")).any()
    assert len(clients[(clients["metric"] == "fd_classifier") & (clients["client"] != "pooled")]) == 5


def test_injected_client_faults_do_not_stop_a_run(tmp_path):
    """Client 1 raises and client 2 uploads NaNs in round 2: the round goes on with the other
    three (min-replies = 3); both are logged with their reason and recorded in metrics.csv."""
    metrics, _, log = _run(tmp_path, **{"fault-injection": "1:2:raise, 2:2:nan", "min-replies": 3})
    faults = metrics[metrics["metric"].str.contains("fault")]
    assert sorted(faults[["round", "client", "metric"]].values.tolist()) == [
        [2, "1", "train-fault-raised"], [2, "2", "train-fault-rejected"]]
    assert "client 1 raises in round 2" in log and "non-finite values" in log
    assert "3/5 clients accepted" in log
    final = metrics[(metrics["round"] == 2) & (metrics["metric"] == "fd_classifier")]
    assert len(final) == 6  # every client still samples (1 and 2 from their latest state), and pooled


def test_weights_files_switch_on_fid_kid_and_fcd(tmp_path, standin_weights):
    """Weights files of the right formats (random values) switch the FID/KID/FCD columns on
    (two clients, few images: InceptionV3 at 299x299 on a CPU core takes about 0.3 s per image)."""
    inception, clip = standin_weights
    metrics, summary, _ = _run(tmp_path, **{
        "num-server-rounds": 1, "fid-weights": str(inception), "fcd-weights": str(clip),
        "num-clients": 2, "classes-per-client": 5, "held-out-fraction": 0.02, "disclosure-num-images": 4,
    })
    for name in ("fid", "kid", "fcd", "kid_clip", "server-only-fid", "upload-fcd"):
        rows = metrics[metrics["metric"] == name]
        pooled = name in ("fid", "fcd", "server-only-fid")  # KID needs per-image features: no pooled row
        expected = {"0", "1"} | ({"pooled"} if pooled else set())
        assert set(rows["client"]) == expected, name
        assert rows["value"].notna().all(), name
    assert "skipped" not in summary["notes"]
    assert {"fid", "fcd"} <= set(summary["quality"]["pooled"])
