"""A client's privacy ledger: every distinct view of each of its images it has uploaded, in any
run, and the budget check before a new one (privacy.py, "A formal guarantee" in docs/threat-model.md).

    <holder>/privacy-ledger.json = {
      "format": 2,
      "views": [[view, z], ...],              one entry per distinct upload noise: its
                                              coordinates (`ClientRound.upload_view`) and noise
                                              multiplier z = sqrt(1 - abar_r) / (2 R sqrt(abar_r))
      "images": {image key: [view index, ...]},  the views each image has been uploaded under
      "image-shapes": [[C, H, W], ...]        the shapes the images were uploaded at
    }

An image key is HMAC-SHA256 of the image's decoded pixels under the client's secret
(`ClientState.image_keys`): the same image has the same key whatever its place in the folder,
so its views are counted wherever it moves, and a new image starts its own count. The key of an
image's upload noise is the same image key with the view (`ClientRound.upload_noise`), so one
image under one view is always the same upload: the server never gets two views of an image the
ledger does not count.

The ledger fails closed: a file that is not exactly this form (empty, a list, NaN, a negative
multiplier, an index out of range) is `DamagedLedger`, and the client uploads nothing until it
is restored or reset (`ClientState.spend`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from collafuse_flwr import privacy

FORMAT = 2


class DamagedLedger(ValueError):
    """A ledger file that is not exactly the ledger's form (the message says what is wrong)."""


@dataclass
class Ledger:
    """The ledger's content (see the module docstring)."""

    views: list[tuple[str, float]] = field(default_factory=list)
    images: dict[str, list[int]] = field(default_factory=dict)
    shapes: list[list[int]] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Ledger:
        """The ledger in `text`, checked value by value; `DamagedLedger` for anything else."""
        try:
            content = json.loads(text, parse_constant=lambda name: math.nan)
        except ValueError as err:
            raise DamagedLedger(f"not JSON: {err}") from None
        if not isinstance(content, dict) or set(content) != {"format", "views", "images", "image-shapes"}:
            raise DamagedLedger("not an object with exactly format, views, images, image-shapes")
        if content["format"] != FORMAT or isinstance(content["format"], bool):
            raise DamagedLedger(f"format {content['format']!r}, this client writes format {FORMAT}")
        views, images, shapes = content["views"], content["images"], content["image-shapes"]
        if not isinstance(views, list) or not all(
                isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
                and isinstance(v[1], (int, float)) and not isinstance(v[1], bool) and v[1] >= 0 for v in views):
            raise DamagedLedger("views must be [view, noise multiplier >= 0] pairs")
        if len({v[0] for v in views}) != len(views):
            raise DamagedLedger("a view is listed twice")
        if not isinstance(images, dict) or not all(
                isinstance(k, str) and isinstance(idx, list) and len(set(idx)) == len(idx)
                and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(views) for i in idx)
                for k, idx in images.items()):
            raise DamagedLedger("images must map image keys to distinct indices of views")
        if not isinstance(shapes, list) or not all(
                isinstance(s, list) and len(s) == 3 and all(isinstance(d, int) and d > 0 for d in s) for s in shapes):
            raise DamagedLedger("image-shapes must be [C, H, W] lists")
        return cls([(v, float(z)) for v, z in views], images, shapes)

    def dumps(self) -> str:
        """The ledger as its file holds it."""
        return json.dumps({"format": FORMAT, "views": [list(v) for v in self.views], "images": self.images,
                           "image-shapes": self.shapes}, separators=(",", ":"))

    def epsilon_with(self, images: list[str], view: str, multiplier: float, delta: float) -> tuple[float, int]:
        """The largest epsilon at `delta` of any image of `images` once uploaded under `view`
        (noise multiplier `multiplier`; no extra cost for an image that had this view before),
        its views composed exactly (`privacy.composed_multiplier`); and that image's view count."""
        known = self._index(view)
        worst, count = 0.0, 0
        for indices in {tuple(self.images.get(k, [])) for k in images}:
            multipliers = [self.views[i][1] for i in indices]
            if known not in indices:
                multipliers.append(multiplier)
            spent = privacy.epsilon(privacy.composed_multiplier(multipliers), 1, delta)
            if spent > worst or not count:
                worst, count = spent, len(multipliers)
        return worst, count

    def record(self, images: list[str], view: str, multiplier: float, shape: tuple[int, ...]) -> bool:
        """Add `view` (noise multiplier `multiplier`) to every image of `images`, uploaded at
        `shape` (C, H, W); whether anything was new (an upload sent again changes nothing)."""
        known, changed = self._index(view), False
        if known is None:
            self.views.append((view, multiplier))
            known, changed = len(self.views) - 1, True
        for key in images:
            entry = self.images.setdefault(key, [])
            if known not in entry:
                entry.append(known)
                changed = True
        if list(shape) not in self.shapes:
            self.shapes.append(list(shape))
            changed = True
        return changed

    def _index(self, view: str) -> int | None:
        """The index of `view` in `views`, or None when no image had it."""
        return next((i for i, (v, _) in enumerate(self.views) if v == view), None)
