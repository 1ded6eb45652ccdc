"""The in-memory form of every dataset: images with their class labels and/or attributes.

Images are kept as uint8 (N, C, S, S) (decoded datasets) or float32 in [-1, 1] (the
embedded digits); `as_model_input` turns either into the float32 [-1, 1] tensors the
denoisers see. Nothing here knows about clients or partitions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2 as transforms

# Images with more pixels than this (e.g. 8000 x 5000) are refused before decoding: photos of
# CIFAR-10, CelebA and AwA2 are far smaller, and a tiny file can declare billions of pixels.
MAX_PIXELS = 40_000_000


class DatasetError(RuntimeError):
    """Dataset files are missing, unreadable or inconsistent; the message says which and how to fix."""


@dataclass(frozen=True)
class ImageTable:
    """All images of one dataset split.

    images: (N, C, S, S), uint8 in [0, 255] or float32 in [-1, 1].
    labels: (N,) int64 class indices into `class_names`, or None (CelebA has no classes).
    attributes: (N, A) uint8 in {0, 1} named by `attribute_names`, or None (digits, CIFAR-10).
    source: where the images came from (a path or a package), for logs and reports.
    """

    images: np.ndarray
    labels: np.ndarray | None
    class_names: tuple[str, ...]
    attributes: np.ndarray | None
    attribute_names: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 4 or self.images.shape[2] != self.images.shape[3]:
            raise DatasetError(f"{self.source}: images have shape {self.images.shape}, expected (N, C, S, S)")
        if self.labels is not None and self.labels.shape != (n,):
            raise DatasetError(f"{self.source}: {len(self.labels)} labels for {n} images")
        if self.attributes is not None and self.attributes.shape != (n, len(self.attribute_names)):
            raise DatasetError(
                f"{self.source}: attributes of shape {self.attributes.shape} for {n} images "
                f"and {len(self.attribute_names)} attribute names"
            )

    def __len__(self) -> int:
        return len(self.images)

    def targets(self) -> torch.Tensor:
        """What the evaluation feature network learns to predict: class labels (N,) int64 when
        the dataset has classes, else the attributes (N, A) float32 in {0, 1}."""
        if self.labels is not None:
            return torch.from_numpy(np.asarray(self.labels, dtype=np.int64))
        return torch.from_numpy(np.asarray(self.attributes, dtype=np.float32))

    def conditions(self, kind: str) -> torch.Tensor | None:
        """The raw conditions of every image for the run config's `condition`: "class" ->
        labels (N,) int64, "attributes" -> attributes (N, A) float32 in {0, 1}, "none" -> None."""
        if kind == "none":
            return None
        values = self.labels if kind == "class" else self.attributes
        if values is None:
            raise DatasetError(f"{self.source}: condition={kind!r}, but these images have no "
                               f"{'class labels' if kind == 'class' else 'attributes'}")
        if kind == "class":
            return torch.from_numpy(np.asarray(values, dtype=np.int64))
        return torch.from_numpy(np.asarray(values, dtype=np.float32))


def as_model_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [-1, 1] images (n, C, S, S), numpy or torch, as float32 in
    [-1, 1]: x / 127.5 - 1 for uint8, unchanged values otherwise."""
    if isinstance(images, np.ndarray):  # a read-only memmap view is copied, not aliased
        images = np.ascontiguousarray(images) if images.flags.writeable else np.array(images)
    x = torch.from_numpy(images) if isinstance(images, np.ndarray) else images
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1.0
    return x.float()


def square_resize(image_size: int, crop_fraction: float = 1.0):
    """A callable on uint8 images (..., C, H, W): centre-crop a square of side
    round(crop_fraction * min(H, W)), then resize it to `image_size` (bicubic, antialiased).
    The aspect ratio is never changed; `image_size` equal to the crop is a no-op."""

    def transform(images: torch.Tensor) -> torch.Tensor:
        side = round(crop_fraction * min(images.shape[-2:]))
        images = transforms.functional.center_crop(images, [side, side])
        if side == image_size:
            return images
        return transforms.functional.resize(
            images, [image_size, image_size],
            interpolation=transforms.InterpolationMode.BICUBIC, antialias=True,
        )

    return transform


def decode_images(paths: list[Path], image_size: int, crop_fraction: float = 1.0) -> np.ndarray:
    """Decode image files as RGB (`read_rgb`), centre-crop and resize (`square_resize`):
    (N, 3, S, S) uint8. A missing, undecodable or oversized file raises `DatasetError` naming it.
    """
    transform = square_resize(image_size, crop_fraction)
    out = np.empty((len(paths), 3, image_size, image_size), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = transform(transforms.functional.pil_to_tensor(read_rgb(path))).numpy()
    return out


def read_rgb(path: Path) -> Image.Image:
    """The image file at `path` as an 8-bit RGB image (H, W, 3).

    - 16-bit grey (PIL modes I;16*, or I with values in [0, 65535]): v -> round(v * 255 / 65535).
      16-bit RGB(A) PNGs arrive from PIL already 8-bit (the high byte, v // 256).
    - Transparency (RGBA, LA, PA, or a palette / colour-key transparency): composited over black,
      i.e. each colour channel times alpha / 255, so a transparent pixel is black whatever colour
      it hides.
    - Palette, 1-bit, grey, CMYK, YCbCr: PIL's conversion to RGB.

    A `DatasetError` names the file when it is missing, not an image, truncated or corrupt,
    floating-point (mode F, whose range is unknown), or larger than MAX_PIXELS. The size is read
    from the header, before any pixel is decoded; PIL's own global limit
    (PIL.Image.MAX_IMAGE_PIXELS) is left unchanged, and its refusal becomes the same error.
    """
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise DatasetError(
                    f"image file {path} is {img.width}x{img.height} pixels, more than the "
                    f"{MAX_PIXELS:,} this project decodes (a corrupt header or a decompression bomb?)"
                )
            return _as_rgb(img, path)
    except FileNotFoundError as err:
        raise DatasetError(f"image file {path} is missing") from err
    except Image.DecompressionBombError as err:
        raise DatasetError(f"image file {path} is too large to decode ({err})") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise DatasetError(f"image file {path} cannot be decoded ({err})") from err


def _as_rgb(img: Image.Image, path: Path) -> Image.Image:
    """An opened image as 8-bit RGB, by the rules of `read_rgb`."""
    if img.mode == "F":
        raise DatasetError(f"image file {path} has floating-point pixels (mode F); save it as 8 or 16 bits")
    if img.mode == "I" or img.mode.startswith("I;16"):
        values = np.asarray(img, dtype=np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise DatasetError(
                f"image file {path} has integer pixels in [{values.min()}, {values.max()}]; "
                "only 8- and 16-bit images are read"
            )
        eight = (values + 128) // 257  # round(v / 257), and v / 257 = v * 255 / 65535 is never a tie
        return Image.fromarray(eight.astype(np.uint8)).convert("RGB")
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return img.convert("RGB")
