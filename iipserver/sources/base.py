"""The image-source interface: what every reader (TIFF, zarr, …) offers the pipeline."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

#: Largest tile, strip or chunk a source may decode, and largest stored one it may read, in
#: bytes: hostile files declare 65536² tiles, 2^40-byte tiles or 60000² JPEG frames.
MAX_DECODE_BYTES = 256 << 20

#: Metadata keys a source may fill (values are text); see ``protocol.responses`` for OBJ names.
METADATA_KEYS = (
    "artist",
    "copyright",
    "datetime",
    "description",
    "software",
    "document_name",
    "page_name",
    "make",
    "model",
    "xmp",
    "scale",
)


@dataclass(frozen=True)
class Level:
    """One pyramid level: its size and tile size in pixels."""

    width: int
    height: int
    tile_width: int
    tile_height: int

    @property
    def tiles_across(self) -> int:
        """Number of tile columns."""
        return math.ceil(self.width / self.tile_width)

    @property
    def tiles_down(self) -> int:
        """Number of tile rows."""
        return math.ceil(self.height / self.tile_height)

    @property
    def tile_count(self) -> int:
        """Number of tiles at this level."""
        return self.tiles_across * self.tiles_down

    def tile_box(self, index: int) -> tuple[int, int, int, int]:
        """Return (x, y, width, height) of tile ``index`` (row-major), cropped at the edges."""
        ty, tx = divmod(index, self.tiles_across)
        x, y = tx * self.tile_width, ty * self.tile_height
        return x, y, min(self.tile_width, self.width - x), min(self.tile_height, self.height - y)


@dataclass(frozen=True)
class SourceInfo:
    """Everything about an image that does not need pixels.

    ``levels`` are in IIP order: ``levels[0]`` is the smallest, ``levels[-1]`` full resolution.
    """

    levels: tuple[Level, ...]
    channels: int
    bits_per_sample: int
    sample_format: str
    """``uint``, ``int`` or ``float``."""
    dtype: str
    """numpy dtype name of the pixels ``read_tile`` returns."""
    min_values: tuple[float, ...]
    max_values: tuple[float, ...]
    colorspace: str
    """``sRGB``, ``GREYSCALE``, ``BINARY`` or ``CIELAB``."""
    metadata: dict[str, str] = field(default_factory=dict)
    dpi: tuple[float, float] | None = None
    """Pixels per metre in x and y, when the file records a resolution."""
    horizontal_views: tuple[int, ...] = (0,)
    vertical_views: tuple[int, ...] = (90,)

    @property
    def width(self) -> int:
        """Full-resolution width."""
        return self.levels[-1].width

    @property
    def height(self) -> int:
        """Full-resolution height."""
        return self.levels[-1].height

    @property
    def tile_size(self) -> tuple[int, int]:
        """Tile width and height of the full-resolution level."""
        return self.levels[-1].tile_width, self.levels[-1].tile_height


def composite(
    level: Level,
    read_tile: Callable[[int], np.ndarray],
    box: tuple[int, int, int, int],
    channels: int,
    dtype: str,
) -> np.ndarray:
    """Assemble the rectangle ``box`` = (x, y, width, height) of a level from its tiles.

    ``read_tile(index)`` returns a (cropped) tile; the box is clipped to the level.
    """
    x, y, width, height = box
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(level.width, x + width), min(level.height, y + height)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((0, 0, channels), dtype=dtype)
    tw, th = level.tile_width, level.tile_height
    out = np.empty((y1 - y0, x1 - x0, channels), dtype=dtype)
    for ty in range(y0 // th, (y1 - 1) // th + 1):
        for tx in range(x0 // tw, (x1 - 1) // tw + 1):
            tile = read_tile(ty * level.tiles_across + tx)
            bx, by = tx * tw, ty * th
            sx0, sy0 = max(x0, bx), max(y0, by)
            sx1, sy1 = min(x1, bx + tile.shape[1]), min(y1, by + tile.shape[0])
            out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = tile[
                sy0 - by : sy1 - by, sx0 - bx : sx1 - bx
            ]
    return out


class ImageSource(Protocol):
    """A readable pyramidal image.

    Resolutions are numbered as IIP does: 0 is the smallest level. Arrays are ``(height, width,
    channels)`` in the source's native dtype (``info.dtype``), always three-dimensional.
    """

    info: SourceInfo

    def read_tile(self, resolution: int, index: int) -> np.ndarray:
        """Return tile ``index`` (row-major) of ``resolution``, cropped to the real edge size.

        Raises:
            ResolutionNotFound, TileNotFound: the level or tile does not exist.
            ImageReadError: the file cannot be read or decoded.
        """
        ...

    def read_region(self, resolution: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Return the pixels of a rectangle of ``resolution`` (clipped to the level)."""
        ...

    def stored_raw(self, resolution: int) -> bool:
        """Tell whether the level's tiles are stored uncompressed: reading one costs about a
        copy, so it is not worth a place in the decoded-tile cache."""
        ...

    def stored_jpeg(self, resolution: int, index: int) -> bytes | None:
        """Return tile ``index`` as a complete JPEG stream when it is stored as one whose
        decoded pixels are exactly what ``read_tile`` returns (8-bit grey or RGB, a full-size
        tile); None otherwise. No pixel is decoded.

        Raises:
            ResolutionNotFound, TileNotFound, ImageReadError: as ``read_tile``.
        """
        ...

    def close(self) -> None:
        """Release open file handles; the source reopens them on the next read."""
        ...
