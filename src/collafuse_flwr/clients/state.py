"""A client's private state: where it lives, the secret its upload noise comes from, and its
denoiser between rounds. The client decides where; no message names a path.

    <root>/                           node config "state-dir" (a deployed SuperNode:
                                      --node-config "state-dir='/srv/collafuse'"), else
                                      $COLLAFUSE_CLIENT_STATE, else
                                      $XDG_DATA_HOME/collafuse-flwr/clients (~/.local/share/...)
        partition-3/                  one data holder (in simulation, one per partition)
        own/                          the data holder of a deployed SuperNode (client-data =
                                      own), whatever partition id the server assigns it
            secret                    32 random bytes from os.urandom, created on first use
                                      (mode 0600), never sent
            privacy-ledger.json       every distinct view of its images it has uploaded, in
                                      any run: {noise key: noise multiplier} (privacy.py)
            runs/<run-key>/round-004/ the private denoiser after round 4 (this round's and the
                                      previous round's are kept)
            runs/<run-key>/samples/   the client's generated images

A deployed client (client-data = own) also names its images in its node config: "data-dir"
(every image there is the client's, in the dataset's folder layout) and, when it conditions on
its attribute group, "attribute-group" (its index in attribute-groups). The server's data-dir
is never a client's.

Whether the client sends its images' conditions (labels, attributes) to a server that asks for
them (server-condition = "full") is the client's decision too: node config "share-conditions"
(true / false), else $COLLAFUSE_SHARE_CONDITIONS (1 / 0, for simulated clients), else no. The run
config, which the server sets, cannot grant it.

How much a client lets its uploads disclose is its decision as well: node config
"privacy-budget" ("<epsilon>, <delta>", e.g. "10, 1e-5"), else $COLLAFUSE_PRIVACY_BUDGET, else no
limit. Before every upload the client composes the views in its ledger with the new one (a view
it sent before costs nothing) and refuses the upload when the result exceeds its budget, whatever
the run config (cut point, clipping, noise policy, privacy-delta) the server chose.

The server's messages carry a run key (32 hex digits, made by the ServerApp when it creates a
run): the client checks its form and uses it only as a directory name below its own root, so a
resumed run finds its denoisers and a new run starts fresh ones. The secret does not depend on
the run key: a server cannot buy a client a new secret (and new views of its images) by sending
a new key; what it would take is another configuration, which `upload_seed` keys anyway.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
from pathlib import Path

from collafuse_flwr import privacy
from collafuse_flwr.config import RunConfig
from collafuse_flwr.seeds import stream_seed
from collafuse_flwr.wire import RUN_KEY

STATE_DIR_KEY = "state-dir"  # node config key
STATE_DIR_VARIABLE = "COLLAFUSE_CLIENT_STATE"
SHARE_CONDITIONS_KEY = "share-conditions"  # node config key
DATA_DIR_KEY = "data-dir"  # node config key (client-data = own)
ATTRIBUTE_GROUP_KEY = "attribute-group"  # node config key (client-data = own, condition-attributes = group)
OWN_DATA_HOLDER = "own"  # the state directory of a deployed client, below its root
SHARE_CONDITIONS_VARIABLE = "COLLAFUSE_SHARE_CONDITIONS"
PRIVACY_BUDGET_KEY = "privacy-budget"  # node config key
PRIVACY_BUDGET_VARIABLE = "COLLAFUSE_PRIVACY_BUDGET"
LEDGER = "privacy-ledger.json"
YES, NO = ("true", "1", "yes"), ("false", "0", "no", "")
SECRET_BYTES = 32


class ClientStateError(RuntimeError):
    """The client's state directory or secret cannot be used."""


def state_root(node_config) -> Path:
    """The client's state root, chosen on the client's side only (see the module docstring)."""
    configured = node_config.get(STATE_DIR_KEY) or os.environ.get(STATE_DIR_VARIABLE)
    if configured:
        return Path(str(configured)).expanduser().resolve()
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home).expanduser().resolve() / "collafuse-flwr" / "clients"


def holder_directory(config: RunConfig, node_config, partition_id: int) -> Path:
    """This data holder's state directory: `<root>/partition-<k>` for the partition the server
    assigned (simulation), `<root>/own` for a client with its own data."""
    name = OWN_DATA_HOLDER if config.client_data == "own" else f"partition-{partition_id}"
    return state_root(node_config) / name


def own_data_config(config: RunConfig, node_config) -> RunConfig:
    """The run config as a client with its own data (client-data = own) reads it: data-dir from
    its node config (every image of the folder, never downloaded), the rest as the server sent
    it; a `ClientStateError` when the node config names no data-dir."""
    data_dir = str(node_config.get(DATA_DIR_KEY, "")).strip()
    if not data_dir:
        raise ClientStateError(
            "client-data='own': this client's node config names no data-dir; start its SuperNode with "
            "--node-config \"data-dir='/path/to/its/images'\""
        )
    own = dataclasses.replace(config, data_dir=data_dir, dataset_split="all", download=False)
    own.validate()
    return own


def own_attribute_group(config: RunConfig, node_config) -> int | None:
    """The index of a client's attribute group under condition-attributes "group" (node config
    attribute-group, in [0, num-clients)); None otherwise."""
    if config.condition_attributes != "group":
        return None
    value = str(node_config.get(ATTRIBUTE_GROUP_KEY, "")).strip()
    if not value.isdigit() or not int(value) < config.num_clients:
        raise ClientStateError(
            f"condition-attributes='group': node config {ATTRIBUTE_GROUP_KEY}={value!r} must name this client's "
            f"group of attribute-groups by its index in [0, {config.num_clients})"
        )
    return int(value)


def shares_conditions(node_config) -> bool:
    """Whether this client allows its images' conditions to leave it (see the module
    docstring); a value that is neither yes nor no is a `ClientStateError`."""
    if SHARE_CONDITIONS_KEY in node_config:
        name, value = f"node config {SHARE_CONDITIONS_KEY}", node_config[SHARE_CONDITIONS_KEY]
    else:
        name, value = f"${SHARE_CONDITIONS_VARIABLE}", os.environ.get(SHARE_CONDITIONS_VARIABLE, "")
    answer = str(value).strip().lower()
    if answer not in YES + NO:
        raise ClientStateError(f"{name}={value!r}: use true or false (1 or 0)")
    return answer in YES


def privacy_budget(node_config) -> tuple[float, float] | None:
    """The client's (epsilon, delta) limit on what its uploads disclose, over every run (see
    the module docstring), or None; a malformed value is a `ClientStateError`."""
    if PRIVACY_BUDGET_KEY in node_config:
        name, value = f"node config {PRIVACY_BUDGET_KEY}", node_config[PRIVACY_BUDGET_KEY]
    else:
        name, value = f"${PRIVACY_BUDGET_VARIABLE}", os.environ.get(PRIVACY_BUDGET_VARIABLE, "")
    if not str(value).strip():
        return None
    try:
        epsilon, delta = (float(part) for part in str(value).split(","))
    except ValueError:
        epsilon = delta = math.nan
    if not (0 < epsilon < math.inf and 0 < delta < 1):
        raise ClientStateError(f"{name}={value!r}: use '<epsilon>, <delta>' with epsilon > 0 and delta in (0, 1), "
                               "e.g. '10, 1e-5'")
    return epsilon, delta


class ClientState:
    """One data holder's directory: its secret and its runs.

    Args:
        directory: `<root>/partition-<k>` (created with mode 0700 if absent).
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as err:
            raise ClientStateError(f"client state directory {self.directory}: {err.strerror}") from None
        self.secret = _secret(self.directory / "secret")

    def run_dir(self, run_key: str) -> Path:
        """Where this holder keeps its state of the run `run_key` (checked: 32 hex digits)."""
        if not isinstance(run_key, str) or not RUN_KEY.fullmatch(run_key):
            raise ClientStateError(f"run-key {run_key!r} is not 32 hex digits")
        return self.directory / "runs" / run_key

    def seed(self, stream: str, *coordinates: int | str) -> int:
        """A seed of a secret stream (seeds.py): only this client can compute it."""
        return stream_seed(self.secret, stream, *coordinates)

    def spend(self, view: str, multiplier: float, budget: tuple[float, float] | None) -> None:
        """Record that every image of this holder is uploaded once more with the noise of key
        `view` (its noise stream; a key recorded before is the same view again and costs
        nothing) and noise multiplier `multiplier`. With a `budget` (epsilon, delta), refuse
        (`ClientStateError`, nothing recorded) when all recorded views with this one compose
        to more than epsilon at delta."""
        path = self.directory / LEDGER
        with open(self.directory / f"{LEDGER}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            ledger = json.loads(path.read_text()) if path.exists() else {}
            if view in ledger:
                return
            if budget is not None:
                spent = privacy.epsilon(privacy.composed_multiplier([*ledger.values(), multiplier]), 1, budget[1])
                if spent > budget[0]:
                    raise ClientStateError(
                        f"this upload would bring what this client's uploads disclose to epsilon {spent:.3g} at delta "
                        f"{budget[1]:g} ({len(ledger) + 1} views of its images), beyond its privacy-budget of "
                        f"epsilon {budget[0]:g}; not uploaded")
            tmp = path.with_name(f".{LEDGER}.{os.getpid()}")
            tmp.write_text(json.dumps({**ledger, view: multiplier}, indent=1))
            os.replace(tmp, path)


def _secret(path: Path) -> bytes:
    """The 32-byte secret at `path`, created from os.urandom on first use. Created in a
    temporary file and linked into place, so concurrent first uses agree on one secret."""
    if not path.exists():
        tmp = path.with_name(f".secret.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, os.urandom(SECRET_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    secret = path.read_bytes()
    if len(secret) != SECRET_BYTES:
        raise ClientStateError(f"{path}: {len(secret)} bytes, a client secret has {SECRET_BYTES}; "
                               "remove it to start a new client identity")
    return secret
