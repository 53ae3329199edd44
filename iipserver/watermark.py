"""Watermarks (spec §17): a small image added to served tiles and regions, at random places.

The watermark file is read once; each of its pixels is stored premultiplied, as iipsrv does:
``channel · opacity · alpha / 255``, truncated to a byte. A tile is watermarked with probability
``WATERMARK_PROBABILITY``, at a random offset inside it (cropped when the tile is smaller), by
adding the watermark to the output pixels, saturating at 255; grey output gets the red plane.
Regions (CVT, IIIF) are split into blocks of twice the tile size, one draw per block, as
mainline iipsrv does. It is applied to the 8-bit output after every other stage, so cached and
shared responses are always watermarked (mainline's order; 1.1 watermarks raw tiles).

Placement is random per process by default, as in iipsrv. With ``WATERMARK_SEED`` it is a
function of the seed and of what is drawn for (image, level, tile or block), so every worker and
every machine watermarks the same tile the same way: testable, and stable in shared caches.
"""

from __future__ import annotations

import random
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np

from iipserver.errors import ConfigError


def premultiply(rgba: np.ndarray, opacity: float) -> np.ndarray:
    """(h, w, 4) 8-bit RGBA → (h, w, 3) ``channel · opacity · alpha/255``, truncated."""
    colour = rgba[:, :, :3].astype(np.float64)
    alpha = rgba[:, :, 3:4].astype(np.float64) / 255.0
    return np.floor(colour * opacity * alpha).astype(np.uint8)


def as_rgba(image: np.ndarray) -> np.ndarray:
    """Any 8/16-bit grey, grey+alpha, RGB or RGBA array → (h, w, 4) 8-bit RGBA.

    Raises:
        ConfigError: the image is not one of those.
    """
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4) or image.dtype.kind not in "ui":
        raise ConfigError(
            f"WATERMARK: expected an 8- or 16-bit grey, RGB or RGBA image, got {image.dtype} "
            f"{'x'.join(str(n) for n in image.shape)}"
        )
    if image.dtype.itemsize > 1:
        image = (image.astype(np.uint32) >> (8 * (image.dtype.itemsize - 1))).astype(np.uint8)
    image = image.astype(np.uint8)
    h, w, c = image.shape
    out = np.full((h, w, 4), 255, dtype=np.uint8)
    if c in (1, 2):
        out[:, :, :3] = image[:, :, :1]
        if c == 2:
            out[:, :, 3] = image[:, :, 1]
    else:
        out[:, :, :c] = image
    return out


@dataclass(frozen=True)
class Watermark:
    """A loaded watermark and how often and where it is applied."""

    image: np.ndarray
    """(h, w, 3) premultiplied bytes."""
    probability: float
    seed: int | None = None
    _process_rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    @classmethod
    def load(
        cls, path: str, opacity: float, probability: float, seed: int | None = None
    ) -> Watermark:
        """Read the watermark image (first page of a TIFF, or any image tifffile reads).

        Raises:
            ConfigError: the file cannot be read or is not a usable image.
        """
        import tifffile

        try:
            image = np.asarray(tifffile.imread(path, key=0))
        except Exception as exc:
            raise ConfigError(f"WATERMARK: cannot read {path} ({exc.__class__.__name__})") from exc
        if image.size == 0:
            raise ConfigError(f"WATERMARK: {path} is empty")
        return cls(premultiply(as_rgba(image), opacity), probability, seed)

    def _rng(self, where: Hashable) -> random.Random:
        if self.seed is None:
            return self._process_rng
        return random.Random(f"{self.seed}:{where!r}")

    def apply(self, pixels: np.ndarray, where: Hashable) -> np.ndarray:
        """``pixels`` (h, w, 1|3 bytes) watermarked or not, by a draw for ``where``."""
        return self._apply(pixels, self._rng(where))

    def apply_blocks(self, pixels: np.ndarray, block: int, where: Hashable) -> np.ndarray:
        """A region: one draw per ``block``×``block`` part (mainline: twice the tile size)."""
        out = pixels
        height, width = pixels.shape[:2]
        rng = self._rng(where)
        for top in range(0, height, block):
            for left in range(0, width, block):
                part = out[top : top + block, left : left + block]
                marked = self._apply(part, rng)
                if marked is not part:
                    if out is pixels:
                        out = pixels.copy()
                    out[top : top + block, left : left + block] = marked
        return out

    def _apply(self, pixels: np.ndarray, rng: random.Random) -> np.ndarray:
        if pixels.dtype != np.uint8 or pixels.size == 0:
            return pixels
        if rng.random() >= self.probability:
            return pixels
        th, tw = pixels.shape[:2]
        wh, ww = self.image.shape[:2]
        x = int(rng.random() * (tw - ww)) if tw > ww else 0
        y = int(rng.random() * (th - wh)) if th > wh else 0
        h, w = min(wh, th - y), min(ww, tw - x)
        channels = min(pixels.shape[2], 3)
        out = np.array(pixels, copy=True)
        area = out[y : y + h, x : x + w, :channels].astype(np.uint16)
        area += self.image[:h, :w, :channels]
        out[y : y + h, x : x + w, :channels] = np.minimum(area, 255).astype(np.uint8)
        return out
