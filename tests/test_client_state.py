"""A client's own state fails closed: a damaged or missing ledger, a state directory others
may write to, a secret others may read, a symlink in place of its files, a deleted round."""

from __future__ import annotations

import json
import os

import pytest

from collafuse_flwr import client_app
from collafuse_flwr.clients.state import ClientState, ClientStateError, privacy_budget, shares_conditions
from test_wire import client_context, server_message

SHAPE = (1, 8, 8)


@pytest.mark.parametrize("content", ["", "[]", "{}", "NaN", '{"format": 2, "views": [["v", NaN]], "images": {}, '
                                     '"image-shapes": []}', '{"format": 2, "views": [["v", -1]], "images": {}, '
                                     '"image-shapes": []}', '{"format": 2, "views": [], "images": {"k": [0]}, '
                                     '"image-shapes": []}', '{"view": 1.0}'])
def test_a_damaged_ledger_refuses_every_upload_naming_the_file(content, tmp_path):
    """Empty, a list, NaN, a negative multiplier, an index to no view, the old format: each
    refuses, naming the file, and nothing is written over it."""
    state = ClientState(tmp_path / "partition-0")
    path = tmp_path / "partition-0" / "privacy-ledger.json"
    path.write_text(content)
    with pytest.raises(ClientStateError, match=f"privacy ledger {path} is damaged"):
        state.spend(["a"], SHAPE, "view", 1.0, (10.0, 1e-5))
    with pytest.raises(ClientStateError, match="reset-privacy-ledger=true"):
        state.spend(["a"], SHAPE, "view", 1.0, None)  # without a budget too: the ledger must stay whole
    assert path.read_text() == content


def test_a_missing_ledger_beside_the_secret_refuses_until_the_client_resets_it(tmp_path, caplog):
    state = ClientState(tmp_path / "partition-0")
    path = tmp_path / "partition-0" / "privacy-ledger.json"
    state.spend(["a"], SHAPE, "view-1", 1.0, None)
    path.unlink()
    with pytest.raises(ClientStateError, match="is missing beside the client's secret"):
        ClientState(tmp_path / "partition-0").spend(["a"], SHAPE, "view-2", 1.0, (10.0, 1e-5))
    assert not path.exists()
    path.write_text("[]")
    os.chmod(path, 0o600)
    reset = ClientState(tmp_path / "partition-0", reset_ledger=True)
    reset.spend(["a"], SHAPE, "view-2", 1.0, (10.0, 1e-5))
    assert json.loads(path.read_text())["images"] == {"a": [0]}
    assert [p.read_text() for p in path.parent.glob("privacy-ledger.json.damaged-*")] == ["[]"]
    assert "starting an empty ledger" in caplog.text


def test_a_new_client_starts_with_an_empty_ledger(tmp_path):
    ClientState(tmp_path / "partition-0")
    ledger = tmp_path / "partition-0" / "privacy-ledger.json"
    assert json.loads(ledger.read_text()) == {"format": 2, "views": [], "images": {}, "image-shapes": []}
    assert ledger.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("which", ["root", "holder"])
def test_a_state_directory_others_may_write_to_is_refused(which, tmp_path):
    root = tmp_path / "root"
    (root / "partition-0").mkdir(parents=True)
    os.chmod(root if which == "root" else root / "partition-0", 0o777)
    with pytest.raises(ClientStateError, match="only it may write to"):
        ClientState(root / "partition-0")
    assert not (root / "partition-0" / "secret").exists()


def test_a_secret_others_may_read_is_refused(tmp_path):
    ClientState(tmp_path / "partition-0")
    os.chmod(tmp_path / "partition-0" / "secret", 0o644)
    with pytest.raises(ClientStateError, match="secret and ledger must be this user's alone"):
        ClientState(tmp_path / "partition-0")


@pytest.mark.parametrize("name", ["secret", "privacy-ledger.json", "privacy-ledger.json.lock"])
def test_no_file_of_the_client_is_opened_through_a_symlink(name, tmp_path):
    """A planted symlink (to a file the client would truncate or read) is refused and the file
    it points to is untouched."""
    holder = tmp_path / "partition-0"
    holder.mkdir(mode=0o700)
    target = tmp_path / "victim"
    target.write_bytes(b"x" * 32)
    os.chmod(target, 0o600)
    if name != "secret":
        ClientState(holder)
    (holder / name).unlink(missing_ok=True)
    (holder / name).symlink_to(target)
    with pytest.raises((ClientStateError, OSError)):
        ClientState(holder).spend(["a"], SHAPE, "view", 1.0, None)
    assert target.read_bytes() == b"x" * 32


def test_an_empty_node_config_value_hides_no_environment_variable(monkeypatch):
    monkeypatch.setenv("COLLAFUSE_PRIVACY_BUDGET", "1, 1e-5")
    monkeypatch.setenv("COLLAFUSE_SHARE_CONDITIONS", "0")
    assert privacy_budget({"privacy-budget": ""}) == (1.0, 1e-5)
    assert privacy_budget({"privacy-budget": " "}) == (1.0, 1e-5)
    assert privacy_budget({"privacy-budget": "2, 1e-6"}) == (2.0, 1e-6)
    assert not shares_conditions({"share-conditions": ""})


def test_a_deleted_round_of_the_client_is_a_fault_not_a_fresh_start(tiny_run_config, tmp_path, task_identity):
    """The client trained rounds 1 and 2; its round-2 denoiser is deleted: round 3 refuses,
    naming it, instead of training a new denoiser from scratch."""
    run_config = dict(tiny_run_config, **{"num-server-rounds": 3})
    context = client_context(run_config, tmp_path)
    for server_round in (1, 2):
        client_app.train(server_message("train", 0, server_round), context)
    run_dir = next((tmp_path / "partition-0" / "runs").iterdir())
    assert json.loads((run_dir / "rounds.json").read_text()) == [1, 2]
    for path in sorted((run_dir / "round-002").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (run_dir / "round-002").rmdir()
    with pytest.raises(ClientStateError, match=f"trained in round 2 .* missing from {run_dir}"):
        client_app.train(server_message("train", 0, 3), context)
    assert not (run_dir / "round-003").exists()


@pytest.mark.parametrize("run", [{"strategy": "fedavg"}, {"t-zeta": 0}])
def test_under_a_budget_a_client_refuses_what_its_ledger_cannot_account_for(run, tiny_run_config, tmp_path,
                                                                            task_identity):
    """FedAvg's trained weights and t_zeta = 0's clean images: with a privacy budget the client
    refuses before any work (no denoiser trained, nothing recorded); without one it takes part."""
    from collafuse_flwr import wire
    from collafuse_flwr.config import RunConfig
    from collafuse_flwr.diffusion.models import Denoiser, build_denoiser

    run_config = dict(tiny_run_config, **run)
    config = RunConfig.from_flower(run_config)
    records = {}
    if config.strategy == "fedavg":
        net = build_denoiser(config.image_size, 1, config.block_channels)
        records[wire.WEIGHTS] = wire.pack_weights(Denoiser(net, 1e-3, config.ema_decay).state())
    limited = client_context(run_config, tmp_path / "limited", privacy_budget="100, 1e-5")
    with pytest.raises(ClientStateError, match="privacy-budget"):
        client_app.train(server_message("train", 0, **records), limited)
    ledger = json.loads((tmp_path / "limited" / "partition-0" / "privacy-ledger.json").read_text())
    assert ledger["images"] == {} and not list((tmp_path / "limited").glob("**/round-001"))
    reply = client_app.train(server_message("train", 0, **records), client_context(run_config, tmp_path / "free"))
    assert not reply.has_error()
