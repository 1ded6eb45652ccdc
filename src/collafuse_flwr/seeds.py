"""Seeds of named, domain-separated random streams.

Every random draw of a run comes from a stream named after its use and located by integer or
string coordinates (a round, a partition, a sampler step, ...):

    seed = first 63 bits of HMAC-SHA256(key, JSON([stream, *coordinates]))

JSON encodes a list of strings and ints unambiguously, so ("upload", 2) and ("upload", 2, 0)
can never give the same seed (numpy's `SeedSequence` pads keys with zeros and does). Two kinds
of key:

- public: the run seed (`public_seed`); everyone who has the run config can recompute these
  streams: the server's sampling, the evaluation starts, the audit's own samples;
- secret: a client's secret (clients/state.py), 32 random bytes created on the client and
  never sent: its upload noise and its training minibatches. Nothing in the run config, in any
  message or in any server-side file determines these streams.
"""

from __future__ import annotations

import hashlib
import hmac
import json

STREAMS = frozenset({
    "upload",        # client, secret: eps of the cut-point uploads x_{t_zeta}
    "client-train",  # client, secret: minibatches, t, eps and condition dropout of the client's training
    "server-train",  # server, public: the server denoiser's training stream
    "sample",        # public: x_T of one client's evaluation samples
    "sampler-step",  # public: ancestral noise of one sampler step
    "server-only",   # server, public: the audit's server-only samples
    "membership-views",  # audit, public: noise of the held-out views of the membership attack
    "membership-draws",  # audit, public: t and eps' of the membership attack's losses
    "reference",     # public: the images kept aside from all clients, the feature network's check split
    "requested",     # client, public: which held-out images' conditions a client asks for when sampling
    "held-out",      # client, public: a client's held-out split of its own folder (client-data = own)
    "clients",       # server, public: the clients of a training round (clients-per-round)
    "eval-clients",  # server, public: the clients every evaluation addresses (eval-clients)
})


def stream_seed(key: bytes, stream: str, *coordinates: int | str) -> int:
    """A seed in [0, 2^63) for `torch.Generator.manual_seed`, from `key` and the stream's name
    and coordinates (see the module docstring)."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; known: {sorted(STREAMS)}")
    message = json.dumps([stream, *coordinates], separators=(",", ":")).encode()
    return int.from_bytes(hmac.new(key, message, hashlib.sha256).digest()[:8], "big") >> 1


def public_seed(run_seed: int, stream: str, *coordinates: int | str) -> int:
    """A public stream's seed: keyed by the run seed, so any party can recompute it."""
    return stream_seed(f"collafuse-flwr public {run_seed}".encode(), stream, *coordinates)


def sub_seed(seed: int, stream: str, *coordinates: int | str) -> int:
    """A stream's seed below another seed, e.g. one sampler step's noise below a sample's seed."""
    return stream_seed(seed.to_bytes(8, "big"), stream, *coordinates)
