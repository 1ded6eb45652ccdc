"""A client is its own data (client-data = own): its images come from the folder its node
config names, its state lives below its own root whatever partition id the server assigns, and
the server sets up a run without reading any client's images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from collafuse_flwr import client_app, wire
from collafuse_flwr.clients.round import ClientRound
from collafuse_flwr.clients.state import ClientStateError
from collafuse_flwr.config import RunConfig
from collafuse_flwr.data import client_data, client_indices, load_table
from collafuse_flwr.data.clients import reference_images
from collafuse_flwr.data.export import export_partitions
from test_wire import client_context, server_message


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The embedded digits cut into 5 clients' folders and a reference folder (TINY sizes)."""
    from conftest import TINY

    config = RunConfig.from_flower(TINY)
    out = tmp_path_factory.mktemp("export") / "digits"
    clients, reference = export_partitions(config, out)
    return config, clients, reference


def own(run_config: dict, reference) -> dict:
    return dict(run_config, **{"client-data": "own", "data-dir": str(reference)})


def test_an_exported_folder_holds_exactly_its_clients_images(exported):
    """Client k's folder holds its partition (training and held-out images) with their labels,
    up to 8-bit rounding; the reference folder the images no client holds."""
    config, clients, reference = exported
    table = load_table(config)
    for k, folder in enumerate(clients):
        train, held = client_indices(config)[k]
        rows = np.union1d(train, held)
        mine = load_table(RunConfig.from_flower(dict(config.to_flower(), **{"data-dir": str(folder)})))
        assert mine.images.shape == (len(rows), 1, 8, 8) and mine.images.dtype == np.uint8
        assert np.array_equal(mine.labels, table.labels[rows])
        assert np.abs(mine.images / 127.5 - 1 - table.images[rows]).max() <= 0.5 / 127.5 + 1e-6
    ref = load_table(RunConfig.from_flower(dict(config.to_flower(), **{"data-dir": str(reference)})))
    assert len(ref) == len(reference_images(config).indices)


def test_a_client_with_its_own_data_reads_its_node_configs_folder(exported, tiny_run_config, tmp_path, task_identity):
    """Whatever partition id the server assigns, the client trains on its folder (its own
    held-out split) and keeps its state below its root in `own/`."""
    _, clients, reference = exported
    run_config = own(tiny_run_config, reference)
    context = client_context(run_config, tmp_path / "state", data_dir=str(clients[3]))
    rounds = [ClientRound.from_message(server_message("train", pid), context) for pid in (0, 4)]
    for client in rounds:
        assert client.state.directory == tmp_path / "state" / "own"
        assert client.config.data_dir == str(clients[3]) and client.config.dataset_split == "all"
        assert len(client.data.train) + len(client.data.held_out) == len(load_table(client.config))
    assert torch.equal(rounds[0].data.held_out, rounds[1].data.held_out)
    simulated = client_data(RunConfig.from_flower(tiny_run_config), 3)
    assert sorted(torch.cat([rounds[0].data.train_targets, rounds[0].data.held_out_targets]).tolist()) == sorted(
        torch.cat([simulated.train_targets, simulated.held_out_targets]).tolist())


def test_a_client_without_a_data_dir_refuses_before_any_work(exported, tiny_run_config, tmp_path, task_identity):
    _, _, reference = exported
    context = client_context(own(tiny_run_config, reference), tmp_path / "state")
    with pytest.raises(ClientStateError, match="names no data-dir"):
        ClientRound.from_message(server_message("train", 0), context)
    assert not (tmp_path / "state").exists()


def test_a_client_trains_and_uploads_from_its_own_folder(exported, tiny_run_config, tmp_path, task_identity):
    _, clients, reference = exported
    run_config = own(tiny_run_config, reference)
    reply = client_app.train(server_message("train", 1), client_context(run_config, tmp_path, data_dir=str(clients[1])))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    x_cut, metrics = wire.unpack_uploads(reply.content, (1, 8, 8), "float16", cap=10_000, images_per_round=64)
    folder = load_table(RunConfig.from_flower(dict(run_config, **{"data-dir": str(clients[1])})))
    assert 0 < len(x_cut) == metrics["num-examples"] < len(folder)


def test_the_server_sets_up_an_own_data_run_without_reading_client_images(exported, tiny_run_config, monkeypatch):
    """The server's data-dir is the reference folder; nothing that reads a client's share
    (partitions, training images) is called, no partition report is written, the disclosure
    attacks are off and summary.json's notes say why."""
    from collafuse_flwr.data import clients as data_clients
    from collafuse_flwr.metrics import audit
    from collafuse_flwr.strategies import setup

    def forbidden(*args, **kwargs):
        raise AssertionError("the server read a client's images")

    for module, name in ((setup, "client_indices"), (data_clients, "client_indices"), (audit, "client_indices"),
                         (audit, "training_images"), (data_clients, "client_data")):
        monkeypatch.setattr(module, name, forbidden)
    _, _, reference = exported
    config = RunConfig.from_flower(own(tiny_run_config, reference))
    run = setup.prepare_run(config, 7)
    assert not run.run_dir.partition_csv.exists()
    assert not run.strategy.audit.enabled
    assert "simulation only" in run.strategy.notes["disclosure"]
    assert "which no client holds" in run.strategy.notes["fd_classifier"]
