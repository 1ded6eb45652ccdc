"""What crosses the wire, and its validation on arrival (docs/protocol.md, docs/threat-model.md).

client -> server, training:  RecordDict {"uploads": ArrayRecord {"x_cut": (n, C, H, W)},
                                         "metrics": MetricRecord {partition-id, num-examples, ...}}
                             with server-condition "full" also
                             "conditions": ArrayRecord {"c_cut": the uploads' raw conditions,
                                                        "c_requested": those of the images the
                                                        client will ask for when sampling}
                             (labels (n,) int64, or attributes (n, A) uint8 in {0, 1})
server -> client, sampling:  RecordDict {"handover": ArrayRecord {"x_handover": (n, C, H, W)},
                                         "config": ConfigRecord {...}}
FedAvg baseline (strategy "fedavg"; weights instead of images):
server -> client, training:  RecordDict {"arrays": ArrayRecord {"net.<name>", "ema.<name>"},
                                         "config": ConfigRecord {...}}
client -> server, training:  RecordDict {"arrays": ArrayRecord (the same keys, shapes, dtypes),
                                         "metrics": MetricRecord {partition-id, num-examples, ...}}
server -> client, sampling:  RecordDict {"arrays": ArrayRecord {"ema.<name>"}, "config": ...}
client -> server, evaluation (not part of the protocol; measurement only):
                             RecordDict {"metrics": MetricRecord {sample sizes, quality, cost},
                                         "moments": ArrayRecord {"<network>-<kind>-mean": (d,),
                                                                 "<network>-<kind>-covariance": (d, d)}}
                             kind "real" (the client's held-out images, num-real of them) and
                             "generated" (num-generated); "moments" only with pooled-metrics,
                             holding the networks whose moments the client releases (possibly
                             none: clients/release.py)
                             or, when the client declines to release anything,
                             RecordDict {"declined": ConfigRecord {partition-id, reason, detail}}
                             (reason one of DECLINE_REASONS, detail its own words: clients/release.py)

x_cut holds one cut-point sample x_{t_zeta} per training image and nothing else: no x0,
eps, t or weights; labels only in "conditions", and only when the run's server-condition is
"full". Everything received is checked before it is used.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from collafuse_flwr.metrics.manifold import MIN_MANIFOLD_IMAGES, manifold_names

UPLOADS = "uploads"
UPLOAD_KEY = "x_cut"
CONDITIONS = "conditions"
CONDITION_KEY = "c_cut"
REQUESTED_KEY = "c_requested"
HANDOVER = "handover"
HANDOVER_KEY = "x_handover"
METRICS = "metrics"
DECLINED = "declined"
# why a client declines an evaluate message (clients/release.py): a feature network it does not
# trust, a pretrained file the server names that it lacks, or sets below its release minimum
DECLINE_REASONS = ("untrusted-evaluator", "missing-weights", "too-few-images")
MAX_DETAIL_CHARS = 1_000
# Every server message carries the run key: 32 hex digits naming the run (no secret)
RUN_KEY = re.compile(r"[0-9a-f]{32}")
MOMENTS = "moments"
# The two sets of images behind each feature network's moments in an evaluation reply.
MOMENT_KINDS = ("real", "generated")
# A reply's covariance may miss symmetry and positive semi-definiteness by float32 round-off:
# this much of its largest diagonal entry.
COVARIANCE_TOLERANCE = 1e-3
WEIGHTS = "arrays"  # Flower's FedAvg default `arrayrecord_key`
FEATURE_NETWORK = "feature-network"  # evaluate messages: the fd_classifier network's weights
MAX_FEATURE_TARGETS, MAX_FEATURES = 1_000, 4_096  # bounds of a FeatureClassifier a client builds
# |weight| beyond this is no trained U-Net's: a diverged or hostile update
MAX_ABS_WEIGHT = 1e4
# A training reply's metrics, every key required: (kind, low, high); high None = no bound.
# Counts are ints, the rest finite floats (ints accepted); nothing else (no lists, no bools).
TRAIN_METRICS = {
    "partition-id": (int, 0, None),
    "num-examples": (int, 0, None),
    "train-loss": (float, 0.0, None),
    "images-seen": (int, 0, None),
    "train-seconds": (float, 0.0, None),
    "nfe-train": (float, 0.0, None),
    "flops-train": (float, 0.0, None),
}
TRAIN_METRIC_KEYS = frozenset(TRAIN_METRICS)
# x_t = a x0 + b eps with a^2 + b^2 = 1 and |x0| <= 1: |x_t| > 10 is a >9-sigma event.
MAX_ABS_VALUE = 10.0
# The .npy header readers `decode` accepts, by format version
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class UploadRejected(ValueError):
    """A message's content does not follow the protocol: the server drops such a reply (a
    fault of its client); a client refuses such a message (its reply is Flower's error)."""


def pack_uploads(x_cut: torch.Tensor, dtype: str, metrics: dict) -> RecordDict:
    """A client's training reply: its cut-point samples x_cut (n, C, H, W) as `dtype`
    (no uploads record when n = 0, i.e. when the server owns no step)."""
    content = RecordDict({METRICS: MetricRecord(metrics)})
    if x_cut.shape[0]:
        array = Array(x_cut.detach().to(getattr(torch, dtype)).contiguous().cpu().numpy())
        content[UPLOADS] = ArrayRecord({UPLOAD_KEY: array})
    return content


def unpack_uploads(
    content: RecordDict, image_shape: tuple[int, int, int], dtype: str, cap: int, images_per_round: int,
    with_conditions: bool = False,
) -> tuple[torch.Tensor, dict]:
    """Validate a training reply and return (x_cut as float32 (n, C, H, W), its metrics).

    Rejects (raises `UploadRejected`): any record other than "uploads", "metrics" and, when
    `with_conditions`, "conditions" (read by `unpack_conditions`), any array other than
    "x_cut", metrics failing `check_metrics(TRAIN_METRICS)` (images-seen at
    most `images_per_round`), decoded values that are not `dtype` of shape (n, *image_shape),
    n different from "num-examples" or above `cap`, and non-finite or out-of-range values.
    """
    extra = set(content.keys()) - {UPLOADS, METRICS} - ({CONDITIONS} if with_conditions else set())
    if extra or METRICS not in content.metric_records:
        raise UploadRejected(f"unexpected records {sorted(extra)} or no metrics record")
    metrics = check_metrics(content.metric_records[METRICS], _train_schema(images_per_round))
    declared = metrics["num-examples"]
    if declared == 0:
        if UPLOADS in content.array_records:
            raise UploadRejected("uploads sent although num-examples is 0")
        return torch.empty((0, *image_shape)), metrics
    values = _image_batch(content, UPLOADS, UPLOAD_KEY, dtype, image_shape, cap)
    if values.shape[0] != declared:
        raise UploadRejected(f"{values.shape[0]} samples; declared {declared}")
    peak = float(np.abs(values).max())
    if peak > MAX_ABS_VALUE:
        raise UploadRejected(f"|value| up to {peak:.3g} exceeds {MAX_ABS_VALUE}")
    return torch.from_numpy(values.astype(np.float32)), metrics


def pack_conditions(c_cut: torch.Tensor, requested: torch.Tensor) -> ArrayRecord:
    """A training reply's raw conditions (server-condition "full"): of the uploads, c_cut,
    and of the images the client will ask for, requested; labels (n,) as int64, attributes
    (n, A) in {0, 1} as uint8."""
    def array(c: torch.Tensor) -> Array:
        return Array(c.detach().to(torch.int64 if c.ndim == 1 else torch.uint8).contiguous().cpu().numpy())

    return ArrayRecord({CONDITION_KEY: array(c_cut), REQUESTED_KEY: array(requested)})


def unpack_conditions(
    content: RecordDict, kind: str, size: int, uploads: int, requested: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a training reply's "conditions" record by its decoded values; return (the
    uploads' raw conditions, the requested ones): labels (n,) int64 in [0, size) for `kind`
    "class", attributes (n, size) float32 in {0, 1} for "attributes". Rejects a missing record,
    keys other than "c_cut" and "c_requested", another dtype or shape, `uploads` and
    `requested` rows expected, and values outside the range."""
    if CONDITIONS not in content.array_records:
        raise UploadRejected("no conditions record (server-condition is 'full')")
    arrays = content.array_records[CONDITIONS]
    if set(arrays.keys()) != {CONDITION_KEY, REQUESTED_KEY}:
        raise UploadRejected(f"conditions must hold exactly {CONDITION_KEY}, {REQUESTED_KEY}; "
                             f"got {list(arrays.keys())}")
    attributes = kind == "attributes"
    dtype, high = ("uint8", 1) if attributes else ("int64", size - 1)
    out = []
    for key, count in ((CONDITION_KEY, uploads), (REQUESTED_KEY, requested)):
        shape = (count, size) if attributes else (count,)
        values = decode(arrays[key], dtype, math.prod(shape), f"{CONDITIONS}.{key}")
        if values.shape != shape:
            raise UploadRejected(f"{CONDITIONS}.{key}: shape {values.shape}, expected {shape}")
        if values.size and (values.min() < 0 or values.max() > high):
            raise UploadRejected(f"{CONDITIONS}.{key}: values outside [0, {high}]")
        out.append(torch.from_numpy(values.astype(np.float32 if attributes else np.int64)))
    return out[0], out[1]


def _train_schema(images_per_round: int) -> dict[str, tuple[type, float, float | None]]:
    """TRAIN_METRICS with images-seen bounded by the client's budget per round."""
    return {**TRAIN_METRICS, "images-seen": (int, 0, images_per_round)}


def check_metrics(metrics: Mapping, schema: dict[str, tuple[type, float, float | None]]) -> dict:
    """`metrics` as a plain dict if its keys are exactly `schema`'s and every value has the
    schema's kind (int: an int, not a bool; float: a finite int or float) and lies in
    [low, high]; raises `UploadRejected` naming the first key that does not."""
    keys = set(metrics.keys())
    if keys != set(schema):
        raise UploadRejected(
            f"metrics: missing {sorted(set(schema) - keys)}, unexpected {sorted(keys - set(schema))}"
        )
    out = {}
    for key, (kind, low, high) in schema.items():
        value = metrics[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (kind is int and not isinstance(value, int)) or not math.isfinite(value):
            raise UploadRejected(f"{key}={value!r}: must be a finite {kind.__name__}")
        if value < low or (high is not None and value > high):
            raise UploadRejected(f"{key}={value!r}: outside [{low}, {'inf' if high is None else high}]")
        out[key] = kind(value)
    return out


def config_int(config: Mapping, key: str, low: int, high: int) -> int:
    """An int of a config record the server sent, checked to lie in [low, high] (client side)."""
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UploadRejected(f"message config {key}={value!r}: must be an int in [{low}, {high}]")
    return value


def pack_handover(x: torch.Tensor) -> ArrayRecord:
    """The server's half-sampled states x_{t_zeta}: (n, C, H, W) float32 (never clipped)."""
    return ArrayRecord({HANDOVER_KEY: Array(x.detach().float().contiguous().cpu().numpy())})


def unpack_handover(
    content: RecordDict, image_shape: tuple[int, int, int], max_count: int
) -> torch.Tensor:
    """Validate the handed-over states on the client; return (n, C, H, W) float32."""
    values = _image_batch(content, HANDOVER, HANDOVER_KEY, "float32", image_shape, max_count)
    return torch.from_numpy(values.copy())


def _image_batch(
    content: RecordDict, record: str, key: str, dtype: str, image_shape: tuple[int, int, int], cap: int
) -> np.ndarray:
    """The decoded values of the one array `key` of ArrayRecord `record`: `dtype`, shape
    (n, *image_shape) with 1 <= n <= cap, finite."""
    if record not in content.array_records:
        raise UploadRejected(f"no {record} record")
    arrays = content.array_records[record]
    if list(arrays.keys()) != [key]:
        raise UploadRejected(f"{record} must hold exactly '{key}', got {list(arrays.keys())}")
    values = decode(arrays[key], dtype, cap * math.prod(image_shape), f"{record}.{key}")
    if values.ndim != 4 or values.shape[1:] != tuple(image_shape) or not 1 <= values.shape[0] <= cap:
        raise UploadRejected(
            f"{record}: shape {values.shape}, expected (n, {', '.join(map(str, image_shape))}) with 1 <= n <= cap={cap}"
        )
    return values


def decode(array: Array, dtype: str, max_items: int, name: str) -> np.ndarray:
    """The values an Array carries, decoded from its bytes (never from what it declares):
    a .npy payload without pickles, of `dtype`, at most `max_items` values, all finite.

    The .npy header (version 1.0 or 2.0) is read first and its dtype and shape checked
    before anything is allocated: dtype `dtype`, count = prod(shape) <= `max_items`, and the
    bytes after the header exactly count * itemsize. A header declaring more values than the
    cap or than the bytes present (e.g. 64 GiB in a few hundred bytes) is rejected, never
    allocated."""
    itemsize = np.dtype(dtype).itemsize
    if not isinstance(array.data, bytes) or len(array.data) > max_items * itemsize + 4096:
        raise UploadRejected(
            f"{name}: payload of {len(array.data)} bytes exceeds the cap of {max_items} {dtype} values"
        )
    stream = io.BytesIO(array.data)
    try:
        read_header = _NPY_HEADER_READERS.get(np.lib.format.read_magic(stream))
        if read_header is None:
            raise ValueError("a .npy format version other than 1.0 and 2.0")
        shape, fortran_order, declared = read_header(stream)
    except (ValueError, OSError, EOFError) as err:
        raise UploadRejected(f"{name}: not a .npy array ({err})") from None
    count = math.prod(shape)  # Python ints: no overflow
    if declared != np.dtype(dtype) or min(shape, default=0) < 0 or count > max_items:
        raise UploadRejected(f"{name}: dtype {declared} of shape {shape}, expected dtype {dtype} "
                             f"with at most {max_items} values (the cap)")
    present = len(array.data) - stream.tell()
    if present != count * itemsize:
        raise UploadRejected(f"{name}: {present} bytes of values; shape {shape} of {dtype} needs {count * itemsize}")
    values = np.frombuffer(array.data, declared, count, stream.tell())
    values = values.reshape(shape, order="F" if fortran_order else "C").copy()
    if not np.isfinite(values).all():
        raise UploadRejected(f"{name}: non-finite values")
    return values


def pack_moments(moments: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> ArrayRecord:
    """An evaluation reply's feature statistics for the pooled row, never a per-image feature:
    {"<network>-<real|generated>": (mean (d,), covariance (d, d))} as the float32 arrays
    "<network>-<real|generated>-mean" and "<network>-<real|generated>-covariance"."""
    arrays = {}
    for key, (mean, covariance) in moments.items():
        arrays[f"{key}-mean"] = Array(mean.detach().float().contiguous().cpu().numpy())
        arrays[f"{key}-covariance"] = Array(covariance.detach().float().contiguous().cpu().numpy())
    return ArrayRecord(arrays)


def unpack_moments(arrays: ArrayRecord, sizes: Mapping[str, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Validate an evaluation reply's feature statistics against `sizes` ({network: feature
    size d} of every feature network the server knows); return {"<network>-<real|generated>":
    (mean (d,), covariance (d, d))} as float64 tensors.

    Rejects: keys other than exactly the mean and covariance of "real" and "generated" per
    network; decoded values other than float32 of shape (d,) and (d, d), or non-finite; a
    covariance that is not symmetric or not positive semi-definite (`_covariance`).
    """
    expected = {f"{name}-{kind}-{stat}" for name in sizes for kind in MOMENT_KINDS for stat in ("mean", "covariance")}
    if set(arrays.keys()) != expected:
        missing, extra = sorted(expected - set(arrays.keys())), sorted(set(arrays.keys()) - expected)
        raise UploadRejected(f"moments: missing {missing[:4]}, unexpected {extra[:4]}")
    out = {}
    for name, d in sizes.items():
        for kind in MOMENT_KINDS:
            key = f"{name}-{kind}"
            mean = decode(arrays[f"{key}-mean"], "float32", d, f"{key}-mean")
            covariance = decode(arrays[f"{key}-covariance"], "float32", d * d, f"{key}-covariance")
            if mean.shape != (d,) or covariance.shape != (d, d):
                raise UploadRejected(f"{key}: decoded mean {mean.shape} and covariance {covariance.shape}, "
                                     f"expected ({d},) and ({d}, {d})")
            out[key] = (torch.from_numpy(mean.astype(np.float64)), _covariance(covariance, f"{key}-covariance"))
    return out


def _covariance(values: np.ndarray, name: str) -> torch.Tensor:
    """A decoded (d, d) covariance as float64, symmetrised, if it is symmetric and positive
    semi-definite up to COVARIANCE_TOLERANCE times its largest diagonal entry (float32 round-off:
    C + tolerance I must have a Cholesky factor); raises `UploadRejected` otherwise."""
    c = torch.from_numpy(values.astype(np.float64))
    tolerance = COVARIANCE_TOLERANCE * max(float(c.diagonal().abs().max()), float(np.finfo(np.float32).tiny))
    if float((c - c.T).abs().max()) > tolerance:
        raise UploadRejected(f"{name}: not symmetric")
    c = (c + c.T) / 2
    if torch.linalg.cholesky_ex(c + tolerance * torch.eye(len(c), dtype=c.dtype)).info != 0:
        raise UploadRejected(f"{name}: not positive semi-definite")
    return c


def _evaluation_schema(
    networks: Mapping[str, tuple[str, str, int]], num_generated: int, max_real: int, max_steps: int,
    shares: tuple[str, ...], manifold: bool,
) -> dict[str, tuple[type, float, float | None]]:
    """The `check_metrics` schema of an evaluation reply: sample sizes, the client's sampling
    cost, its evaluation time, the quality of every feature network the server knows
    (`networks`: {name: (Fréchet distance, KID, d)}): FD >= 0, KID finite (its unbiased
    estimate dips below 0), KID's standard deviation >= 0, exactly when `manifold` its
    precision, recall and coverage in [0, 1] and density in [0, max_real] (metrics/manifold.py:
    at most N/k), and the conditioning metrics `shares` (metrics/conditioning.py), each in [0, 1]."""
    schema = {
        "partition-id": (int, 0, None),
        "num-generated": (int, num_generated, num_generated),
        "num-real": (int, 2, max_real),
        "client-sampling-steps": (int, 0, max_steps),
        "sample-seconds": (float, 0.0, None),
        "nfe-sample": (float, 0.0, None),
        "flops-sample": (float, 0.0, None),
        "eval-seconds": (float, 0.0, None),
    }
    for name, (fd_name, kid_name, _) in networks.items():
        schema.update({fd_name: (float, 0.0, None), kid_name: (float, -math.inf, None),
                       f"{kid_name}_std": (float, 0.0, None)})
        if manifold:
            precision, recall, density, coverage = manifold_names(name)
            schema.update({precision: (float, 0.0, 1.0), recall: (float, 0.0, 1.0), coverage: (float, 0.0, 1.0),
                           density: (float, 0.0, float(max_real))})
    schema.update({name: (float, 0.0, 1.0) for name in shares})
    return schema


def pack_declined(partition_id: int, reason: str, detail: str) -> RecordDict:
    """A client's evaluation reply that releases nothing: why (one of `DECLINE_REASONS`) and its
    explanation, cut to `MAX_DETAIL_CHARS`."""
    return RecordDict({DECLINED: ConfigRecord({"partition-id": partition_id, "reason": reason,
                                               "detail": detail[:MAX_DETAIL_CHARS]})})


def unpack_declined(content: RecordDict) -> tuple[int, str, str] | None:
    """(partition id, reason, detail) of a declining evaluation reply (`pack_declined`), None
    for any reply without a "declined" record. Rejects a "declined" record beside any other,
    with keys other than exactly those three, a partition id that is no int, a reason outside
    `DECLINE_REASONS`, a detail that is no printable string of at most `MAX_DETAIL_CHARS`."""
    if DECLINED not in content.keys():
        return None
    record = content.config_records.get(DECLINED)
    if len(content.keys()) != 1 or record is None or set(record.keys()) != {"partition-id", "reason", "detail"}:
        raise UploadRejected(f"a declining reply holds exactly a {DECLINED} record of partition-id, reason, detail")
    pid, reason, detail = record["partition-id"], record["reason"], record["detail"]
    if type(pid) is not int or reason not in DECLINE_REASONS or not isinstance(detail, str) or \
            len(detail) > MAX_DETAIL_CHARS or not detail.isprintable():
        raise UploadRejected(f"declined record: partition-id, reason in {DECLINE_REASONS} or detail malformed")
    return pid, reason, detail


def unpack_evaluation(
    content: RecordDict, networks: Mapping[str, tuple[str, str, int]], num_generated: int, max_real: int,
    max_steps: int, pooled: bool, shares: tuple[str, ...] = (),
) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Validate an evaluation reply; return (its metrics, its feature moments: `unpack_moments`,
    {} unless `pooled`).

    networks: {name: (Fréchet distance name, KID name, feature size d)} of every feature network
    the server knows; the reply must report exactly these (with precision, recall, density and
    coverage when both sets hold `MIN_MANIFOLD_IMAGES`), and the conditioning metrics `shares`.
    Rejects: records other than "metrics" and, exactly when `pooled`, "moments"; metrics failing
    `check_metrics` against `_evaluation_schema` (every key required, nothing else: num-generated
    equal to `num_generated`, num-real in [2, max_real], client-sampling-steps in [0, max_steps],
    seconds, NFEs and FLOPs >= 0), an nfe-sample other than num-generated x client-sampling-steps,
    and moments failing `unpack_moments`: those of every network with fewer features d than
    both num-real and num-generated are required, those of the others allowed (a client
    releases moments of n <= d images only when its own min-release-images says so,
    clients/release.py), each network's complete or absent.
    """
    wanted = {METRICS, MOMENTS} if pooled else {METRICS}
    if set(content.keys()) != wanted or METRICS not in content.metric_records or \
            (pooled and MOMENTS not in content.array_records):
        raise UploadRejected(f"records {sorted(content.keys())}; expected {sorted(wanted)}")
    claimed = content.metric_records[METRICS].get("num-real")  # its range is checked with the schema
    manifold = type(claimed) is int and claimed <= max_real and min(claimed, num_generated) >= MIN_MANIFOLD_IMAGES
    schema = _evaluation_schema(networks, num_generated, max_real, max_steps, shares, manifold)
    metrics = check_metrics(content.metric_records[METRICS], schema)
    if metrics["nfe-sample"] != metrics["num-generated"] * metrics["client-sampling-steps"]:
        raise UploadRejected(
            f"nfe-sample={metrics['nfe-sample']!r}: must be num-generated x client-sampling-steps = "
            f"{metrics['num-generated'] * metrics['client-sampling-steps']}"
        )
    if not pooled:
        return metrics, {}
    arrays = content.array_records[MOMENTS]
    sent = {key.rsplit("-", 2)[0] for key in arrays.keys()}  # "<network>-<kind>-<mean|covariance>"
    fewest = min(metrics["num-real"], metrics["num-generated"])
    return metrics, unpack_moments(arrays, {name: d for name, (_, _, d) in networks.items()
                                            if d < fewest or name in sent})


def pack_weights(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """A model's weights as an ArrayRecord, {"net.<name>" | "ema.<name>": array} (float32)."""
    return ArrayRecord({k: Array(v.detach().float().contiguous().cpu().numpy()) for k, v in state.items()})


def weights_state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """The tensors of an ArrayRecord of weights (`pack_weights` reversed)."""
    return {k: torch.from_numpy(v.numpy().copy()) for k, v in arrays.items()}


def check_weights(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """The weights as a new ArrayRecord of their decoded values, if their keys are
    `reference`'s and every array decodes to the reference's dtype and shape, finite, with
    |w| <= MAX_ABS_WEIGHT; raises `UploadRejected` otherwise."""
    if set(arrays.keys()) != set(reference.keys()):
        missing, extra = set(reference.keys()) - set(arrays.keys()), set(arrays.keys()) - set(reference.keys())
        raise UploadRejected(f"weights: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    clean = {}
    for key, expected in reference.items():
        shape = tuple(expected.shape)
        values = decode(arrays[key], expected.dtype, math.prod(shape), key)
        if values.shape != shape:
            raise UploadRejected(f"{key}: decoded shape {values.shape}, expected {shape}")
        if values.size and float(np.abs(values).max()) > MAX_ABS_WEIGHT:
            raise UploadRejected(f"{key}: |w| exceeds {MAX_ABS_WEIGHT:g}")
        clean[key] = Array(values)
    return ArrayRecord(clean)


def unpack_weights(
    content: RecordDict, reference: ArrayRecord, cap: int, images_per_round: int
) -> tuple[ArrayRecord, dict]:
    """Validate a FedAvg training reply against the weights the server sent (`reference`);
    return (its weights' decoded values as a new ArrayRecord, its metrics).

    Rejects: records other than "arrays" and "metrics", weights failing `check_weights`,
    metrics failing `check_metrics(TRAIN_METRICS)` (images-seen at most `images_per_round`),
    and a "num-examples" (the averaging weight) that is not a count in [1, cap]: the server
    cannot see a client's data, so one client's share of the average is bounded by
    cap / (cap + the other clients' counts), never verified.
    """
    if set(content.keys()) != {WEIGHTS, METRICS} or WEIGHTS not in content.array_records \
            or METRICS not in content.metric_records:
        raise UploadRejected(f"records {sorted(content.keys())}; expected ['{WEIGHTS}', '{METRICS}']")
    metrics = check_metrics(content.metric_records[METRICS], _train_schema(images_per_round))
    if not 1 <= metrics["num-examples"] <= cap:
        raise UploadRejected(f"num-examples={metrics['num-examples']} is not a count in [1, {cap}]")
    return check_weights(content.array_records[WEIGHTS], reference), metrics


def unpack_feature_network(arrays: ArrayRecord, channels: int) -> dict[str, torch.Tensor]:
    """The evaluation feature network an evaluate message carries, as a state dict, if it is
    exactly the weights of a `FeatureClassifier` on `channels`-channel images with K <=
    MAX_FEATURE_TARGETS outputs and F <= MAX_FEATURES features (read from head.weight (K, F)):
    every key, decoded float32 of its shape, finite, |w| <= MAX_ABS_WEIGHT (`check_weights`);
    raises `UploadRejected` otherwise. No path is read: the client never opens a file the server names."""
    from collafuse_flwr.metrics.classifier import FeatureClassifier

    if "head.weight" not in arrays:
        raise UploadRejected(f"{FEATURE_NETWORK}: no head.weight; keys {sorted(arrays.keys())[:5]}")
    head = decode(arrays["head.weight"], "float32", MAX_FEATURE_TARGETS * MAX_FEATURES, "head.weight")
    if head.ndim != 2 or not (1 <= head.shape[0] <= MAX_FEATURE_TARGETS and 1 <= head.shape[1] <= MAX_FEATURES):
        raise UploadRejected(f"{FEATURE_NETWORK}: head.weight of shape {head.shape}, expected (K, F) with "
                             f"K <= {MAX_FEATURE_TARGETS}, F <= {MAX_FEATURES}")
    reference = FeatureClassifier(channels, head.shape[0], head.shape[1])
    return weights_state(check_weights(arrays, pack_weights(reference.state_dict())))


def content_bytes(content: RecordDict) -> int:
    """Size in bytes of a message's content as Flower serialises it (protobuf)."""
    return int(recorddict_to_proto(content).ByteSize())
