"""Sweep files: expansion and validation before anything runs."""

from __future__ import annotations

import re

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
     'num-supernodes = 3\n', "num-clients differs"),
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
    import pandas as pd

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
