"""What a client releases when it evaluates, and on which networks: its own decision, made
from its node config (else the environment, for simulated SuperNodes that have none), never
from the run config or the message.

An evaluation reply is computed on the client's held-out images and on the images its private
denoiser generates: distances, conditioning metrics and (pooled-metrics) the mean and covariance
of both sets' features per feature network. The client releases them only

- on networks it trusts. The fd_classifier network travels in the evaluate message (the server
  trains it): it is used only if its SHA-256 (`features.weights_digest`) is listed in node config
  "trusted-evaluators" (comma-separated 64-hex digests; $COLLAFUSE_TRUSTED_EVALUATORS), or if
  node config "trust-run-evaluator" is true ($COLLAFUSE_TRUST_RUN_EVALUATOR=1): a simulation's
  opt-in to whatever evaluator its server trains, where one user is every party (collafuse-run,
  collafuse-sweep and the in-process runner set it for their simulated clients unless the user
  did). Otherwise the client refuses the message before any work. A crafted network (say, a
  head that reads off labels) is thus never run on the client's images. Pretrained networks
  (InceptionV3 for FID, CLIP for FCD, CLIP's text tower for condition "text") are the client's
  own files: node config "fid-weights", "fcd-weights", "text-weights", else
  $COLLAFUSE_FID_WEIGHTS, $COLLAFUSE_FCD_WEIGHTS, $COLLAFUSE_TEXT_WEIGHTS, else the standard
  caches (weights.py). The evaluate message names the SHA-256 of each file the server uses
  ("fid-weights-sha256", ...); the client computes those metrics only on its own file of that
  digest and refuses, naming its node-config key, when it has none. It never opens a path the
  run config names: it reads the run config with these keys replaced by its own (`own_context`).
- of enough images. Node config "min-release-images" ($COLLAFUSE_MIN_RELEASE_IMAGES): the
  smallest set, held-out and generated alike, of which the client releases any statistic; it
  refuses to evaluate on fewer, whatever held-out-fraction or eval-num-samples the server set.
  Unset: MIN_SCALAR_IMAGES for every figure, and a network's moments only of more images than
  it has features (n >= d + 1 in both sets; with n <= d the mean and the covariance can pin down
  every feature vector, and the server, which knows its network, the images), omitted otherwise.
  A value N applies to both: the client releases moments of N or more images on any network,
  at its own risk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, RecordDict

from collafuse_flwr import wire
from collafuse_flwr.clients.round import ClientRound
from collafuse_flwr.clients.state import NODE_CONFIG_KEYS, ClientStateError, node_flag, node_setting, node_value
from collafuse_flwr.config import ConfigError, RunConfig
from collafuse_flwr.diffusion.text import text_weights_file
from collafuse_flwr.metrics.classifier import FeatureClassifier, classifier_from_state
from collafuse_flwr.metrics.features import weights_digest
from collafuse_flwr.weights import BACKBONES, Weights, file_digest, resolve_weights

# node config keys, and the environment variables of simulated SuperNodes (state.NODE_CONFIG_KEYS)
TRUSTED_EVALUATORS_KEY = "trusted-evaluators"
TRUSTED_EVALUATORS_VARIABLE = NODE_CONFIG_KEYS[TRUSTED_EVALUATORS_KEY]
TRUST_RUN_EVALUATOR_KEY = "trust-run-evaluator"
TRUST_RUN_EVALUATOR_VARIABLE = NODE_CONFIG_KEYS[TRUST_RUN_EVALUATOR_KEY]
MIN_RELEASE_IMAGES_KEY = "min-release-images"
MIN_RELEASE_IMAGES_VARIABLE = NODE_CONFIG_KEYS[MIN_RELEASE_IMAGES_KEY]
# Fewest images of which a client releases a figure by default (moments: more than features).
MIN_SCALAR_IMAGES = 32
# The client's own weights files: node config key -> environment variable (both sides' key names)
WEIGHTS_KEYS = {key: NODE_CONFIG_KEYS[key] for key in ("fid-weights", "fcd-weights", "text-weights")}
NETWORK_OF_KEY = {"fid-weights": "inception", "fcd-weights": "clip"}
DIGEST_SUFFIX = "-sha256"  # evaluate message config: "<weights key>-sha256" = the server's file's SHA-256
SHA256 = re.compile(r"[0-9a-f]{64}")


def own_context(context: Context) -> Context:
    """`context` with the run config's weights keys (fid-weights, fcd-weights, text-weights)
    replaced by this client's node config values ("" when unset: then its environment and
    caches, weights.py): the run config as this client reads it, so no path the server
    names is ever opened on the client."""
    own = {key: node_value(context.node_config, key).strip() for key in WEIGHTS_KEYS}
    return Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                   state=context.state, run_config={**context.run_config, **own})


def trusted_evaluators(node_config) -> frozenset[str]:
    """The SHA-256 digests of the fd_classifier networks this client accepts; a value that is
    not comma-separated 64-hex digests is a `ClientStateError` naming it."""
    name, value = node_setting(node_config, TRUSTED_EVALUATORS_KEY)
    digests = [part.strip().lower() for part in value.split(",") if part.strip()]
    if not all(SHA256.fullmatch(d) for d in digests):
        raise ClientStateError(f"{name}={value!r}: use comma-separated SHA-256 digests (64 hex digits each)")
    return frozenset(digests)


def min_release_images(node_config) -> int | None:
    """This client's explicit minimum of images per released statistic (an int >= 2), or None
    for the defaults (module docstring); a malformed value is a `ClientStateError`."""
    name, value = node_setting(node_config, MIN_RELEASE_IMAGES_KEY)
    if not value:
        return None
    if not (value.isascii() and value.isdigit()) or int(value) < 2:
        raise ClientStateError(f"{name}={value!r}: use a whole number of images, at least 2")
    return int(value)


class ReleaseDeclined(ClientStateError):
    """The client declines an evaluate message before computing anything: `reason` is one of
    `wire.DECLINE_REASONS`, the message its explanation. The ClientApp answers with a declining
    reply (`wire.pack_declined`) that the server records, not a fault: the client answered."""

    def __init__(self, partition_id: int, reason: str, detail: str):
        super().__init__(detail)
        self.partition_id, self.reason = partition_id, reason

    def reply(self) -> RecordDict:
        return wire.pack_declined(self.partition_id, self.reason, str(self))


@dataclass(frozen=True)
class Release:
    """What this client releases in one evaluation reply, settled before any work: the
    fd_classifier network it accepted (and its SHA-256), its own pretrained weights for the
    networks the server named (`Weights` without a path for the others) and its explicit
    minimum of images (None: the defaults), for its partition `partition_id`."""

    classifier: FeatureClassifier
    classifier_digest: str
    weights: dict[str, Weights]
    min_images: int | None
    partition_id: int

    def check_counts(self, num_real: int, num_generated: int) -> None:
        """Decline (`ReleaseDeclined`, "too-few-images") to release anything about `num_real`
        held-out and `num_generated` generated images when either set is below the minimum."""
        minimum = self.min_images or MIN_SCALAR_IMAGES
        if min(num_real, num_generated) < minimum:
            raise ReleaseDeclined(
                self.partition_id, "too-few-images",
                f"evaluation on {num_real} held-out and {num_generated} generated images: this client releases "
                f"statistics only of sets of at least {minimum} images (node config {MIN_RELEASE_IMAGES_KEY}, "
                f"${MIN_RELEASE_IMAGES_VARIABLE}); nothing was computed")

    def releases_moments(self, num_features: int, num_real: int, num_generated: int) -> bool:
        """Whether the mean and covariance of d = `num_features` features of both sets are
        released: by default only when both sets have more images than d; with an explicit
        minimum always (`check_counts` passed)."""
        return self.min_images is not None or min(num_real, num_generated) > num_features


def evaluation_release(node_config, client: ClientRound, content: RecordDict) -> Release:
    """This client's `Release` for the evaluate message `content`, or, before any work, a
    `ReleaseDeclined` (or `ClientStateError` for a setting it cannot read, `wire.UploadRejected`
    for a malformed message): the fd_classifier network
    it carries must be trusted, each pretrained file the message config names by SHA-256 must be
    one of this client's own (and, for condition "text", its text tower the server's), and its
    held-out images and the eval-num-samples images it would generate must reach its minimum."""
    minimum = min_release_images(node_config)
    trusted = trusted_evaluators(node_config)
    trust_run = node_flag(node_config, TRUST_RUN_EVALUATOR_KEY)
    record = content.array_records.get(wire.FEATURE_NETWORK)
    if record is None:
        raise wire.UploadRejected(f"evaluate message without a {wire.FEATURE_NETWORK} record")
    state = wire.unpack_feature_network(record, client.image_shape[0])
    digest = weights_digest(state)
    if digest not in trusted and not trust_run:
        raise ReleaseDeclined(
            client.partition_id, "untrusted-evaluator",
            f"the evaluate message's fd_classifier network (SHA-256 {digest}) is not one this client trusts; "
            f"list its digest in node config {TRUSTED_EVALUATORS_KEY} (${TRUSTED_EVALUATORS_VARIABLE}), or, in a "
            f"simulation where one user runs every party, set node config {TRUST_RUN_EVALUATOR_KEY}=true "
            f"(${TRUST_RUN_EVALUATOR_VARIABLE}=1); nothing was computed")
    weights = {network: Weights(BACKBONES[network], None, "not used by the server")
               for network in NETWORK_OF_KEY.values()}
    for key, wanted in _named_digests(client).items():
        own = _own_file(client.config, key)
        if own is None or file_digest(own) != wanted:
            raise ReleaseDeclined(
                client.partition_id, "missing-weights",
                f"the server evaluates with the {key} file of SHA-256 {wanted}; this client has no such file (its node "
                f"config {key}, else ${WEIGHTS_KEYS[key]}, else the standard cache): give it a copy of that file "
                "there; nothing was computed")
        if key in NETWORK_OF_KEY:
            weights[NETWORK_OF_KEY[key]] = Weights(BACKBONES[NETWORK_OF_KEY[key]], own, f"node config {key}")
    released = Release(classifier_from_state(state), digest, weights, minimum, client.partition_id)
    released.check_counts(len(client.data.held_out), client.config.eval_num_samples)
    return released


def _named_digests(client: ClientRound) -> dict[str, str]:
    """{weights key: SHA-256} the evaluate message's config names: the server's pretrained files,
    exactly the text tower's under condition "text", each 64 hex digits (`wire.UploadRejected`
    otherwise, or for any other "-sha256" key)."""
    allowed = {*NETWORK_OF_KEY, *(("text-weights",) if client.config.condition == "text" else ())}
    named = {}
    for name, value in client.message_config.items():
        if not name.endswith(DIGEST_SUFFIX):
            continue
        key = name.removesuffix(DIGEST_SUFFIX)
        if key not in allowed or not isinstance(value, str) or not SHA256.fullmatch(value):
            raise wire.UploadRejected(f"message config {name}={value!r}: expected {sorted(allowed)} with a SHA-256")
        named[key] = value
    if client.config.condition == "text" and "text-weights" not in named:
        raise wire.UploadRejected("condition='text': the evaluate message names no text-weights-sha256")
    return named


def _own_file(config: RunConfig, key: str) -> Path | None:
    """This client's own file for weights `key` (weights.py, text.py: its node config, which
    `own_context` put in its `config`, else its environment, else the standard cache), or None
    when it has none there."""
    try:
        if key in NETWORK_OF_KEY:
            configured = config.fid_weights if key == "fid-weights" else config.fcd_weights
            return resolve_weights(NETWORK_OF_KEY[key], configured, f"node config {key}").path
        return text_weights_file(config.text_weights, config.fcd_weights, f"node config {key}")[0]
    except ConfigError:
        return None
