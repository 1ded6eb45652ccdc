"""Random streams are named, keyed and cannot collide."""

from __future__ import annotations

import numpy as np
import pytest

from collafuse_flwr.seeds import STREAMS, public_seed, stream_seed, sub_seed


def test_coordinates_are_encoded_unambiguously():
    """numpy's SeedSequence pads keys with zeros, so (0, 2) and (0, 2, 0) gave one seed;
    the streams' encoding keeps every coordinate."""
    def state(key):
        return int(np.random.SeedSequence(key).generate_state(1)[0])

    assert state([0, 2]) == state([0, 2, 0])
    assert public_seed(0, "sample", 2) != public_seed(0, "sample", 2, 0)
    assert public_seed(0, "sample", 2) != public_seed(0, "sample", "2")
    assert public_seed(0, "sample", 1, 2) != public_seed(0, "sample", 12)


def test_streams_keys_and_levels_are_separate():
    seeds = {public_seed(0, stream, 1) for stream in STREAMS}
    seeds |= {stream_seed(b"\0" * 32, stream, 1) for stream in STREAMS}
    seeds |= {sub_seed(1, stream, 1) for stream in STREAMS}
    assert len(seeds) == 3 * len(STREAMS)
    assert public_seed(0, "upload", 1) != public_seed(1, "upload", 1)
    assert all(0 <= s < 2**63 for s in seeds)


def test_an_unknown_stream_is_refused():
    with pytest.raises(ValueError, match="unknown random stream"):
        public_seed(0, "uplaod", 1)
