"""Text conditions (condition "text"): the authors' prompt of an image, its positive attributes
comma-joined ("Black Hair, Smiling, Young"), encoded by the text tower of OpenAI's CLIP
ViT-B/32 (open_clip, QuickGELU) into a unit vector c: (512,).

The weights are the file `text-weights` names, else $COLLAFUSE_TEXT_WEIGHTS, else the CLIP
checkpoint FCD uses (`fcd-weights`, weights.py: the key, the environment, the Hugging Face
cache; never downloaded); they must hold the text tower (a full open_clip checkpoint, or its
text weights: not only `visual.*`). They are read without unpickling (`read_weights`). The
server reads these keys from its run config; a client from its own node config (it reads the
run config with its own weights keys, clients/release.py), and in evaluation it checks that
its file is the one the server uses (the SHA-256 the evaluate message names).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch

from collafuse_flwr.config import ConfigError, RunConfig
from collafuse_flwr.weights import read_weights, resolve_weights

EMBEDDING_SIZE = 512
TEXT_WEIGHTS_VARIABLE = "COLLAFUSE_TEXT_WEIGHTS"


def prompts(attributes: torch.Tensor, names: tuple[str, ...]) -> list[str]:
    """The prompt of each row of attributes (n, A) in {0, 1}: the names of its present
    attributes, underscores as spaces, comma-joined in the dataset's order ("" for none)."""
    return [", ".join(name.replace("_", " ") for name, on in zip(names, row.tolist()) if on) for row in attributes]


class TextEncoder:
    """CLIP ViT-B/32's text tower: prompts -> unit-norm embeddings (n, 512), each distinct
    prompt encoded once per process."""

    def __init__(self, path: Path):
        import open_clip

        model = open_clip.create_model("ViT-B-32", force_quick_gelu=True)
        model.visual = torch.nn.Identity()  # the image tower is not needed
        state = {k.removeprefix("module."): v for k, v in read_weights(path).items()}
        text = {k: v for k, v in state.items() if not k.startswith("visual.")}
        expected = set(model.state_dict())
        missing = sorted(expected - set(text))
        if missing:
            raise ValueError(f"{path} holds no CLIP ViT-B/32 text tower (missing {', '.join(missing[:3])}, ...): "
                             "condition='text' needs a full open_clip checkpoint, not only its visual.* weights")
        try:
            model.load_state_dict({k: text[k] for k in expected}, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{path} is not an open_clip CLIP ViT-B/32 checkpoint: {str(err)[:300]}") from None
        self.model = model.float().eval()
        self.tokenizer = open_clip.get_tokenizer("ViT-B-32")
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings (n, 512) of `texts`."""
        new = sorted(set(texts) - set(self.cache))
        for start in range(0, len(new), 256):
            batch = new[start:start + 256]
            embedded = self.model.encode_text(self.tokenizer(batch), normalize=True).float()
            self.cache.update(zip(batch, embedded))
        return torch.stack([self.cache[t] for t in texts]) if texts else torch.empty(0, EMBEDDING_SIZE)


@lru_cache(maxsize=2)
def _encoder(path: Path) -> TextEncoder:
    return TextEncoder(path)


def text_weights_file(text_weights: str, fcd_weights: str, configured_in: str = "text-weights") -> tuple[Path, str]:
    """The file CLIP's text tower is read from, and where it was named: `text_weights` (named
    `configured_in`), else $COLLAFUSE_TEXT_WEIGHTS, else the CLIP weights `fcd_weights` resolves
    to (`resolve_weights`); a `ConfigError` naming the setting when a named file does not exist
    or there is none, saying how to supply one."""
    for name, value in ((configured_in, text_weights),
                        (f"${TEXT_WEIGHTS_VARIABLE}", os.environ.get(TEXT_WEIGHTS_VARIABLE, ""))):
        if value:
            path, source = Path(value).expanduser(), f"{name}={value!r}"
            if not path.is_file():
                raise ConfigError(f"{source}: no such file")
            return path.resolve(), source
    weights = resolve_weights("clip", fcd_weights)
    if not weights.available:
        raise ConfigError(f"condition='text' encodes prompts with CLIP ViT-B/32's text tower, but there are no "
                          f"CLIP weights ({weights.found_in}); set text-weights='/path/file' (a client: in its node "
                          f"config, or ${TEXT_WEIGHTS_VARIABLE}), or {weights.backbone.how_to_get}")
    return Path(weights.path), weights.found_in


def text_encoder(config: RunConfig) -> TextEncoder:
    """The run's text encoder (one per process and weights file) from `text_weights_file` of
    the config's text-weights and fcd-weights; a `ConfigError` naming the setting and the file
    when it holds no text tower."""
    path, source = text_weights_file(config.text_weights, config.fcd_weights)
    try:
        return _encoder(path)
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None
