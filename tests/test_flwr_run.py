"""Real `flwr run` end to end: a local SuperLink of its own, tiny settings, status checked."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from collafuse_flwr.config import RunConfig
from collafuse_flwr.diffusion.models import build_denoiser
from collafuse_flwr.run_dir import RunDirectory
from collafuse_flwr.summary import reproducible_metrics
from collafuse_flwr.tools.launch import (
    alive,
    descendants,
    flwr_run,
    format_run_config,
    isolated_env,
    local_superlinks,
    main,
    process_table,
    stopping_local_superlink,
)

PROJECT = Path(__file__).resolve().parents[1]
# Ray with 1 CPU: one ClientApp actor runs the 5 SuperNodes' tiny tasks (one process importing
# torch and diffusers instead of two); the launcher, sweep and Ray cluster tests run several actors.
FEDERATION = "num-supernodes=5 client-resources-num-cpus=1 client-resources-num-gpus=0 init-args-num-cpus=1"


@pytest.fixture(scope="module")
def flwr_env(tmp_path_factory, standin_text_weights):
    """Own FLWR_HOME and ports, a neutral working directory; the SuperLink the module's runs
    start is shared by them and stopped afterwards (its simulations inherit its environment:
    the simulated clients allow their conditions to leave them under server-condition 'full',
    and have the stand-in text tower as their own, whichever run starts the SuperLink)."""
    env = dict(isolated_env(tmp_path_factory.mktemp("flwr-home")), COLLAFUSE_SHARE_CONDITIONS="1",
               COLLAFUSE_TEXT_WEIGHTS=str(standin_text_weights))
    with stopping_local_superlink(env):
        yield env, tmp_path_factory.mktemp("neutral-cwd")
    assert not local_superlinks(process_table(), env), "the test's SuperLink did not stop"


def _values(tmp_path, **overrides) -> dict:
    """The tiny run config of these tests (writing below tmp_path), with `overrides`."""
    return {
        "num-server-rounds": 2, "image-size": 8, "timesteps": 100, "t-zeta": 20,
        "unet-block-channels": "8,16", "client-images-per-round": 64,
        "server-images-per-round": 64, "sampling-steps": 10, "eval-num-samples": 8,
        "metric-classifier-epochs": 1, "disclosure-num-images": 32, "output-dir": str(tmp_path / "runs"),
        **overrides,
    }


def _client_dir(flwr_env, run_dir: Path, pid: int) -> Path:
    """Client `pid`'s own directory of the run: below the state root its environment chose
    (COLLAFUSE_CLIENT_STATE), under the run's key; never in the server's run directory."""
    root = Path(flwr_env[0]["COLLAFUSE_CLIENT_STATE"])
    return root / f"partition-{pid}" / "runs" / (run_dir / "run-key").read_text().strip()


def _run(flwr_env, tmp_path, **overrides):
    """A run of `_values`, with one SuperNode per client."""
    env, cwd = flwr_env
    run_config = format_run_config(_values(tmp_path, **overrides))
    federation = FEDERATION.replace("num-supernodes=5", f"num-supernodes={overrides.get('num-clients', 5)}")
    outcome = flwr_run(PROJECT, run_config, federation, env=env, cwd=cwd)
    assert outcome.ok, outcome.log[-4000:]
    return outcome


DIGITS = {"server-images-per-round": 256}  # the server's round outlasts the clients': time to kill it


@pytest.fixture(scope="module")
def digits_run(flwr_env, tmp_path_factory):
    """One run of `_values` with `DIGITS` (2 rounds, 5 clients) below `<base>/a`, read by the
    tests of the run directory and of a killed and resumed run (which writes below `<base>/b`:
    the same path lengths give the same message sizes)."""
    base = tmp_path_factory.mktemp("digits")
    return _run(flwr_env, base / "a", **DIGITS), base


@pytest.mark.xdist_group("digits-run")
def test_flwr_run_writes_the_run_directory(flwr_env, digits_run):
    outcome, base = digits_run
    run_dir = outcome.run_dir
    assert run_dir.is_absolute() and run_dir.parent == base / "a" / "runs"
    config = json.loads((run_dir / "config.json").read_text())  # num-clients 0 took the federation's 5
    assert config["num-clients"] == 5 and "num-clients" not in DIGITS
    metrics = pd.read_csv(run_dir / "metrics.csv", dtype={"client": str})
    assert list(metrics.columns) == ["round", "client", "metric", "value"]
    accuracy = metrics[metrics["metric"] == "feature-network-accuracy"]["value"]
    assert len(accuracy) == 1 and 0 < accuracy.iloc[0] <= 1
    final = metrics[(metrics["round"] == 2) & (metrics["metric"] == "fd_classifier")]
    assert sorted(final["client"].astype(str)) == ["0", "1", "2", "3", "4", "pooled"]
    assert final["value"].notna().all() and (final["value"] >= 0).all()
    for name in ("precision_classifier", "recall_classifier", "coverage_classifier", "density_classifier"):
        values = metrics[(metrics["round"] == 2) & (metrics["metric"] == name)]  # per client, never pooled
        assert sorted(values["client"]) == ["0", "1", "2", "3", "4"] and (values["value"] >= 0).all(), name
        assert name == "density_classifier" or (values["value"] <= 1).all()
    uploaded = metrics[metrics["metric"] == "bytes-up-train"]
    assert len(uploaded) == 10  # 5 clients x 2 rounds
    upload_count = metrics[metrics["metric"] == "num-examples"]["value"].to_numpy()
    assert (uploaded["value"].to_numpy() > 2 * 64 * upload_count).all()  # float16 8x8 grey images
    server_seen = metrics[(metrics["client"] == "server") & (metrics["metric"] == "images-seen")]
    assert (server_seen["value"] == 256).all()
    for pid in range(5):
        assert (_client_dir(flwr_env, run_dir, pid) / "samples" / f"round-002-client-{pid}.png").stat().st_size > 0
        assert (_client_dir(flwr_env, run_dir, pid) / "round-002" / "config.json").exists()
    assert not (run_dir / "clients").exists() and not list(run_dir.glob("samples/*client*"))
    assert (run_dir / "samples" / "round-002-handover.png").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-001", "round-002"]
    assert (run_dir / "checkpoints" / "round-002" / "model" / "diffusion_pytorch_model.safetensors").exists()
    assert "round 2/2" in (run_dir / "log.txt").read_text()

    # the pooled quality row and the disclosure audit, on the evaluation round only
    pooled = metrics[metrics["client"] == "pooled"]
    assert {"fd_classifier", "num-generated", "server-only-fd_classifier"} <= set(pooled["metric"])
    assert "kid_classifier" not in set(pooled["metric"])  # KID needs per-image features: never sent
    assert pooled[pooled["metric"] == "num-generated"]["value"].item() == 5 * 8
    linkage = metrics[metrics["metric"] == "linkage-top1"]
    assert len(linkage) == 5 and (linkage["round"] == 2).all()
    chance = metrics[metrics["metric"] == "linkage-chance"]["value"]
    assert (chance == 1 / 32).all()
    for name in ("reconstruction-psnr-wiener", "reconstruction-ssim-tweedie", "upload-fd_classifier"):
        assert len(metrics[metrics["metric"] == name]) == 5, name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["t_zeta"] == 20
    assert set(summary["quality"]["clients"]) == {"0", "1", "2", "3", "4"}
    assert {"precision_classifier", "coverage_classifier"} <= set(summary["quality"]["clients"]["0"])
    assert "fd_classifier" in summary["quality"]["pooled"]
    assert set(summary["notes"]["skipped"]) == {"inception", "clip"}
    assert "fid" not in set(metrics["metric"]) and "fcd" not in set(metrics["metric"])
    assert "fid, kid skipped" in summary["notes"]["skipped"]["inception"]

    # the cost counters add up: sampling steps split at the cut, training NFEs = images seen
    steps = lambda who, m: metrics[(metrics["client"] == who) & (metrics["metric"] == m)]["value"]
    client_steps = steps("0", "client-sampling-steps").item()
    assert client_steps == 2  # grid 100, 90, ..., 10: steps starting at t <= t_zeta = 20
    assert steps("0", "nfe-sample").item() == 8 * client_steps
    assert steps("server", "nfe-sample").item() == 5 * 8 * (10 - client_steps)
    assert (steps("0", "nfe-train").to_numpy() == steps("0", "images-seen").to_numpy()).all()
    assert (steps("0", "flops-train") > 0).all() and (steps("server", "flops-sample") > 0).all()
    cost = summary["cost"]
    assert cost["clients"]["0"]["bytes-up"] == steps("0", "bytes-up-train").sum()
    assert cost["clients"]["0"]["bytes-down"] == (
        steps("0", "bytes-down-train").sum() + steps("0", "bytes-down-sample").sum())
    assert cost["server"]["nfe-train"] == 2 * 256

    from collafuse_flwr.tools.plots import plot_run

    figures = plot_run(RunDirectory(run_dir))
    assert [f.name for f in figures] == ["quality.png", "disclosure.png", "cost.png"]
    assert all(f.stat().st_size > 10_000 for f in figures)


def _check_rgb_fixture_run(flwr_env, run_dir: Path, images: int, partition: str) -> None:
    """A run on an RGB dataset fixture from the image-folder layout: its partition report
    covers the fixture's training images, and every client drew colour samples."""
    report = pd.read_csv(run_dir / "partition.csv")
    assert report[report["kind"] == "images"]["count"].sum() == images
    assert (run_dir / "partition.png").stat().st_size > 0
    assert json.loads((run_dir / "config.json").read_text())["partition"] == partition
    for pid in range(5):
        grid = np.asarray(Image.open(_client_dir(flwr_env, run_dir, pid) / "samples" / f"round-001-client-{pid}.png")
                          .convert("RGB"))
        assert (grid[..., 0] != grid[..., 2]).any()  # colour samples, not grey
    metrics = pd.read_csv(run_dir / "metrics.csv", dtype={"client": str})
    assert len(metrics[(metrics["metric"] == "fd_classifier") & (metrics["client"] != "pooled")]) == 5


def test_flwr_run_on_the_cifar10_fixture(flwr_env, tmp_path, shared_data):
    """CIFAR-10 from the image-folder layout runs end to end and leaves a partition report
    (the CelebA fixture: the text-conditional run below)."""
    outcome = _run(flwr_env, tmp_path, **{
        "dataset": "cifar10", "data-dir": str(shared_data / "cifar10-mini"), "num-server-rounds": 1,
    })
    _check_rgb_fixture_run(flwr_env, outcome.run_dir, 2000, "label-groups")


def test_a_conditional_flwr_run_under_full(flwr_env, tmp_path):
    """Class-conditional clients and server (the paper's setup) with guidance: every client
    sends its uploads' labels and its requests, is sampled for with them, and reports the
    conditioning metrics and a labelled grid."""
    outcome = _run(flwr_env, tmp_path, condition="class", **{"server-condition": "full", "guidance-scale": 2.0,
                                                              "num-server-rounds": 1})
    metrics = pd.read_csv(outcome.run_dir / "metrics.csv", dtype={"client": str})
    value = lambda metric: metrics[metrics["metric"] == metric].set_index("client")["value"]
    received, uploads = value("conditions-received"), value("num-examples")
    assert len(received) == 5 and (received == uploads[received.index] + 8).all()
    for metric in ("condition-accuracy", "condition-accuracy-real", "condition-accuracy-blind", "own-class-share"):
        assert sorted(value(metric).index) == ["0", "1", "2", "3", "4", "pooled"]
        assert value(metric).between(0, 1).all()
    assert (_client_dir(flwr_env, outcome.run_dir, 0) / "samples" / "round-001-client-0-labelled.png").is_file()
    summary = json.loads((outcome.run_dir / "summary.json").read_text())
    assert "condition-accuracy" in summary["quality"]["pooled"] and "full" not in summary["notes"]["conditions"][:20]


def test_a_text_conditional_flwr_run_on_the_celeba_fixture(flwr_env, tmp_path, shared_data, standin_text_weights):
    """Pipeline check of text conditions (random stand-in CLIP weights: the numbers mean nothing)
    on the authors' five CelebA attribute groups, the server receiving the attributes; CelebA
    from the image-folder layout runs end to end and leaves a partition report."""
    outcome = _run(flwr_env, tmp_path, **{
        "dataset": "celeba", "data-dir": str(shared_data / "celeba-mini"), "num-server-rounds": 1,
        "condition": "text", "server-condition": "full", "text-weights": str(standin_text_weights),
    })
    metrics = pd.read_csv(outcome.run_dir / "metrics.csv", dtype={"client": str})
    accuracy = metrics[metrics["metric"] == "condition-accuracy"]
    assert len(accuracy) == 6 and accuracy["value"].between(0, 1).all()
    assert (metrics[metrics["metric"] == "conditions-received"]["value"] > 8).all()
    _check_rgb_fixture_run(flwr_env, outcome.run_dir, 1000, "attribute-groups")


def test_a_missing_weights_file_fails_the_run_before_any_work(flwr_env, tmp_path):
    """The run is reported as failed (`flwr run` itself exits 0), the log names the file, and
    no run directory was made."""
    env, cwd = flwr_env
    outcome = flwr_run(PROJECT, f"fid-weights='{tmp_path}/none.pth' output-dir='{tmp_path}/runs'",
                       FEDERATION, env=env, cwd=cwd)
    assert not outcome.ok and outcome.status.startswith("finished:failed")
    assert "no such file" in outcome.log and f"{tmp_path}/none.pth" in outcome.log
    assert not (tmp_path / "runs").exists()


def test_num_clients_the_federation_cannot_meet_fails_before_any_run_directory(flwr_env, tmp_path):
    """num-clients=4 in a federation of 3 SuperNodes: the run fails as soon as the ServerApp has
    the federation's size, naming the fix in one line, and writes nothing."""
    env, cwd = flwr_env
    outcome = flwr_run(PROJECT, f"num-clients=4 output-dir='{tmp_path}/runs'",
                       FEDERATION.replace("num-supernodes=5", "num-supernodes=3"), env=env, cwd=cwd)
    assert not outcome.ok and outcome.status.startswith("finished:failed")
    assert ("num-clients=4 but the federation has 3 SuperNode(s): run with --federation-config "
            "'num-supernodes=4', or leave num-clients at 0 to take the federation's") in outcome.log
    assert not (tmp_path / "runs").exists()


def test_a_sweep_resumes_and_reports_a_failing_run_as_failed(flwr_env, tmp_path):
    """Two real runs: digits completes; CIFAR-10 from an empty folder without download fails.
    The relaunch skips the finished run and retries the failed one; the table says which is which."""
    from collafuse_flwr.tools.sweep import load_sweep, run_sweep, summary_table
    from collafuse_flwr.tools.sweep_plots import plot_sweep

    env, _ = flwr_env
    (tmp_path / "empty").mkdir()
    sweep = tmp_path / "toy.toml"
    sweep.write_text(f'''
[sweep]
datasets = ["digits", "cifar10"]
strategies = ["collafuse"]
t-zeta = [20]
seeds = [0]

[run-config]
num-server-rounds = 1
image-size = 8
timesteps = 100
unet-block-channels = "8,16"
client-images-per-round = 64
server-images-per-round = 64
sampling-steps = 10
eval-num-samples = 8
metric-classifier-epochs = 1
disclosure-num-images = 16

[dataset.cifar10]
data-dir = "{tmp_path / 'empty'}"
download = false
''')
    runs, supernodes = load_sweep(sweep, tmp_path / "out")
    first = run_sweep(runs, PROJECT, supernodes, env=env, echo=lambda line: None)
    assert [s["status"] for s in first][0] == "finished:completed"
    assert first[1]["status"].startswith("finished:failed")
    said = []
    again = run_sweep(runs, PROJECT, supernodes, env=env, echo=said.append)
    assert said[0].endswith("already completed, skipped") and again[0]["run_id"] == first[0]["run_id"]
    assert again[1]["run_id"] != first[1]["run_id"]  # the failed run was tried again
    table = summary_table(runs)
    failed = table[table["dataset"] == "cifar10"]
    assert len(failed) == 1 and failed["metric"].item() == "status" and failed["value"].isna().all()
    done = table[table["dataset"] == "digits"].set_index(["party", "metric"])["value"]
    assert done["pooled", "fd_classifier"] > 0 and 0 <= done["client-mean", "linkage-top1"] <= 1
    assert done["client-mean", "nfe-sample"] == 8 * 2 and done["server", "nfe-train"] == 64
    figures = plot_sweep(table, tmp_path / "figures")
    assert [f.name for f in figures] == ["quality.png", "disclosure.png", "cost.png"]


def _check_published_run(run_dir: Path) -> None:
    """strategy="published" (T = 100, t_zeta = 20): the client starts at T rho (2 - rho) = 36,
    i.e. runs the grid steps 30, 20, 10 of 100, 90, ..., 10; the handed-over states are clamped."""
    assert run_dir.name.endswith("digits-published-tz20")
    metrics = pd.read_csv(run_dir / "metrics.csv", dtype={"client": str})
    steps = metrics[metrics["metric"] == "client-sampling-steps"]["value"]
    assert len(steps) == 5 and (steps == 3).all()
    server = metrics[(metrics["client"] == "server") & (metrics["metric"] == "nfe-sample")]["value"]
    assert server.item() == 5 * 8 * 7
    assert json.loads((run_dir / "config.json").read_text())["strategy"] == "published"


def test_flwr_run_of_fedavg(flwr_env, tmp_path):
    """strategy="fedavg": every client trains the full chain for its budget, the server averages;
    weights (and their EMA) cross the wire both ways, the EMA alone for sampling; each client
    samples all 10 steps."""
    outcome = _run(flwr_env, tmp_path, strategy="fedavg")
    assert outcome.run_dir.name.endswith("digits-fedavg")
    metrics = pd.read_csv(outcome.run_dir / "metrics.csv", dtype={"client": str})
    value = lambda metric: metrics[metrics["metric"] == metric].set_index(["round", "client"])["value"]
    config = RunConfig.from_flower(json.loads((outcome.run_dir / "config.json").read_text()))
    tensors = list(build_denoiser(8, 1, config.block_channels).parameters())
    params = sum(p.numel() for p in tensors)
    # float32 payload plus Flower's per-array envelope (name, shape, .npy header): < 512 B each
    for metric, copies, rows in (("bytes-down-train", 2, 10), ("bytes-up-train", 2, 10), ("bytes-down-sample", 1, 5)):
        sizes = value(metric)
        payload = 4 * params * copies
        envelope = 512 * copies * len(tensors)
        assert len(sizes) == rows and ((sizes > payload) & (sizes < payload + envelope)).all(), metric
        assert set(sizes.index.get_level_values("client")) == {"0", "1", "2", "3", "4"}, metric
    assert (value("images-seen") == 64).all() and len(value("images-seen")) == 10
    assert (value("nfe-sample") == 8 * 10).all() and (value("client-sampling-steps") == 10).all()
    final = value("fd_classifier").loc[2]
    assert sorted(final.index) == ["0", "1", "2", "3", "4", "pooled"] and final.notna().all()
    assert not metrics["metric"].str.startswith(("linkage", "upload-", "reconstruction-")).any()
    assert (outcome.run_dir / "checkpoints" / "round-002" / "model" / "ema.pt").exists()
    summary = json.loads((outcome.run_dir / "summary.json").read_text())
    assert summary["strategy"] == "fedavg" and "weights" in summary["notes"]["disclosure"]
    assert summary["cost"]["server"].get("flops-train", 0) == 0


def _kill_the_run(env: dict) -> int:
    """SIGKILL every process of the run, as a crash of the machine would: the local SuperLink
    of `env` with everything below it (SuperExec, the simulation with the ServerApp, Ray and
    its ClientApp actors) and the `flwr` CLI streaming the run."""
    table = process_table()
    victims = descendants(table, [os.getpid(), *local_superlinks(table, env)]) - {os.getpid()}
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(victims)


@pytest.mark.xdist_group("digits-run")
def test_a_run_killed_mid_round_resumes_and_matches_an_uninterrupted_run(flwr_env, digits_run):
    """Killed (SIGKILL, every process) while round 2 of 2 is under way, the same config
    started again continues in the same run directory from round 1's checkpoint (the clients
    from their round-1 state, not the half-finished round 2), ends after round 2 and gives
    exactly the metrics of the uninterrupted `digits_run` (seeds fix everything: partition,
    noise, training streams and samples). That another config never reuses the checkpoint is
    test_checkpoint's."""
    env, _ = flwr_env
    reference, base = digits_run
    killed_dir = base / "b"
    launch = threading.Thread(target=lambda: flwr_run(
        PROJECT, format_run_config(_values(killed_dir, **DIGITS)), FEDERATION,
        env=env, cwd=flwr_env[1]))
    launch.start()
    deadline = time.monotonic() + 600
    state_root = Path(env["COLLAFUSE_CLIENT_STATE"])

    def round_2_started() -> bool:
        keys = [p.read_text().strip() for p in killed_dir.glob("runs/*/run-key")]
        return bool(keys and list(state_root.glob(f"partition-*/runs/{keys[0]}/round-002")))

    while not round_2_started():
        assert time.monotonic() < deadline and launch.is_alive(), "round 2 never started"
        time.sleep(0.05)
    assert _kill_the_run(env) > 0
    launch.join(timeout=60)
    (run_dir,) = (killed_dir / "runs").glob("0*-digits-*")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-001"]  # killed mid-round 2

    resumed = _run(flwr_env, killed_dir, **DIGITS)
    assert resumed.run_dir == run_dir
    log = (run_dir / "log.txt").read_text()
    assert "resumed after round 1 of 2" in log and log.count("round 2/2") == 1 and log.count("round 1/2") == 1
    pd.testing.assert_frame_equal(reproducible_metrics(RunDirectory(run_dir)),
                                  reproducible_metrics(RunDirectory(reference.run_dir)))


def test_the_launcher_stops_the_superlink_it_started_and_no_other(tmp_path, monkeypatch, capsys):
    """collafuse-run with a SuperLink port and FLWR_HOME of its own, in a directory of its own:
    a relative output-dir lands below that directory and the run directory is reported; the
    local SuperLink its run started is stopped with everything below it; one that was running
    before the launch is left running. Its run is the authors' published variant
    (`_check_published_run`)."""
    env = dict(isolated_env(tmp_path / "flwr-home"),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    for key in set(os.environ) - set(env):
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    values = _values(tmp_path, **{"num-server-rounds": 1, "output-dir": "runs",  # relative to the launcher's cwd
                                  "strategy": "published"})
    run_config = format_run_config(values)
    codes, seen, names = [], set(), set()  # the processes of the SuperLink's tree during the launch
    launcher = threading.Thread(target=lambda: codes.append(main([str(PROJECT), "--run-config", run_config])))
    launcher.start()
    while launcher.is_alive():
        table = process_table()
        tree = [table[pid] for pid in descendants(table, local_superlinks(table, env))]
        seen.update(p.identity for p in tree)
        names.update(p.name for p in tree)
        time.sleep(0.2)
    assert codes == [0]
    (run_dir,) = (tmp_path / "runs").glob("0*-digits-published-tz20")
    assert capsys.readouterr().out.endswith(f"results: {run_dir}\n")
    _check_published_run(run_dir)
    assert {"flower-superlink", "flower-superexec", "flwr-simulation", "raylet"} <= names
    assert not local_superlinks(process_table(), env)
    deadline = time.monotonic() + 30  # what the SuperLink's stop did not reach (Ray) winds down
    while alive(seen) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive(seen), alive(seen)

    with stopping_local_superlink(env):
        subprocess.run([str(Path(sys.executable).with_name("flwr")), "ls"], env=env, capture_output=True, check=True)
        (running,) = local_superlinks(process_table(), env)
        assert main([str(PROJECT), "--run-config", "t-zeta=5000"]) == 1
        assert local_superlinks(process_table(), env) == [running]
    assert not local_superlinks(process_table(), env)
