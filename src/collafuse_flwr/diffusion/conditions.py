"""What each side of the cut conditions on, and classifier-free guidance (docs/protocol.md, "Conditions and guidance").

A condition is a vector c: (n, d) added to a denoiser's time embedding (`models.ConditionalUNet`);
c = 0 is the null condition. Four kinds of condition space:

- "class": c = one_hot(y), d = the dataset's number of classes (y: (n,) int64 labels);
- "attributes": c = 2a - 1, d = A (a: (n, A) binary attributes, so "no attribute present"
  differs from the null condition);
- "text": c = CLIP's unit-norm embedding of the prompt of the attributes a (text.py), d = 512;
- "client": c = one_hot(partition id of the client that sent the image), d = num-clients.

What a client holds, and under "full" sends, are the raw conditions: labels, or attributes
(for "text" too: the prompt follows from them). `condition` picks the clients' space (none,
class, attributes, text), `server-condition` the server's:
"full" (the clients' space: each upload's raw condition is sent with it, the paper's setup),
"client-id" (the sender's partition id, which the server knows anyway: no label leaves a
client) or "none" (an unconditional server).

Classifier-free guidance: in training each image's condition is replaced by the null one with
probability `condition-dropout`; in sampling

    eps_guided(x, t, c) = eps(x, t, 0) + w (eps(x, t, c) - eps(x, t, 0)),   w = `guidance-scale`,

on each side with its own condition (w = 1: the conditional prediction alone, one pass).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from collafuse_flwr.config import RunConfig
from collafuse_flwr.data import condition_sizes, load_table
from collafuse_flwr.diffusion.text import EMBEDDING_SIZE, prompts, text_encoder


@dataclass(frozen=True)
class ConditionSpace:
    """One side's conditions: `kind` (see the module docstring), `size` (the length of the
    vectors c: classes, attributes, 512 or clients) and, for "text", `raw_size` (the number of
    attributes) and `embed` (raw attributes (n, A) -> embeddings (n, 512), text.py)."""

    kind: str
    size: int
    raw_size: int = 0
    embed: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, compare=False, repr=False)

    def encode(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw conditions to vectors c: (n, size) float32. raw: labels or partition ids (n,)
        int64 in [0, size) ("class", "client"), or attributes (n, A) in {0, 1}."""
        if self.kind == "attributes":
            return 2 * raw.float() - 1
        if self.kind == "text":
            return self.embed(raw)
        return nn.functional.one_hot(raw.long(), self.size).float()

    @property
    def raw_kind(self) -> str:
        """What the raw conditions are: "class" (labels or ids) or "attributes"."""
        return "attributes" if self.kind in ("attributes", "text") else "class"

    @property
    def raw_width(self) -> int:
        """Classes, or attributes per raw condition."""
        return self.raw_size or self.size


@dataclass(frozen=True)
class Conditioning:
    """A run's conditioning: the clients' and the server's condition spaces (None:
    unconditional), the dropout and the guidance scale (module docstring)."""

    client: ConditionSpace | None
    server: ConditionSpace | None
    dropout: float
    guidance_scale: float

    @classmethod
    def of(cls, config: RunConfig, num_classes: int, num_attributes: int,
           embed: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Conditioning:
        """From `condition`, `server-condition`, `condition-dropout` and `guidance-scale`;
        `num_classes` and `num_attributes` are the dataset's, `embed` the text embedding of raw
        attributes (condition "text" only)."""
        spaces = {"class": ConditionSpace("class", num_classes),
                  "attributes": ConditionSpace("attributes", num_attributes),
                  "text": ConditionSpace("text", EMBEDDING_SIZE, num_attributes, embed)}
        client = spaces.get(config.condition)
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


def run_conditioning(config: RunConfig) -> Conditioning:
    """The run's conditioning, from the dataset's classes and attributes (and, for "text", the
    CLIP text encoder of `fcd-weights`: a `ConfigError` when it is not available)."""
    embed = None
    if config.condition == "text":
        encoder, names = text_encoder(config), load_table(config).attribute_names
        embed = lambda raw: encoder.encode(prompts(raw, names))
    return Conditioning.of(config, *condition_sizes(config), embed)
