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
            privacy-ledger.json       every distinct view of each of its images it has
                                      uploaded, in any run (ledger.py), created with the secret
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
limit. Before every upload the client composes, image by image, the views in its ledger with the
new one (a view an image had before costs nothing) and refuses the upload when the result exceeds
its budget for any image, whatever the run config (cut point, clipping, noise policy,
privacy-delta) the server chose. A missing ledger beside an existing secret, or a damaged one,
refuses every upload until the client restores it or says "reset-privacy-ledger" (node config,
else $COLLAFUSE_RESET_PRIVACY_LEDGER); the reset is logged.

The client trusts no state directory it does not own alone: the root and the holder's directory
must belong to its user and be writable by no one else, the secret and the ledger be readable by
no one else, and none of its files is opened through a symlink (lock, secret, ledger) or created
over an existing file (O_NOFOLLOW, O_EXCL). An empty node-config value never hides the
environment variable of the same setting.

Every node-config key a client reads is listed in `NODE_CONFIG_KEYS`, with the environment
variable that stands in for it where a SuperNode has no node config of its own. The readers
`node_value`, `node_setting` and `node_flag` refuse any other key; docs/configuration.md lists
them all, and tests/test_docs.py checks that it does and that every other read of a node config
in src/ names a listed key.

The server's messages carry a run key (32 hex digits, made by the ServerApp when it creates a
run): the client checks its form and uses it only as a directory name below its own root, so a
resumed run finds its denoisers and a new run starts fresh ones. The secret does not depend on
the run key: a server cannot buy a client a new secret (and new views of its images) by sending
a new key; nor does any other part of the run config that leaves the uploads unchanged
(`ClientRound.upload_view`).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import hmac
import json
import math
import os
import stat
import time
from logging import WARNING
from pathlib import Path

import torch
from flwr.common.constant import NUM_PARTITIONS_KEY
from flwr.common.logger import log

from collafuse_flwr.clients.ledger import DamagedLedger, Ledger
from collafuse_flwr.config import RunConfig
from collafuse_flwr.diffusion.text import TEXT_WEIGHTS_VARIABLE
from collafuse_flwr.seeds import stream_seed
from collafuse_flwr.weights import BACKBONES
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
RESET_LEDGER_KEY = "reset-privacy-ledger"  # node config key
RESET_LEDGER_VARIABLE = "COLLAFUSE_RESET_PRIVACY_LEDGER"
# Every node-config key a client reads -> the environment variable that stands in for it where the
# SuperNode has no node config of its own (simulated SuperNodes), None where nothing does. The
# readers below refuse any other key, so no key is read without being listed here.
NODE_CONFIG_KEYS: dict[str, str | None] = {
    STATE_DIR_KEY: STATE_DIR_VARIABLE,
    DATA_DIR_KEY: None,
    ATTRIBUTE_GROUP_KEY: None,
    SHARE_CONDITIONS_KEY: SHARE_CONDITIONS_VARIABLE,
    PRIVACY_BUDGET_KEY: PRIVACY_BUDGET_VARIABLE,
    RESET_LEDGER_KEY: RESET_LEDGER_VARIABLE,
    # what the client releases when it evaluates (release.py)
    "trusted-evaluators": "COLLAFUSE_TRUSTED_EVALUATORS",
    "trust-run-evaluator": "COLLAFUSE_TRUST_RUN_EVALUATOR",
    "min-release-images": "COLLAFUSE_MIN_RELEASE_IMAGES",
    # the client's own pretrained weights files (release.py, weights.py, diffusion/text.py)
    "fid-weights": BACKBONES["inception"].env_var,
    "fcd-weights": BACKBONES["clip"].env_var,
    "text-weights": TEXT_WEIGHTS_VARIABLE,
    # Flower's: the size of a simulation's federation, in every simulated SuperNode's node config
    NUM_PARTITIONS_KEY: None,
}
LEDGER = "privacy-ledger.json"
YES, NO = ("true", "1", "yes"), ("false", "0", "no", "")
SECRET_BYTES = 32


class ClientStateError(RuntimeError):
    """The client's state directory or secret cannot be used."""


def state_root(node_config) -> Path:
    """The client's state root, chosen on the client's side only (see the module docstring)."""
    configured = node_value(node_config, STATE_DIR_KEY) or os.environ.get(STATE_DIR_VARIABLE)
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
    data_dir = node_value(node_config, DATA_DIR_KEY).strip()
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
    value = node_value(node_config, ATTRIBUTE_GROUP_KEY).strip()
    if not value.isdigit() or not int(value) < config.num_clients:
        raise ClientStateError(
            f"condition-attributes='group': node config {ATTRIBUTE_GROUP_KEY}={value!r} must name this client's "
            f"group of attribute-groups by its index in [0, {config.num_clients})"
        )
    return int(value)


def node_value(node_config, key: str) -> str:
    """The value of node-config `key` as a string ("" when unset), unstripped; a `LookupError`
    for a key not in `NODE_CONFIG_KEYS` (every key the client reads is listed there)."""
    if key not in NODE_CONFIG_KEYS:
        raise LookupError(f"node config key {key!r} is not in clients/state.py NODE_CONFIG_KEYS")
    value = node_config.get(key)
    return "" if value is None else str(value)


def simulation_size(node_config) -> int | None:
    """The number of SuperNodes of the simulation this SuperNode belongs to (the integer
    `num-partitions` Flower puts into a simulated SuperNode's node config), None where there is
    none (a deployment)."""
    size = node_config.get(NUM_PARTITIONS_KEY)
    return size if isinstance(size, int) else None


def node_setting(node_config, key: str) -> tuple[str, str]:
    """A client's own setting and where it came from: its node config `key` when that holds a
    value, else the environment variable `NODE_CONFIG_KEYS` names for it (simulated SuperNodes
    have no node config of their own), else "". An empty node-config value hides nothing: the
    variable still applies. Returns (its name for messages, its value stripped)."""
    value = node_value(node_config, key).strip()
    variable = NODE_CONFIG_KEYS[key]
    if value or variable is None:
        return f"node config {key}", value
    return f"${variable}", os.environ.get(variable, "").strip()


def node_flag(node_config, key: str) -> bool:
    """A yes/no setting of the client's (`node_setting`; unset: no); a value that is neither
    is a `ClientStateError` naming it."""
    name, value = node_setting(node_config, key)
    if value.lower() not in YES + NO:
        raise ClientStateError(f"{name}={value!r}: use true or false (1 or 0)")
    return value.lower() in YES


def shares_conditions(node_config) -> bool:
    """Whether this client allows its images' conditions to leave it (see the module docstring)."""
    return node_flag(node_config, SHARE_CONDITIONS_KEY)


def privacy_budget(node_config) -> tuple[float, float] | None:
    """The client's (epsilon, delta) limit on what its uploads disclose, over every run (see
    the module docstring), or None; a malformed value is a `ClientStateError`."""
    name, value = node_setting(node_config, PRIVACY_BUDGET_KEY)
    if not value:
        return None
    try:
        epsilon, delta = (float(part) for part in value.split(","))
    except ValueError:
        epsilon = delta = math.nan
    if not (0 < epsilon < math.inf and 0 < delta < 1):
        raise ClientStateError(f"{name}={value!r}: use '<epsilon>, <delta>' with epsilon > 0 and delta in (0, 1), "
                               "e.g. '10, 1e-5'")
    return epsilon, delta


class ClientState:
    """One data holder's directory: its secret, its privacy ledger and its runs.

    Args:
        directory: `<root>/partition-<k>`; it and the root are created with mode 0700 if absent
            and refused (`ClientStateError`) when another user owns them or others may write
            to them: whoever could would choose the client's secret or rewrite its ledger.
        reset_ledger: the client's own node config `reset-privacy-ledger`: start an empty
            ledger, with a warning in the log, in place of a missing or damaged one beside an
            existing secret (by default the client uploads nothing then).
    """

    def __init__(self, directory: Path, reset_ledger: bool = False):
        self.directory = Path(directory)
        self.reset_ledger = reset_ledger
        for path in (self.directory.parent, self.directory):
            _private_directory(path)
        if not os.path.lexists(self.directory / "secret"):
            _create_exclusively(self.directory / LEDGER, Ledger().dumps().encode())  # a new client: no view yet
        self.secret = _secret(self.directory / "secret")

    def run_dir(self, run_key: str) -> Path:
        """Where this holder keeps its state of the run `run_key` (checked: 32 hex digits)."""
        if not isinstance(run_key, str) or not RUN_KEY.fullmatch(run_key):
            raise ClientStateError(f"run-key {run_key!r} is not 32 hex digits")
        return self.directory / "runs" / run_key

    def seed(self, stream: str, *coordinates: int | str) -> int:
        """A seed of a secret stream (seeds.py): only this client can compute it."""
        return stream_seed(self.secret, stream, *coordinates)

    def image_keys(self, images: torch.Tensor) -> list[str]:
        """The key of each image of `images` (n, C, H, W): HMAC-SHA256 under the client's secret
        of its shape and decoded pixels (float32), 64 hex digits. It depends on the image alone,
        not on its place in the folder: the same image always has the same key, another image
        (almost surely) another one. Only this client can compute it."""
        pixels = images.detach().to(torch.float32).contiguous().cpu().numpy()
        prefix = json.dumps(["image", *pixels.shape[1:]]).encode()
        return [hmac.new(self.secret, prefix + image.tobytes(), hashlib.sha256).hexdigest() for image in pixels]

    def spend(self, images: list[str], shape: tuple[int, ...], view: str, multiplier: float,
              budget: tuple[float, float] | None) -> None:
        """Record in the ledger (ledger.py) that every image of `images` (image keys, of shape
        (C, H, W) `shape`) is uploaded with the noise of view `view` and noise multiplier
        `multiplier` (an image that had this view before costs nothing). With a `budget`
        (epsilon, delta), refuse (`ClientStateError`, nothing recorded) when any image's views
        with this one compose to more than epsilon at delta, or when the ledger holds uploads at
        another image shape (the same pictures at another size are other pixels to the ledger,
        which could then not count their views together). A missing ledger beside the secret or
        a damaged one refuses too, naming the file (`reset_ledger` to start afresh)."""
        path = self.directory / LEDGER
        with _locked(self.directory / f"{LEDGER}.lock"):
            ledger = self._ledger(path)
            if budget is not None:
                other = [s for s in ledger.shapes if s != list(shape)]
                if other:
                    raise ClientStateError(
                        f"this client's ledger {path} holds uploads of its images at shape {other[0]}; under its "
                        f"privacy-budget it uploads them at no other shape (asked for {list(shape)}), so that every "
                        "view of an image is counted together; not uploaded")
                spent, views = ledger.epsilon_with(images, view, multiplier, budget[1])
                if spent > budget[0]:
                    raise ClientStateError(
                        f"this upload would bring what this client's uploads disclose to epsilon {spent:.3g} at delta "
                        f"{budget[1]:g} ({views} views of an image), beyond its privacy-budget of "
                        f"epsilon {budget[0]:g}; not uploaded")
            if ledger.record(images, view, multiplier, shape):
                write_private(path, ledger.dumps().encode())

    def _ledger(self, path: Path) -> Ledger:
        """The ledger at `path`, checked (ledger.py). A missing or damaged one is a
        `ClientStateError` naming it, unless the client resets it (`reset_ledger`): then an
        empty ledger, logged, the damaged file kept beside it."""
        try:
            return Ledger.parse(_read_private(path).decode("utf-8", errors="replace"))
        except FileNotFoundError:
            problem = "is missing beside the client's secret"
        except DamagedLedger as err:
            problem = f"is damaged ({err})"
        if not self.reset_ledger:
            raise ClientStateError(
                f"privacy ledger {path} {problem}: this client uploads nothing, since its earlier views would go "
                f"uncounted; restore the file, or start an empty ledger with node config {RESET_LEDGER_KEY}=true "
                f"(${RESET_LEDGER_VARIABLE}=1)")
        if os.path.lexists(path):
            os.replace(path, path.with_name(f"{LEDGER}.damaged-{int(time.time())}"))
        log(WARNING, f"privacy ledger {path} {problem}; {RESET_LEDGER_KEY}: starting an empty ledger, every earlier "
                     "view of this client's images is forgotten")
        return Ledger()


def _private_directory(path: Path) -> None:
    """Create `path` (mode 0700) if absent; a `ClientStateError` when it is not a directory of
    this user that only this user may write to."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = os.stat(path)
    except OSError as err:
        raise ClientStateError(f"client state directory {path}: {err.strerror}") from None
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise ClientStateError(
            f"client state directory {path} is owned by uid {info.st_uid} with mode {stat.filemode(info.st_mode)}: "
            "another user could choose this client's secret or rewrite its privacy ledger; use a directory of "
            "this user that only it may write to (chmod go-w)")


def _locked(path: Path):
    """An exclusive lock on the lock file `path` (created 0600, never through a symlink)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    lock = os.fdopen(fd, "r+")
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def _read_private(path: Path) -> bytes:
    """The bytes of the client's file `path`, never through a symlink; a `ClientStateError`
    when another user owns it or others may read or write it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as err:
        if err.errno == errno.ENOENT:
            raise FileNotFoundError(path) from None
        raise ClientStateError(f"{path}: {err.strerror} (a client's state files are never symlinks)") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if info.st_uid != os.geteuid() or info.st_mode & 0o077:
            raise ClientStateError(
                f"{path} is owned by uid {info.st_uid} with mode {stat.filemode(info.st_mode)}: a client's secret and "
                "ledger must be this user's alone (chmod 600)")
        return file.read()


def _create_exclusively(path: Path, content: bytes) -> bool:
    """Write `content` to a new file `path` (mode 0600, fsync'd), never over an existing file
    or through a symlink; False when `path` exists already."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return False
    try:
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def write_private(path: Path, content: bytes) -> None:
    """Replace the client's file `path` by `content` atomically: a new temporary file of mode
    0600 beside it (`_create_exclusively`), renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    _create_exclusively(tmp, content)
    os.replace(tmp, path)


def _secret(path: Path) -> bytes:
    """The 32-byte secret at `path`, created from os.urandom on first use. Created in a
    temporary file and linked into place, so concurrent first uses agree on one secret; read
    without following a symlink, and only if it is this user's alone."""
    if not os.path.lexists(path):
        tmp = path.with_name(f".secret.{os.getpid()}.{os.urandom(4).hex()}")
        _create_exclusively(tmp, os.urandom(SECRET_BYTES))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    secret = _read_private(path)
    if len(secret) != SECRET_BYTES:
        raise ClientStateError(f"{path}: {len(secret)} bytes, a client secret has {SECRET_BYTES}; "
                               "remove it to start a new client identity")
    return secret
