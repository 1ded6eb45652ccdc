"""Reproducible seeds derived from the run seed and the place they are used."""

from __future__ import annotations

import numpy as np


def derive_seed(*key: int) -> int:
    """A 32-bit seed from a tuple of non-negative ints, e.g. (seed, client, round), hashed by
    numpy's `SeedSequence` so that nearby keys give unrelated streams."""
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])
