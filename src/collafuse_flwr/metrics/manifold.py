"""Fidelity and diversity of generated images as four numbers: precision and recall
(Kynkäänniemi et al. 2019) and density and coverage (Naeem et al. 2020), the `prdc` package's
implementation on features computed beforehand (the same features as the Fréchet distances).

Real features X_1..X_N, generated Y_1..Y_M, B(x, r) the open ball {z: |z - x| < r},
NND_k(x) the distance from x to its k-th nearest neighbour within its own set:

    precision = 1/M  sum_j 1[ exists i: Y_j in B(X_i, NND_k(X_i)) ]     generated on the real manifold
    recall    = 1/N  sum_i 1[ exists j: X_i in B(Y_j, NND_k(Y_j)) ]     real on the generated manifold
    density   = 1/kM sum_j sum_i 1[ Y_j in B(X_i, NND_k(X_i)) ]          in [0, N/k]; 1 for matching sets
    coverage  = 1/N  sum_i 1[ exists j: Y_j in B(X_i, NND_k(X_i)) ]     real neighbourhoods hit

k = `NEAREST_K` = 5, the choice of both papers. NND_k needs k other points in a set, and the
implementation k + 1: both sets need at least `MIN_MANIFOLD_IMAGES` = k + 2 images, else the
four numbers are not computed (and a reply must not carry them: wire.py). A client computes them
on its own held-out and generated features and releases only the four numbers.
"""

from __future__ import annotations

import contextlib
import io

import torch
from prdc import compute_prdc

NEAREST_K = 5
MIN_MANIFOLD_IMAGES = NEAREST_K + 2
MANIFOLD_METRICS = ("precision", "recall", "density", "coverage")


def manifold_names(network_name: str) -> tuple[str, ...]:
    """The metric names of one feature network, e.g. ("precision_classifier", ...)."""
    return tuple(f"{metric}_{network_name}" for metric in MANIFOLD_METRICS)


def manifold_metrics(network_name: str, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    """{precision_<network>, recall_<network>, density_<network>, coverage_<network>} of generated
    features `fake` (M, d) against real features `real` (N, d); {} when N or M is below
    `MIN_MANIFOLD_IMAGES`."""
    if min(len(real), len(fake)) < MIN_MANIFOLD_IMAGES:
        return {}
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
        values = compute_prdc(real.double().numpy(), fake.double().numpy(), NEAREST_K)
    return {name: float(values[metric]) for name, metric in zip(manifold_names(network_name), MANIFOLD_METRICS)}
