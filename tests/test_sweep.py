"""Sweep files: expansion and validation before anything runs."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from collafuse_flwr.config import ConfigError
from collafuse_flwr.tools.sweep import load_sweep

HEAD = '[sweep]\ndatasets = ["digits"]\nstrategies = ["collafuse"]\nt-zeta = [20]\nseeds = [0]\n'
TINY = '''
[run-config]
num-server-rounds = 1
timesteps = 100
image-size = 8
'''


def _write(tmp_path, text: str):
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    return path


def test_a_sweep_expands_to_one_run_per_combination(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, '''
[sweep]
datasets = ["digits", "cifar10"]
strategies = ["collafuse"]
t-zeta = [0, 20, 100]
seeds = [0, 1]
''' + TINY + '''
[dataset.cifar10]
data-dir = "data/cifar"
''')
    runs, supernodes = load_sweep(path, tmp_path / "out")
    assert supernodes == 5 and len(runs) == 2 * 3 * 2
    names = [r.name for r in runs]
    assert len(set(names)) == 12 and "cifar10-collafuse-tz20-seed1" in names
    cifar = next(r for r in runs if r.dataset == "cifar10")
    assert cifar.run_config["data-dir"] == str(tmp_path / "data" / "cifar")  # resolved: runs start elsewhere
    assert cifar.run_config["output-dir"] == str(tmp_path / "out" / "runs" / cifar.name)
    assert "data-dir" not in runs[0].run_config
    assert len({r.config_hash for r in runs}) == 12


def test_fedavg_runs_once_and_a_strategy_may_have_its_own_cut_points(tmp_path):
    path = _write(tmp_path, '''
[sweep]
datasets = ["digits"]
strategies = ["collafuse", "fedavg", "published"]
t-zeta = [0, 20, 100]
seeds = [0, 1]
''' + TINY + '''
[strategy.published]
t-zeta = [20]
ema-decay = 0.9
''')
    runs, _ = load_sweep(path, tmp_path / "out")
    names = [r.name for r in runs]
    assert names == [f"digits-collafuse-tz{t}-seed{s}" for t in (0, 20, 100) for s in (0, 1)] + [
        "digits-fedavg-seed0", "digits-fedavg-seed1", "digits-published-tz20-seed0", "digits-published-tz20-seed1"]
    fedavg = next(r for r in runs if r.strategy == "fedavg")
    assert fedavg.t_zeta == 100 and fedavg.run_config["t-zeta"] == 100  # recorded at T
    published = next(r for r in runs if r.strategy == "published")
    assert published.run_config["ema-decay"] == 0.9 and "ema-decay" not in runs[0].run_config
    # where a sweep writes is not part of a run's identity
    moved, _ = load_sweep(path, tmp_path / "elsewhere")
    assert [r.config_hash for r in moved] == [r.config_hash for r in runs]


@pytest.mark.parametrize("text,message", [
    ('[sweep]\ndatasets = ["digits"]\nstrategies = ["collafuse"]\nt-zeta = [500]\nseeds = [0]\n' + TINY,
     "run digits-collafuse-tz500-seed0: t-zeta=500"),
    ('[sweep]\ndatasets = ["digits"]\nstrategies = ["fedprox"]\nt-zeta = [0]\nseeds = [0]\n' + TINY,
     "strategy='fedprox': unknown"),
    ('[sweep]\ndatasets = ["digits"]\nstrategies = ["collafuse"]\nt-zeta = [0]\n' + TINY, "needs datasets"),
    ('[sweep]\ndatasets = ["digits"]\nstrategies = ["collafuse"]\nt-zeta = []\nseeds = [0]\n', "non-empty"),
    ('[sweep]\ndatasets = ["digits"]\nstrategies = ["collafuse"]\nt-zeta = [0]\nseeds = [0]\n[runconfig]\n',
     "sections must be"),
    ('[sweep]\ndatasets = ["digits"]\nstrategies = ["collafuse"]\nt-zeta = [0]\nseeds = [0]\n'
     'num-supernodes = 3\n[run-config]\nnum-clients = 5\n',
     "num-clients=5 but the federation has 3 SuperNode(s): run with --federation-config 'num-supernodes=5'"),
    ('[sweep]\ndatasets = ["digits"]\nstrategies = ["collafuse"]\nt-zeta = [0]\nseeds = [0]\n'
     '[dataset.celeba]\ndata-dir = "x"\n', "not one of the sweep's dataset values"),
    ('[sweep]\ndatasets = ["digits"]\nstrategies = ["collafuse"]\nt-zeta = [0]\nseeds = [0]\n'
     '[strategy.fedavg]\nema-decay = 0.9\n', "not one of the sweep's strategy values"),
    ('[sweep]\ndatasets = ["digits"]\nstrategies = ["published"]\nt-zeta = [0]\nseeds = [0]\n'
     '[strategy.published]\nt-zeta = 200\n', "t-zeta must be a non-empty list"),
    ('[sweep\ndatasets = ["digits"]\n', "sweep.toml: not a readable TOML file"),
    ('sweep = 5\n', "sweep.toml: [sweep] must be a table"),
    *((HEAD + f'num-supernodes = {value}\n' + TINY, f"[sweep] num-supernodes={shown}: must be an integer >= 1")
      for value, shown in (('"5"', "'5'"), ("true", "True"), ("0", "0"), ("5.0", "5.0"))),
    (HEAD.replace("t-zeta = [20]", "t-zeta = [20, 0, 20]") + TINY, "[sweep] t-zeta lists [20] more than once"),
    (HEAD.replace("seeds = [0]", "seeds = [1, 1]") + TINY, "[sweep] seeds lists [1] more than once"),
    (HEAD.replace('["digits"]', '["digits", "digits"]') + TINY, "[sweep] datasets lists ['digits'] more than once"),
    (HEAD.replace('["collafuse"]', '["fedavg", "fedavg"]') + TINY, "[sweep] strategies lists ['fedavg'] more"),
    (HEAD.replace("seeds = [0]", "seeds = [true]") + TINY, "[sweep] seeds must be a non-empty list of integers"),
    (HEAD.replace("t-zeta = [20]", "t-zeta = [20.0]") + TINY, "[sweep] t-zeta must be a non-empty list of integers"),
    (HEAD.replace('["digits"]', '[1]') + TINY, "[sweep] datasets must be a non-empty list of strings"),
    (HEAD + TINY + '[strategy.collafuse]\nt-zeta = [20, 20]\n', "[strategy.collafuse] t-zeta lists [20] more"),
    (HEAD + TINY + 'seed = 3\n', "[run-config] sets seed, which the sweep gives every run"),
    (HEAD + TINY + 'output-dir = "x"\n', "[run-config] sets output-dir"),
    (HEAD + TINY + '[dataset.digits]\nt-zeta = 20\n', "[dataset.digits] sets t-zeta"),
    (HEAD.replace('["collafuse"]', '["fedavg"]') + TINY + '[strategy.fedavg]\nt-zeta = [20]\n',
     "[strategy.fedavg] sets t-zeta"),
    ('run-config = 3\n' + HEAD, "[run-config] must be a table"),
    (HEAD + '[dataset]\ndigits = 3\n', "[dataset.digits] must be a table"),
    (HEAD + 'overlay = 5\n', "[sweep] overlay=5: must be a file name"),
    (HEAD + TINY + '[dataset.digits]\ndata-dir = "a\\u0000b"\n', "run digits-collafuse-tz20-seed0: data-dir="
     "'a\\x00b': must not contain a NUL byte"),
])
def test_bad_sweep_files_fail_before_any_run(tmp_path, text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_sweep(_write(tmp_path, text), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unreadable_overlay_and_sweep_files_are_named(tmp_path):
    (tmp_path / "base.toml").write_text("timesteps = \n")
    path = _write(tmp_path, HEAD + 'overlay = "base.toml"\n' + TINY)
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'base.toml'}: not a readable TOML file")):
        load_sweep(path, tmp_path / "out")
    path.write_bytes(b"[sweep]\ndatasets = [\"\xff\"]\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: not a readable TOML file")):
        load_sweep(path, tmp_path / "out")


def test_results_table_gives_mean_and_spread_over_seeds():
    from collafuse_flwr.tools.sweep_tables import results_table, to_markdown

    def row(strategy, t_zeta, seed, party, metric, value, status="finished:completed"):
        return dict(run=f"{strategy}-{t_zeta}-{seed}", dataset="digits", strategy=strategy, t_zeta=t_zeta, seed=seed,
                    status=status, timesteps=1000, party=party, metric=metric, value=value)

    table = pd.DataFrame([
        row("collafuse", 200, 0, "pooled", "fd_classifier", 10.0),
        row("collafuse", 200, 1, "pooled", "fd_classifier", 14.0),
        row("collafuse", 200, 0, "client-mean", "bytes-up", 2e6),
        row("collafuse", 200, 1, "client-mean", "bytes-up", 2e6),
        row("collafuse", 200, 2, "status", "status", None, status="finished:failed"),
        row("fedavg", 1000, 0, "pooled", "fd_classifier", 30.0),
    ])
    frame = results_table(table)
    assert list(frame.columns) == ["dataset", "strategy", "t_zeta", "seeds", "fd_classifier pooled", "client MB up"]
    collafuse, fedavg = frame.iloc[0], frame.iloc[1]
    assert collafuse["seeds"] == 2 and collafuse["fd_classifier pooled"] == "12 ± 3"  # std of (10, 14)
    assert collafuse["client MB up"] == "2.00 ± 0.00"
    assert fedavg["t_zeta"] == "—" and fedavg["fd_classifier pooled"] == "30" and fedavg["client MB up"] == "—"
    assert to_markdown(frame).splitlines()[2].startswith("| digits | collafuse | 200 | 2 | 12 ± 3 |")


def test_a_sweep_may_start_from_an_overlay(tmp_path):
    (tmp_path / "base.toml").write_text('timesteps = 100\nimage-size = 8\nema-decay = 0.9\n')
    path = _write(tmp_path, '[sweep]\ndatasets = ["digits"]\nstrategies = ["collafuse"]\nt-zeta = [20]\n'
                            'seeds = [0]\noverlay = "base.toml"\n[run-config]\nema-decay = 0.5\n')
    (run,), _ = load_sweep(path, tmp_path / "out")
    assert run.run_config["timesteps"] == 100 and run.run_config["ema-decay"] == 0.5  # the sweep file wins
    path.write_text(path.read_text().replace("base.toml", "missing.toml"))
    with pytest.raises(ConfigError, match="missing.toml does not exist"):
        load_sweep(path, tmp_path / "out")


VARIANTS = '''
[sweep]
datasets = ["digits"]
strategies = ["collafuse", "fedavg"]
t-zeta = [0, 20, 100]
seeds = [0, 1]
''' + TINY + '''
[strategy.collafuse]
t-zeta = [20, 100]
ema-decay = 0.9

[variant.plain]
condition = "none"

[variant.class]
strategies = ["collafuse"]
t-zeta = [0]
condition = "class"
server-condition = "full"
ema-decay = 0.5

[variant.fedavg-big]
strategies = ["fedavg"]
client-images-per-round = 96
'''


def test_variants_run_their_strategies_at_their_cut_points_with_their_run_config(tmp_path):
    path = _write(tmp_path, VARIANTS)
    runs, _ = load_sweep(path, tmp_path / "out")
    # datasets, then variants in file order, then strategies, t_zeta, seed
    assert [r.name for r in runs] == [
        *(f"digits-plain-collafuse-tz{t}-seed{s}" for t in (20, 100) for s in (0, 1)),  # the strategy's cut points
        "digits-plain-fedavg-seed0", "digits-plain-fedavg-seed1",
        "digits-class-collafuse-tz0-seed0", "digits-class-collafuse-tz0-seed1",  # its own, not the strategy's
        "digits-fedavg-big-fedavg-seed0", "digits-fedavg-big-fedavg-seed1"]
    by_name = {r.name: r for r in runs}
    plain, conditional = by_name["digits-plain-collafuse-tz20-seed0"], by_name["digits-class-collafuse-tz0-seed0"]
    assert plain.variant == "plain" and plain.run_config["condition"] == "none" and plain.run_config["ema-decay"] == 0.9
    assert conditional.variant == "class" and conditional.t_zeta == 0 and conditional.run_config["t-zeta"] == 0
    assert conditional.run_config["condition"] == "class" and conditional.run_config["server-condition"] == "full"
    assert conditional.run_config["ema-decay"] == 0.5  # the variant wins over the strategy's table
    assert "strategies" not in conditional.run_config  # a sweep-only key
    big = by_name["digits-fedavg-big-fedavg-seed1"]
    assert big.t_zeta == 100 and big.run_config["client-images-per-round"] == 96 and big.num_clients == 5
    assert "client-images-per-round" not in by_name["digits-plain-fedavg-seed1"].run_config
    assert len({r.config_hash for r in runs}) == len(runs)
    # without variants every run's variant is ""
    assert {r.variant for r in load_sweep(_write(tmp_path, HEAD + TINY), tmp_path / "out")[0]} == {""}


V_HEAD = HEAD.replace('["collafuse"]', '["collafuse", "fedavg"]') + TINY


@pytest.mark.parametrize("text,message", [
    (V_HEAD + '[variant.Big]\n', "[variant.Big]: a variant's name must consist of lowercase letters, digits and '-'"),
    (V_HEAD + '[variant.a_b]\n', "[variant.a_b]: a variant's name must consist"),
    ('variant = 3\n' + V_HEAD, "[variant] must be a table"),
    (V_HEAD + '[variant]\na = 3\n', "[variant.a] must be a table"),
    (V_HEAD + '[variant.a]\nstrategies = ["published"]\n',
     "[variant.a] strategies: 'published' is not one of the sweep's strategy values"),
    (V_HEAD + '[variant.a]\nstrategies = []\n', "[variant.a] strategies must be a non-empty list of strings"),
    (V_HEAD + '[variant.a]\nstrategies = "fedavg"\n', "[variant.a] strategies must be a non-empty list of strings"),
    (V_HEAD + '[variant.a]\nstrategies = ["fedavg", "fedavg"]\n', "[variant.a] strategies lists ['fedavg'] more"),
    (V_HEAD + '[variant.a]\nt-zeta = 20\n', "[variant.a] t-zeta must be a non-empty list of integers"),
    (V_HEAD + '[variant.a]\nt-zeta = [true]\n', "[variant.a] t-zeta must be a non-empty list of integers"),
    (V_HEAD + '[variant.a]\nt-zeta = [20, 20]\n', "[variant.a] t-zeta lists [20] more than once"),
    (V_HEAD + '[variant.a]\nstrategies = ["fedavg"]\nt-zeta = [20]\n',
     "[variant.a] sets t-zeta, which the sweep gives every run"),
    *((V_HEAD + f'[variant.a]\n{key} = {value}\n', f"[variant.a] sets {key}, which the sweep gives every run")
      for key, value in (("dataset", '"cifar10"'), ("strategy", '"fedavg"'), ("seed", "1"), ("output-dir", '"x"'))),
    (V_HEAD + '[variant.a]\nstrategies = ["collafuse"]\n',
     "[sweep] strategies lists 'fedavg', which no [variant.<name>] runs"),
])
def test_bad_variant_tables_fail_before_any_run(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
        load_sweep(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("entry,message", [
    ('condition = "bogus"', "condition='bogus'"),
    ('conditon = "class"', "unknown run-config key(s) ['conditon']"),
    ('condition = "none"\nserver-condition = "full"', "server-condition='full' sends each upload's condition"),
])
def test_a_variants_run_config_is_validated_per_run(tmp_path, entry, message):
    path = _write(tmp_path, V_HEAD + f'[variant.a]\nstrategies = ["collafuse"]\n[variant.b]\n{entry}\n')
    with pytest.raises(ConfigError, match=re.escape(f"{path}, run digits-b-collafuse-tz20-seed0: {message}")):
        load_sweep(path, tmp_path / "out")


def _complete(runs) -> None:
    """Fake completed runs: a status (with the run's config hash) and a summary.json each."""
    for run in runs:
        pooled = {"own-class-share": 0.9 + 0.05 * run.seed}
        if run.variant == "class":
            pooled["condition-accuracy"] = 0.8 + 0.1 * run.seed
        quality = {"pooled": pooled, "clients": {"0": {"fd_classifier": 10.0 + 2 * run.seed}}}
        server = {} if run.strategy == "fedavg" else {"flops-train": 2e12}
        summary = {"timesteps": 100, "quality": quality, "disclosure": {},
                   "cost": {"server": server, "clients_mean": {"flops-train": 1e12}}}
        if run.strategy != "fedavg":  # FedAvg's summary has no privacy section and no membership rows
            summary["disclosure"] = {"clients": {"0": {"membership-auc": 0.5 + 0.1 * run.seed}}}
            summary["privacy"] = {"max_epsilon": 4.0 + run.seed}
        (run.out_dir / "00001-run").mkdir(parents=True)
        (run.out_dir / "00001-run" / "summary.json").write_text(json.dumps(summary))
        run.status_path.write_text(json.dumps({"status": "finished:completed", "run_dir": "00001-run",
                                               "config_hash": run.config_hash}))


def test_the_summary_and_results_tables_of_a_sweep_with_variants(tmp_path):
    """Fake completed runs (a status and a summary.json each): summary.csv names each row's
    variant and number of clients; results.md groups by variant and adds the conditioning
    metrics and the total training compute (server + num_clients x client mean); the figures
    draw a line per variant and strategy."""
    from collafuse_flwr.tools.sweep import summary_table
    from collafuse_flwr.tools.sweep_plots import plot_sweep
    from collafuse_flwr.tools.sweep_tables import results_table, to_markdown

    runs, _ = load_sweep(_write(tmp_path, VARIANTS), tmp_path / "out")
    _complete(runs[:-1])
    runs[-1].out_dir.mkdir(parents=True)
    runs[-1].status_path.write_text(json.dumps({"status": "finished:failed", "run_dir": None}))
    table = summary_table(runs)
    assert set(table.variant) == {"plain", "class", "fedavg-big"} and set(table.num_clients) == {5}
    frame = results_table(table)
    assert list(frame.columns) == ["dataset", "variant", "strategy", "t_zeta", "seeds", "fd_classifier client mean",
                                   "condition accuracy pooled", "own-class share pooled", "epsilon (max over clients)",
                                   "membership AUC", "client TFLOPs train", "server TFLOPs", "total train TFLOPs"]
    assert [tuple(r) for r in frame[["variant", "strategy", "t_zeta", "seeds"]].itertuples(index=False)] == [
        ("plain", "collafuse", 20, 2), ("plain", "collafuse", 100, 2), ("plain", "fedavg", "—", 2),
        ("class", "collafuse", 0, 2), ("fedavg-big", "fedavg", "—", 1)]
    conditional = frame.iloc[3]
    assert conditional["condition accuracy pooled"] == "0.850 ± 0.071"  # std of (0.8, 0.9)
    assert conditional["total train TFLOPs"] == "7.00 ± 0.00"  # 2 + 5 x 1
    fedavg = frame.iloc[2]
    assert fedavg["condition accuracy pooled"] == "—" and fedavg["server TFLOPs"] == "—"
    assert fedavg["epsilon (max over clients)"] == "—" and conditional["epsilon (max over clients)"] == "4.5 ± 0.707"
    assert conditional["membership AUC"] == "0.550 ± 0.071"
    assert fedavg["total train TFLOPs"] == "5.00 ± 0.00"  # no server training: 5 x 1
    row = ("| digits | class | collafuse | 0 | 2 | 11 ± 1 | 0.850 ± 0.071 | 0.925 ± 0.035 | 4.5 ± 0.707 "
           "| 0.550 ± 0.071 | 1.00 ± 0.00 | 2.00 ± 0.00 | 7.00 ± 0.00 |")
    assert to_markdown(frame).splitlines()[5] == row
    # a summary table without variants ("" in every row) has no variant column
    assert "variant" not in results_table(table.assign(variant="")).columns
    assert [f.name for f in plot_sweep(table, tmp_path / "figures")] == ["quality.png", "cost.png"]


def test_equal_values_have_a_spread_of_zero_whatever_their_float_rounding():
    from collafuse_flwr.tools.sweep_tables import _mean_std

    assert _mean_std(pd.Series([0.9920000000000001, 0.992, 0.992]), "{:.3g}") == "0.992 ± 0"
    assert _mean_std(pd.Series([4.0, 5.0]), "{:.3g}") == "4.5 ± 0.707"
    assert _mean_std(pd.Series([7.0]), "{:.1f}") == "7.0"


def test_every_series_of_a_sweep_with_variants_keeps_its_own_style():
    """The figures name each series once, in one legend, so no two series may share a colour and
    marker; the first ten differ in hue (tab20's dark colours before their light twins)."""
    from collafuse_flwr.tools.sweep_plots import _series_styles

    keys = [(f"variant-{i}", "collafuse") for i in range(45)]
    styles = _series_styles(keys)
    assert len(set(styles.values())) == 45
    assert len({color for color, _ in list(styles.values())[:10]}) == 10
    assert {marker for _, marker in list(styles.values())[:20]} == {"o"}


def test_tables_only_writes_the_tables_of_the_completed_runs_and_runs_nothing(tmp_path, monkeypatch, capsys):
    """A sweep in progress: --tables-only starts no run and writes summary.csv, results.md and
    the figures from the runs completed so far; the others, also a run finished for another run
    config, are left out of results.md, and summary.csv gives their status and their T (an
    integer column, as for the completed runs)."""
    import collafuse_flwr.tools.sweep as sweep

    path, out = _write(tmp_path, VARIANTS), tmp_path / "out"
    runs, _ = load_sweep(path, out)
    _complete(runs[:4])
    stale = json.loads(runs[3].status_path.read_text()) | {"config_hash": "another config"}
    runs[3].status_path.write_text(json.dumps(stale))  # finished, but the sweep file changed since
    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: pytest.fail("--tables-only started a run"))
    assert sweep.main([str(path), "--out", str(out), "--tables-only"]) == 0
    assert f"3/{len(runs)} runs completed so far; nothing run" in capsys.readouterr().out
    assert (out / "figures" / "quality.png").exists()
    table = (out / "summary.csv").read_text()
    assert all(run.name in table for run in runs)  # the rest as status rows
    r = runs[3]
    assert f"{r.name},digits,plain,collafuse,{r.t_zeta},{r.seed},5,stale: another run config,100,,status,\n" in table
    r = runs[-1]
    assert f"{r.name},digits,{r.variant},{r.strategy},{r.t_zeta},{r.seed},5,not run,100,,status,\n" in table
    assert f"{runs[0].name},digits,plain,collafuse,20,0,5,finished:completed,100,pooled," in table
    seeds = [line.split(" | ")[4] for line in (out / "results.md").read_text().splitlines()[2:]]
    assert seeds == ["2", "1"]  # plain collafuse at 20 (seeds 0 and 1), then at 100 (seed 0)


def _started_runs(sweep, monkeypatch) -> list:
    """The runs each `collafuse-sweep` call of the test would start (none is), in a list."""
    started = []
    monkeypatch.setattr(sweep, "run_sweep", lambda runs, *a, **k: started.append(runs) or [])
    monkeypatch.setattr(sweep, "write_tables", lambda *a: None)
    return started


def test_a_sweep_asking_for_conditions_needs_the_simulated_clients_consent(tmp_path, monkeypatch):
    """Runs under server-condition 'full' make the clients send their labels, which they do only
    when allowed ($COLLAFUSE_SHARE_CONDITIONS): without it the sweep stops before any run."""
    import collafuse_flwr.tools.sweep as sweep

    path, out = _write(tmp_path, VARIANTS), tmp_path / "out"
    started = _started_runs(sweep, monkeypatch)
    monkeypatch.delenv("COLLAFUSE_SHARE_CONDITIONS", raising=False)
    with pytest.raises(SystemExit):
        sweep.main([str(path), "--out", str(out)])
    monkeypatch.setenv("COLLAFUSE_SHARE_CONDITIONS", "perhaps")
    with pytest.raises(SystemExit):
        sweep.main([str(path), "--out", str(out)])
    assert not started
    monkeypatch.setenv("COLLAFUSE_SHARE_CONDITIONS", "1")
    assert sweep.main([str(path), "--out", str(out)]) == 0 and len(started) == 1
    runs, _ = load_sweep(path, out)
    _complete([r for r in runs if r.run_config.get("server-condition") == "full"])
    monkeypatch.delenv("COLLAFUSE_SHARE_CONDITIONS")
    assert sweep.main([str(path), "--out", str(out)]) == 0 and len(started) == 2  # nothing left asks


def test_a_sweep_whose_runs_name_different_weights_files_stops_before_any_run(tmp_path, monkeypatch, capsys):
    """The simulated clients of a sweep get the weights files its runs name through the
    environment of the one SuperLink the first run starts (launch.own_clients_settings): runs
    naming different files would leave the later runs' clients with the first's, so the sweep
    stops before any run; a file the user gives the clients (COLLAFUSE_FID_WEIGHTS) serves all."""
    import collafuse_flwr.tools.sweep as sweep

    text = HEAD + TINY + f'''
[variant.one]
fid-weights = "{tmp_path / 'one.pth'}"

[variant.other]
fid-weights = "{tmp_path / 'other.pth'}"
'''
    path, out = _write(tmp_path, text), tmp_path / "out"
    for name in ("one.pth", "other.pth"):
        (tmp_path / name).write_bytes(name.encode())
    started = _started_runs(sweep, monkeypatch)
    monkeypatch.delenv("COLLAFUSE_FID_WEIGHTS", raising=False)
    with pytest.raises(SystemExit):
        sweep.main([str(path), "--out", str(out)])
    assert "name different fid-weights" in capsys.readouterr().err and not started
    monkeypatch.setenv("COLLAFUSE_FID_WEIGHTS", str(tmp_path / "one.pth"))
    assert sweep.main([str(path), "--out", str(out)]) == 0 and len(started) == 1
