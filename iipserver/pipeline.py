"""Tile production: tile cache → source → transforms (iipsrv's order) → encoder."""

from __future__ import annotations

import logging
import time

import numpy as np

from iipserver import transforms
from iipserver.cache import ByteLRU
from iipserver.encoders import Encoded, encode
from iipserver.sources.base import SourceInfo
from iipserver.sources.pool import OpenedImage
from iipserver.view import Rendering

log = logging.getLogger(__name__)


def render(tile: np.ndarray, info: SourceInfo, rendering: Rendering) -> np.ndarray:
    """Turn a raw tile into 8-bit output pixels (spec §9.3 steps 3–10)."""
    if rendering.needs_float(info):
        data = transforms.normalise(tile, rendering.mins, rendering.maxs)
        if rendering.shade is not None:
            data = transforms.shade(data, *rendering.shade)
        if rendering.twist is not None:
            data = transforms.twist(data, rendering.twist)
        if rendering.log_gamma:
            data = transforms.log_gamma(data)
        else:
            data = transforms.gamma(data, rendering.gamma)
        if rendering.invert:
            data = transforms.invert(data)
        if rendering.colormap is not None:
            data = transforms.colormap(data, rendering.colormap)
        out = transforms.quantise(data, rendering.contrast)
    else:
        out = tile
    out = transforms.flatten(out)
    if rendering.colour in ("grey", "gray") and out.shape[2] == 3:
        out = transforms.greyscale(out)
    return transforms.orient(out, rendering.rotation, rendering.flip)


class Pipeline:
    """Produces encoded tiles, keeping decoded raw tiles in a byte-bounded LRU."""

    def __init__(self, cache_bytes: int) -> None:
        self.raw_tiles: ByteLRU[np.ndarray] = ByteLRU(cache_bytes)

    def raw_tile(self, image: OpenedImage, resolution: int, index: int) -> np.ndarray:
        """Return a decoded tile from the cache or the source."""
        key = (image.path, image.stamp.mtime_ns, image.stamp.size, resolution, index)
        tile = self.raw_tiles.get(key)
        if tile is None:
            tile = image.source.read_tile(resolution, index)
            self.raw_tiles.put(key, tile)
        return tile

    def tile(
        self, image: OpenedImage, resolution: int, index: int, rendering: Rendering
    ) -> Encoded:
        """Return tile ``index`` of ``resolution`` (0 = smallest) rendered and encoded."""
        started = time.perf_counter()
        raw = self.raw_tile(image, resolution, index)
        read = time.perf_counter()
        pixels = render(raw, image.source.info, rendering)
        processed = time.perf_counter()
        encoded = encode(pixels, rendering.fmt, rendering.quality)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "tile %s r=%d t=%d: read %.0f us, process %.0f us, encode %.0f us",
                image.path,
                resolution,
                index,
                (read - started) * 1e6,
                (processed - read) * 1e6,
                (time.perf_counter() - processed) * 1e6,
            )
        return encoded

    def clear(self) -> None:
        """Empty the tile cache."""
        self.raw_tiles.clear()
