"""What each side of the cut conditions on, and classifier-free guidance (PROTOCOL.md, "Conditions").

A condition is a vector c: (n, d) added to a denoiser's time embedding (`models.ConditionalUNet`);
c = 0 is the null condition. Three kinds of condition space:

- "class": c = one_hot(y), d = the dataset's number of classes (y: (n,) int64 labels);
- "attributes": c = 2a - 1, d = A (a: (n, A) binary attributes, so "no attribute present"
  differs from the null condition);
- "client": c = one_hot(partition id of the client that sent the image), d = num-clients.

`condition` picks the clients' space (none, class, attributes), `server-condition` the server's:
"full" (the clients' space: each upload's raw condition is sent with it, the paper's setup),
"client-id" (the sender's partition id, which the server knows anyway: no label leaves a
client) or "none" (an unconditional server).

Classifier-free guidance: in training each image's condition is replaced by the null one with
probability `condition-dropout`; in sampling

    eps_guided(x, t, c) = eps(x, t, 0) + w (eps(x, t, c) - eps(x, t, 0)),   w = `guidance-scale`,

on each side with its own condition (w = 1: the conditional prediction alone, one pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from collafuse_flwr.config import RunConfig

KINDS = ("class", "attributes", "client")


@dataclass(frozen=True)
class ConditionSpace:
    """One side's conditions: `kind` (see the module docstring) and `size` (classes,
    attributes or clients); the vectors c have `size` entries."""

    kind: str
    size: int

    def encode(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw conditions to vectors c: (n, size) float32. raw: labels or partition ids (n,)
        int64 in [0, size) ("class", "client"), or attributes (n, size) in {0, 1}."""
        if self.kind == "attributes":
            return 2 * raw.float() - 1
        return nn.functional.one_hot(raw.long(), self.size).float()

    def raw_shape(self, n: int) -> tuple[int, ...]:
        """The shape of n raw conditions: (n,) for labels and ids, (n, size) for attributes."""
        return (n, self.size) if self.kind == "attributes" else (n,)


@dataclass(frozen=True)
class Conditioning:
    """A run's conditioning: the clients' and the server's condition spaces (None:
    unconditional), the dropout and the guidance scale (module docstring)."""

    client: ConditionSpace | None
    server: ConditionSpace | None
    dropout: float
    guidance_scale: float

    @classmethod
    def of(cls, config: RunConfig, num_classes: int, num_attributes: int) -> Conditioning:
        """From `condition`, `server-condition`, `condition-dropout` and `guidance-scale`;
        `num_classes` and `num_attributes` are the dataset's."""
        sizes = {"class": num_classes, "attributes": num_attributes}
        client = ConditionSpace(config.condition, sizes[config.condition]) if config.condition != "none" else None
        server = {"none": None, "full": client,
                  "client-id": ConditionSpace("client", config.num_clients)}[config.server_condition]
        return cls(client, server, config.condition_dropout, config.guidance_scale)

    @property
    def server_receives_conditions(self) -> bool:
        """Whether clients send each upload's raw condition to the server ("full")."""
        return self.server is not None and self.server.kind != "client"

    def server_conditions(self, partition_id: int, raw: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """The server's condition vectors (n, d) for n images of client `partition_id` whose
        raw conditions are `raw` (used under "full" only; None when n = 0); None when the server
        is unconditional."""
        if self.server is None:
            return None
        if n == 0:
            return torch.zeros(0, self.server.size)
        if self.server.kind == "client":
            return self.server.encode(torch.full((n,), partition_id, dtype=torch.long))
        return self.server.encode(raw)


def drop_conditions(c: torch.Tensor | None, p: float, generator: torch.Generator) -> torch.Tensor | None:
    """c: (n, d) with each row set to the null condition 0 with probability p (one uniform
    draw per row from `generator`); None stays None and draws nothing."""
    if c is None:
        return None
    keep = torch.rand(c.shape[0], generator=generator) >= p
    return c * keep.unsqueeze(1).to(c.dtype)


def predict(net: nn.Module, x: torch.Tensor, k: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """eps(x_t: (n, C, H, W), k: (n,), c: (n, d)); an unconditional network when c is None."""
    return (net(x, k) if c is None else net(x, k, c)).sample


def guided_eps(net: nn.Module, x: torch.Tensor, k: torch.Tensor, c: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Classifier-free guidance: eps(x, k, 0) + w (eps(x, k, c) - eps(x, k, 0)), w = `scale`,
    as one batched pass of 2n images; eps(x, k, c) alone when w = 1 or c is None."""
    if c is None or scale == 1:
        return predict(net, x, k, c)
    both = predict(net, torch.cat([x, x]), torch.cat([k, k]), torch.cat([c, torch.zeros_like(c)]))
    conditional, null = both.chunk(2)
    return null + scale * (conditional - null)
