"""What crosses the wire, and its validation on arrival (PROTOCOL.md, "What crosses the wire").

client -> server, training:  RecordDict {"uploads": ArrayRecord {"x_cut": (n, C, H, W)},
                                         "metrics": MetricRecord {partition-id, num-examples, ...}}
server -> client, sampling:  RecordDict {"handover": ArrayRecord {"x_handover": (n, C, H, W)},
                                         "config": ConfigRecord {...}}
FedAvg baseline (strategy "fedavg"; weights instead of images):
server -> client, training:  RecordDict {"arrays": ArrayRecord {"net.<name>", "ema.<name>"},
                                         "config": ConfigRecord {...}}
client -> server, training:  RecordDict {"arrays": ArrayRecord (the same keys, shapes, dtypes),
                                         "metrics": MetricRecord {partition-id, num-examples, ...}}
server -> client, sampling:  RecordDict {"arrays": ArrayRecord {"ema.<name>"}, "config": ...}
client -> server, evaluation (not part of the protocol; measurement only):
                             RecordDict {"metrics": MetricRecord {quality and cost figures},
                                         "features": ArrayRecord {"<network>-real": (m, d),
                                                                  "<network>-generated": (n, d)}}

x_cut holds one cut-point sample x_{t_zeta} per training image and nothing else: no x0,
eps, t, labels or weights. Everything received is checked before it is used.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

UPLOADS = "uploads"
UPLOAD_KEY = "x_cut"
HANDOVER = "handover"
HANDOVER_KEY = "x_handover"
METRICS = "metrics"
FEATURES = "features"
WEIGHTS = "arrays"  # Flower's FedAvg default `arrayrecord_key`
# |weight| beyond this is no trained U-Net's: a diverged or hostile update
MAX_ABS_WEIGHT = 1e4
# Keys a client may report with its uploads: counts, its loss, timing and compute, no data.
TRAIN_METRIC_KEYS = frozenset(
    {"partition-id", "num-examples", "train-loss", "images-seen", "train-seconds", "nfe-train",
     "flops-train"}
)
# x_t = a x0 + b eps with a^2 + b^2 = 1 and |x0| <= 1: |x_t| > 10 is a >9-sigma event.
MAX_ABS_VALUE = 10.0


class UploadRejected(ValueError):
    """A reply's content does not follow the protocol; the server drops it."""


def pack_uploads(x_cut: torch.Tensor, dtype: str, metrics: dict) -> RecordDict:
    """A client's training reply: its cut-point samples x_cut (n, C, H, W) as `dtype`
    (no uploads record when n = 0, i.e. when the server owns no step)."""
    content = RecordDict({METRICS: MetricRecord(metrics)})
    if x_cut.shape[0]:
        array = Array(x_cut.detach().to(getattr(torch, dtype)).contiguous().cpu().numpy())
        content[UPLOADS] = ArrayRecord({UPLOAD_KEY: array})
    return content


def unpack_uploads(
    content: RecordDict, image_shape: tuple[int, int, int], dtype: str, cap: int
) -> tuple[torch.Tensor, MetricRecord]:
    """Validate a training reply and return (x_cut as float32 (n, C, H, W), its metrics).

    Rejects (raises `UploadRejected`): any record other than "uploads" and "metrics", any
    array other than "x_cut", metric keys outside `TRAIN_METRIC_KEYS`, a shape other than
    (n, *image_shape), a dtype other than `dtype`, n different from the declared
    "num-examples" or above `cap`, and non-finite or out-of-range values.
    """
    extra = set(content.keys()) - {UPLOADS, METRICS}
    if extra or METRICS not in content.metric_records:
        raise UploadRejected(f"unexpected records {sorted(extra)} or no metrics record")
    metrics = content.metric_records[METRICS]
    if set(metrics) - TRAIN_METRIC_KEYS:
        raise UploadRejected(f"unexpected metrics {sorted(set(metrics) - TRAIN_METRIC_KEYS)}")
    declared = metrics.get("num-examples")
    if not isinstance(declared, int) or declared < 0:
        raise UploadRejected(f"num-examples={declared!r} is not a count")
    if declared == 0:
        if UPLOADS in content.array_records:
            raise UploadRejected("uploads sent although num-examples is 0")
        return torch.empty((0, *image_shape)), metrics
    array = _image_batch(content, UPLOADS, UPLOAD_KEY, dtype, image_shape)
    if array.shape[0] != declared or array.shape[0] > cap:
        raise UploadRejected(f"{array.shape[0]} samples; declared {declared}, cap {cap}")
    values = _finite(array)
    peak = float(np.abs(values).max())
    if peak > MAX_ABS_VALUE:
        raise UploadRejected(f"|value| up to {peak:.3g} exceeds {MAX_ABS_VALUE}")
    return torch.from_numpy(values.astype(np.float32)), metrics


def pack_handover(x: torch.Tensor) -> ArrayRecord:
    """The server's half-sampled states x_{t_zeta}: (n, C, H, W) float32 (never clipped)."""
    return ArrayRecord({HANDOVER_KEY: Array(x.detach().float().contiguous().cpu().numpy())})


def unpack_handover(
    content: RecordDict, image_shape: tuple[int, int, int], max_count: int
) -> torch.Tensor:
    """Validate the handed-over states on the client; return (n, C, H, W) float32."""
    array = _image_batch(content, HANDOVER, HANDOVER_KEY, "float32", image_shape)
    if not 0 < array.shape[0] <= max_count:
        raise UploadRejected(f"handover of {array.shape[0]} states; at most {max_count} allowed")
    return torch.from_numpy(_finite(array).copy())


def _image_batch(
    content: RecordDict, record: str, key: str, dtype: str, image_shape: tuple[int, int, int]
) -> Array:
    """The one array `key` of ArrayRecord `record`, checked to be (n, *image_shape) of `dtype`."""
    if record not in content.array_records:
        raise UploadRejected(f"no {record} record")
    arrays = content.array_records[record]
    if list(arrays.keys()) != [key]:
        raise UploadRejected(f"{record} must hold exactly '{key}', got {list(arrays.keys())}")
    array = arrays[key]
    if array.dtype != dtype:
        raise UploadRejected(f"{record}: dtype {array.dtype}, expected {dtype}")
    shape = tuple(array.shape)
    if len(shape) != 4 or shape[1:] != tuple(image_shape):
        raise UploadRejected(
            f"{record}: shape {shape}, expected (n, {', '.join(map(str, image_shape))})"
        )
    return array


def _finite(array: Array) -> np.ndarray:
    """The array's values, rejected if any is NaN or infinite."""
    values = array.numpy()
    if not np.isfinite(values).all():
        raise UploadRejected("non-finite values")
    return values


def pack_features(features: dict[str, torch.Tensor]) -> ArrayRecord:
    """An evaluation reply's feature arrays, {"<network>-real"|"<network>-generated": (n, d)}, float32."""
    return ArrayRecord({k: Array(v.detach().float().contiguous().cpu().numpy()) for k, v in features.items()})


def unpack_features(
    content: RecordDict, networks: dict[str, int], max_generated: int, max_real: int
) -> dict[str, torch.Tensor]:
    """Validate an evaluation reply's features against `networks` ({name: feature size});
    return {"<network>-real"|"<network>-generated": (n, d) float32}. An absent record gives {}.

    Rejects keys of unknown networks or without their pair, dtype other than float32, shape
    other than (n, d) with 2 <= n <= the cap (`max_generated`, `max_real`), non-finite values.
    """
    if FEATURES not in content.array_records:
        return {}
    arrays = content.array_records[FEATURES]
    expected = {f"{name}-{kind}" for name in networks for kind in ("real", "generated")}
    names = {key.rsplit("-", 1)[0] for key in arrays.keys()}
    wanted = {f"{name}-{kind}" for name in names for kind in ("real", "generated")}
    if set(arrays.keys()) - expected or wanted != set(arrays.keys()):
        raise UploadRejected(f"features {sorted(arrays.keys())}: allowed are pairs of {sorted(expected)}")
    out = {}
    for key, array in arrays.items():
        name, kind = key.rsplit("-", 1)
        cap = max_generated if kind == "generated" else max_real
        if array.dtype != "float32" or len(array.shape) != 2 or array.shape[1] != networks[name]:
            raise UploadRejected(f"{key}: {array.dtype} {tuple(array.shape)}, expected float32 (n, {networks[name]})")
        if not 2 <= array.shape[0] <= cap:
            raise UploadRejected(f"{key}: {array.shape[0]} rows, allowed 2..{cap}")
        out[key] = torch.from_numpy(_finite(array).copy())
    return out


def pack_weights(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """A model's weights as an ArrayRecord, {"net.<name>" | "ema.<name>": array} (float32)."""
    return ArrayRecord({k: Array(v.detach().float().contiguous().cpu().numpy()) for k, v in state.items()})


def weights_state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """The tensors of an ArrayRecord of weights (`pack_weights` reversed)."""
    return {k: torch.from_numpy(v.numpy().copy()) for k, v in arrays.items()}


def check_weights(arrays: ArrayRecord, reference: ArrayRecord) -> None:
    """Reject weights whose keys, shapes or dtypes differ from `reference`'s, or with
    non-finite values or |w| > MAX_ABS_WEIGHT."""
    if set(arrays.keys()) != set(reference.keys()):
        missing, extra = set(reference.keys()) - set(arrays.keys()), set(arrays.keys()) - set(reference.keys())
        raise UploadRejected(f"weights: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    for key, expected in reference.items():
        array = arrays[key]
        if array.dtype != expected.dtype or tuple(array.shape) != tuple(expected.shape):
            raise UploadRejected(
                f"{key}: {array.dtype} {tuple(array.shape)}, expected {expected.dtype} {tuple(expected.shape)}"
            )
        values = _finite(array)
        if values.size and float(np.abs(values).max()) > MAX_ABS_WEIGHT:
            raise UploadRejected(f"{key}: |w| exceeds {MAX_ABS_WEIGHT:g}")


def unpack_weights(
    content: RecordDict, reference: ArrayRecord, cap: int
) -> tuple[ArrayRecord, MetricRecord]:
    """Validate a FedAvg training reply against the weights the server sent (`reference`);
    return (its ArrayRecord, its metrics).

    Rejects: records other than "arrays" and "metrics", weights failing `check_weights`,
    metric keys outside `TRAIN_METRIC_KEYS`, and a "num-examples" (the averaging weight)
    that is not a count in [1, cap].
    """
    if set(content.keys()) != {WEIGHTS, METRICS} or WEIGHTS not in content.array_records \
            or METRICS not in content.metric_records:
        raise UploadRejected(f"records {sorted(content.keys())}; expected ['{WEIGHTS}', '{METRICS}']")
    metrics = content.metric_records[METRICS]
    if set(metrics) - TRAIN_METRIC_KEYS:
        raise UploadRejected(f"unexpected metrics {sorted(set(metrics) - TRAIN_METRIC_KEYS)}")
    declared = metrics.get("num-examples")
    if not isinstance(declared, int) or not 1 <= declared <= cap:
        raise UploadRejected(f"num-examples={declared!r} is not a count in [1, {cap}]")
    check_weights(content.array_records[WEIGHTS], reference)
    return content.array_records[WEIGHTS], metrics


def content_bytes(content: RecordDict) -> int:
    """Size in bytes of a message's content as Flower serialises it (protobuf)."""
    return int(recorddict_to_proto(content).ByteSize())
