"""Injected faults are a client mod around training: the client behaviours never see them."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from collafuse_flwr import client_app
from collafuse_flwr.clients.faults import inject_faults
from test_wire import client_context, server_message


def trained(msg: Message, context) -> Message:
    """Stands in for the train handler: a reply with an array and a metric."""
    content = RecordDict({"uploads": ArrayRecord({"x": Array(np.ones((2, 3), dtype=np.float16))}),
                          "metrics": MetricRecord({"num-examples": 2})})
    return Message(content=content, reply_to=msg)


@pytest.fixture
def faulty_config(tiny_run_config) -> dict:
    return dict(tiny_run_config, **{"fault-injection": "0:1:raise, 1:1:nan"})


def test_raise_and_nan_hit_only_their_client_and_round(faulty_config, tmp_path, task_identity):
    context = client_context(faulty_config, tmp_path)
    with pytest.raises(RuntimeError, match="fault-injection: client 0 raises in round 1"):
        inject_faults(server_message("train", 0, 1), context, trained)
    nan = inject_faults(server_message("train", 1, 1), context, trained).content
    assert np.isnan(nan.array_records["uploads"]["x"].numpy()).all()
    assert nan.array_records["uploads"]["x"].numpy().dtype == np.float16
    assert nan.metric_records["metrics"]["num-examples"] == 2
    for partition_id, server_round in ((0, 2), (2, 1)):  # another round, another client
        clean = inject_faults(server_message("train", partition_id, server_round), context, trained).content
        assert (clean.array_records["uploads"]["x"].numpy() == 1).all()


def test_a_message_without_round_goes_on_to_the_handler(faulty_config, tmp_path, task_identity):
    msg = Message(RecordDict(), dst_node_id=1, message_type="train")
    assert inject_faults(msg, client_context(faulty_config, tmp_path), trained).content.array_records


def test_the_client_app_runs_training_through_the_mod(faulty_config, tmp_path, task_identity):
    registered = client_app.app._registered_funcs["train.default"]  # what Flower calls for a train message
    with pytest.raises(RuntimeError, match="fault-injection: client 0 raises in round 1"):
        registered(server_message("train", 0, 1), client_context(faulty_config, tmp_path))
