"""Injected faults (run-config `fault-injection`, for testing the server's resilience), as a
Flower client mod around the train handler: the client behaviours themselves know nothing of it.

"<client>:<round>:raise": the client raises instead of training (Flower replies with an error);
"<client>:<round>:nan": the client trains, and every array of its reply is replaced by NaN.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, Context, Message, RecordDict

from collafuse_flwr import wire
from collafuse_flwr.config import RunConfig


def inject_faults(msg: Message, context: Context, call_next) -> Message:
    """A client mod: apply this client's fault of this round, if `fault-injection` names one.
    A message whose round or partition cannot be read goes on to the handler, which rejects it."""
    faults = RunConfig.from_flower(context.run_config).injected_faults
    message_config = msg.content.config_records.get("config", {})
    try:
        key = (wire.config_int(message_config, "partition-id", 0, 2**31),
               wire.config_int(message_config, "server-round", 0, 2**31))
    except wire.UploadRejected:
        return call_next(msg, context)
    fault = faults.get(key)
    if fault == "raise":
        raise RuntimeError(f"fault-injection: client {key[0]} raises in round {key[1]}")
    reply = call_next(msg, context)
    return Message(content=with_nan_arrays(reply.content), reply_to=msg) if fault == "nan" else reply


def with_nan_arrays(content: RecordDict) -> RecordDict:
    """`content` with every array's values replaced by NaN (fault kind "nan")."""
    for record in content.array_records.values():
        for key in list(record.keys()):
            array = record[key].numpy()
            record[key] = Array(np.full(array.shape, np.nan, dtype=array.dtype))
    return content
