"""Pretrained weights (the feature networks', CLIP's text tower): where they come from, what is
skipped without them, and reading them without unpickling.

FID and KID need InceptionV3 (the TensorFlow FID network, as converted by torch-fidelity); FCD
needs OpenAI's CLIP ViT-B/32. Nothing is downloaded: each party looks, in this order, at
1. the key `fid-weights`, `fcd-weights` (the server: its run config; a client: its own node
   config, never the run config, clients/release.py), then the environment variable
   (`COLLAFUSE_FID_WEIGHTS`, `COLLAFUSE_FCD_WEIGHTS`): a path given there must exist;
2. the standard cache locations: `$TORCH_HOME/hub/checkpoints/<torch-fidelity's file>` for
   InceptionV3 (where torchmetrics and torch-fidelity download it) and the Hugging Face hub
   cache of `timm/vit_base_patch32_clip_224.openai` for CLIP (where open_clip downloads it).
Without weights, the server skips the metrics with a message saying how to supply them; no
other network is ever substituted under their names. The server names the SHA-256 of each file
it uses (`file_digest`) in its evaluate messages, and a client computes those metrics only on
its own file of that digest.

A weights file is only ever read by this project (features.py: safetensors, or `torch.load` with
`weights_only=True`; torch-fidelity and open_clip are handed the tensors) and never unpickled.
`features.pretrained_weights` checks each resolved file against its network (names and shapes)
before any run directory exists: a pickle, a cut-off file or another network's weights are a
`ConfigError` naming the key and the file.
"""

from __future__ import annotations

import functools
import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from collafuse_flwr.config import ConfigError
from collafuse_flwr.outputs import DamagedFileError, read_tensors

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
CLIP_REPO = "timm/vit_base_patch32_clip_224.openai"
CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class Backbone:
    """A pretrained feature network: the metrics it enables and where its weights are looked up."""

    name: str
    metrics: tuple[str, ...]
    config_key: str
    env_var: str
    how_to_get: str


BACKBONES = {
    "inception": Backbone(
        "inception", ("fid", "kid"), "fid-weights", "COLLAFUSE_FID_WEIGHTS",
        f"download {INCEPTION_URL} and either put it at $TORCH_HOME/hub/checkpoints/{INCEPTION_FILE} "
        "(TORCH_HOME defaults to ~/.cache/torch), or pass its path as fid-weights='/path/file.pth' "
        "or COLLAFUSE_FID_WEIGHTS=/path/file.pth",
    ),
    "clip": Backbone(
        "clip", ("fcd", "kid_clip"), "fcd-weights", "COLLAFUSE_FCD_WEIGHTS",
        f"download {CLIP_FILES[0]} of https://huggingface.co/{CLIP_REPO} (OpenAI's ViT-B/32 in "
        "open_clip format) and pass its path as fcd-weights='/path/file' or "
        "COLLAFUSE_FCD_WEIGHTS=/path/file, or fetch it into the Hugging Face cache with "
        f"`huggingface-cli download {CLIP_REPO} {CLIP_FILES[0]}`",
    ),
}


@dataclass(frozen=True)
class Weights:
    """The resolved weights of one backbone: a file and where it was found, or why not."""

    backbone: Backbone
    path: Path | None
    found_in: str

    @property
    def available(self) -> bool:
        return self.path is not None

    def skip_message(self) -> str:
        """Which metrics are skipped and how to supply the weights."""
        return (
            f"{', '.join(self.backbone.metrics)} skipped: no {self.backbone.name} weights "
            f"({self.found_in}). To compute them, {self.backbone.how_to_get}."
        )


def resolve_weights(name: str, configured: str = "", configured_in: str = "") -> Weights:
    """The weights of backbone `name` ("inception" or "clip"); `configured` is the value of its
    key (the server: the run config; a client: its node config, clients/release.py), named
    `configured_in` in messages (default: the key). A path given there or in the environment
    that is not a file is a `ConfigError`."""
    backbone = BACKBONES[name]
    for source, value in ((configured_in or backbone.config_key, configured),
                          (backbone.env_var, os.environ.get(backbone.env_var, ""))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise ConfigError(f"{source}={value!r}: no such file; {backbone.how_to_get}")
            return Weights(backbone, path.resolve(), source)
    cached = _cached_inception() if name == "inception" else _cached_clip()
    if cached is not None:
        return Weights(backbone, cached, "cache")
    return Weights(backbone, None, f"neither {backbone.config_key} nor {backbone.env_var} is set "
                   "and the standard cache holds none")


@functools.lru_cache(maxsize=16)
def _digest_of(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """The SHA-256 (64 hex digits) of a weights file's bytes: what pins pretrained weights
    between the server and its clients. Computed once per process for each path, size and
    modification time."""
    path = Path(path).resolve()
    stat = path.stat()
    return _digest_of(path, stat.st_size, stat.st_mtime_ns)


def _cached_inception() -> Path | None:
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return path if path.is_file() else None


def _cached_clip() -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    hub = os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"
    for filename in CLIP_FILES:
        found = try_to_load_from_cache(CLIP_REPO, filename, cache_dir=hub)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def read_weights(path: Path, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a weights file by name, read without ever unpickling: .safetensors through
    safetensors, any other file through `read_tensors` (`torch.load(weights_only=True)`); a
    {"state_dict": ...} wrapper is unwrapped. With `shapes_only`, tensors on the "meta" device:
    only the safetensors header, or the pickle of a memory-mapped torch file, is read.
    ValueError naming the file if it is cut off, of another format, or not a dict of tensors."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                state = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") if shapes_only
                         else f.get_tensor(k) for k in f.keys()}
        else:
            state = read_tensors(path, mmap=shapes_only and zipfile.is_zipfile(path))
    except SafetensorError as err:
        raise ValueError(f"{path}: cut off or not a safetensors file ({err})") from None
    except DamagedFileError as err:
        raise ValueError(str(err)) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or \
            not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{path}: not a state dict (names to tensors)")
    return {k: v.to("meta") for k, v in state.items()} if shapes_only else state
