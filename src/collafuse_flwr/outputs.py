"""Writing files so that a crash never leaves half of one, and reading tensors without unpickling.

Every completed write is atomic and durable: a file is replaced with `write_atomically`, a
directory written as a whole with `write_directory_atomically`, so a crash or power loss leaves
each file (or directory) either as it was or as it is meant to be; writers use these two rather
than a temporary file and a rename of their own. `read_tensors` reads what torch.save wrote
without ever unpickling anything but tensors and plain values. `round_dir`, `complete_rounds` and
`drop_rounds_before` keep per-round state directories (round-NNN), the server's checkpoints and
each client's denoiser alike. What the server's run directory holds is in run_dir.py.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torchvision.utils import save_image


class DamagedFileError(RuntimeError):
    """A file that cannot be read as what it should be (missing, cut off, or of another format)."""


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's contents and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, content: str | bytes | Callable[[Path], Any]) -> None:
    """Replace the file `path` by `content` (text, bytes, or a function that writes the file
    at the path it is given) so that a crash at any moment leaves the old file or the new one,
    whole: write a temporary file in the same directory, fsync it, rename it over `path`, and
    fsync the directory. The temporary file keeps `path`'s extension (writers such as np.save
    go by it); it is deleted if the write fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "xb") as f:
                f.write(content.encode() if isinstance(content, str) else content)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_directory_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """Replace the directory `path` by what `write` puts into the empty directory it is given,
    so that a crash leaves the old directory or the new one, whole: `write` fills
    `<name>.tmp/`, every file and directory in it is fsync'd, an existing `path` is moved
    aside to `<name>.old/`, `<name>.tmp/` is renamed to `path`, the parent is fsync'd and
    `<name>.old/` deleted. A `<name>.tmp/` left by a crash is never read and is cleared by
    the next write."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        for item in sorted(tmp.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            fsync_path(item)
        fsync_path(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    fsync_path(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def read_tensors(path: Path, map_location: torch.device | str = "cpu", mmap: bool = False) -> Any:
    """What `torch.save` wrote at `path`, loaded with `weights_only=True`: tensors, containers
    and plain values only, so nothing in the file is ever executed. With `mmap` (files of
    torch's zip format) the tensors' data is mapped, not read. `DamagedFileError` naming the
    file if it is missing, cut off, not torch's format, or holds any other object (a pickle)."""
    path = Path(path)
    if not path.is_file():
        raise DamagedFileError(f"{path}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # torch.load reports a cut-off or foreign file in many ways
        message = str(err).strip()
        if "Weights only load failed" in message:
            reason = "it holds objects other than tensors and plain values (a pickle; nothing was run)"
        else:
            reason = f"cut off or not torch.save's format ({type(err).__name__}: " \
                     f"{message.splitlines()[0] if message else 'ends early'})"
    raise DamagedFileError(f"{path}: {reason}")


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    """Save images (n, C, H, W) in [-1, 1] as a PNG grid (values outside are clamped for
    display only), scaled up so that small images stay visible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shown = (images.float().clamp(-1, 1) + 1) / 2
    if shown.shape[-1] < 64:
        factor = 64 // shown.shape[-1]
        shown = torch.nn.functional.interpolate(shown, scale_factor=factor, mode="nearest")
    write_atomically(path, lambda tmp: save_image(shown, tmp, nrow=nrow, padding=2, pad_value=0.5))


def save_labelled_grid(images: torch.Tensor, labels: list[str], path: Path, ncol: int = 8) -> None:
    """Save images (n, C, H, W) in [-1, 1] as a PNG grid of `ncol` columns with each image's
    label (e.g. the class it was generated for) written below it: tiles of at least 64 pixels
    (nearest-neighbour), labels in PIL's default font cut to the tile's width."""
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    shown = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if shown.shape[-1] < 64:
        shown = torch.nn.functional.interpolate(shown.float(), scale_factor=64 // shown.shape[-1],
                                                mode="nearest").to(torch.uint8)
    n, channels, height, width = shown.shape
    pad, text = 4, 14
    nrow = -(-n // ncol)
    grid = Image.new("RGB", (ncol * (width + pad) + pad, nrow * (height + text + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, label) in enumerate(zip(shown, labels, strict=True)):
        x, y = pad + (i % ncol) * (width + pad), pad + (i // ncol) * (height + text + pad)
        tile = image[0].numpy() if channels == 1 else image.permute(1, 2, 0).numpy()
        grid.paste(Image.fromarray(tile).convert("RGB"), (x, y))
        while label and draw.textlength(label) > width:
            label = label[:-1]
        draw.text((x, y + height + 1), label, fill="black")
    write_atomically(path, lambda tmp: grid.save(tmp, format="png"))


# Per-round state directories `round-NNN` (the server's checkpoints, each client's denoiser)
ROUND_DIR = re.compile(r"round-(\d{3,})$")


def round_dir(root: Path, server_round: int) -> Path:
    """`root`/round-NNN: the state directory of `server_round`."""
    return Path(root) / f"round-{server_round:03d}"


def complete_rounds(root: Path, is_complete: Callable[[Path], bool]) -> dict[int, Path]:
    """The complete `round-NNN` directories in `root` by round (a `round-NNN.tmp` cut off by a
    kill never counts); used for the server's checkpoints and each client's."""
    if not root.exists():
        return {}
    return {int(m.group(1)): d for d in root.iterdir() if (m := ROUND_DIR.match(d.name)) and is_complete(d)}


def drop_rounds_before(root: Path, server_round: int) -> None:
    """Delete the `round-NNN` directories in `root` of rounds before `server_round`."""
    for directory in root.iterdir():
        match = ROUND_DIR.match(directory.name)
        if match and int(match.group(1)) < server_round:
            shutil.rmtree(directory, ignore_errors=True)
