"""zarr arrays and OME-Zarr multiscale groups as image sources (region reads through zarr)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from iipserver.errors import (
    IIPServerError,
    ImageReadError,
    ResolutionNotFound,
    TileNotFound,
    UnsupportedImage,
)
from iipserver.sources.base import MAX_DECODE_BYTES, Level, SourceInfo

_MARKERS = ("zarr.json", ".zgroup", ".zarray")
_DEFAULT_MAX = {1: 255.0, 2: 65535.0, 4: 4294967295.0}
#: Largest chunk a read may decode.
MAX_CHUNK_BYTES = MAX_DECODE_BYTES
#: Longest axis served (IIP sizes are 32-bit; a sparse store can declare 2^40 for free).
MAX_SIDE = 2**31 - 1


def is_zarr(path: str) -> bool:
    """Tell whether directory ``path`` holds a zarr array or group."""
    return any(os.path.exists(os.path.join(path, marker)) for marker in _MARKERS)


def _multiscales(attrs: dict[str, Any]) -> dict[str, Any] | None:
    if "ome" in attrs and isinstance(attrs["ome"], dict):
        attrs = attrs["ome"]
    scales = attrs.get("multiscales")
    if isinstance(scales, list) and scales and isinstance(scales[0], dict):
        return scales[0]
    return None


def _check_array(array: Any) -> None:
    """Refuse arrays that are not images or whose chunks are too large to decode.

    Raises:
        UnsupportedImage: fewer than two axes, an empty axis, an axis longer than
            ``MAX_SIDE``, or chunks over ``MAX_CHUNK_BYTES``.
    """
    if array.ndim < 2 or 0 in array.shape:
        raise UnsupportedImage("Unsupported image type")
    if max(int(n) for n in array.shape) > MAX_SIDE:
        raise UnsupportedImage("Image too large")
    chunk = int(np.prod([int(c) for c in array.chunks], dtype=np.float64))
    if chunk * np.dtype(array.dtype).itemsize > MAX_CHUNK_BYTES:
        raise UnsupportedImage("Tiles too large")


class ZarrSource:
    """A zarr array, or the levels of an OME-Zarr multiscale group.

    Axes are taken from the OME ``axes`` list when present (``y``, ``x`` and an optional ``c``;
    other axes are read at index 0); a bare array is ``(y, x)`` or ``(y, x, c)``.
    """

    def __init__(self, path: str) -> None:
        import zarr

        self.path = path
        try:
            node = zarr.open(path, mode="r")
            if isinstance(node, zarr.Array):
                arrays, axes = [node], None
            else:
                scales = _multiscales(dict(node.attrs))
                if scales is None:
                    raise ImageReadError("zarr group without multiscales metadata")
                arrays = [node[d["path"]] for d in scales["datasets"]]  # type: ignore[misc]
                axes = [a["name"] if isinstance(a, dict) else a for a in scales.get("axes", [])]
            for array in arrays:
                _check_array(array)
            self._arrays = sorted(arrays, key=lambda a: a.shape[-1] * a.shape[-2])
            self._axes = self._axis_map(self._arrays[-1], axes)
            self.info = self._read_info()
        except IIPServerError:
            raise
        except Exception as exc:  # whatever a hostile store makes zarr raise
            raise ImageReadError(f"unreadable zarr ({exc.__class__.__name__})") from exc

    @staticmethod
    def _axis_map(array: Any, axes: list[str] | None) -> dict[str, int]:
        if axes and len(axes) == array.ndim:
            return {name.lower(): i for i, name in enumerate(axes)}
        if array.ndim == 2:
            return {"y": 0, "x": 1}
        if array.ndim == 3 and array.shape[2] <= 4:
            return {"y": 0, "x": 1, "c": 2}
        return {"c": array.ndim - 3, "y": array.ndim - 2, "x": array.ndim - 1}

    def _read_info(self) -> SourceInfo:
        full = self._arrays[-1]
        ax = self._axes
        channels = int(full.shape[ax["c"]]) if "c" in ax else 1
        dtype = np.dtype(full.dtype)
        levels = []
        for a in self._arrays:
            chunks = a.chunks
            levels.append(
                Level(
                    int(a.shape[ax["x"]]),
                    int(a.shape[ax["y"]]),
                    int(chunks[ax["x"]]),
                    int(chunks[ax["y"]]),
                )
            )
        fmt = "float" if dtype.kind == "f" else ("int" if dtype.kind == "i" else "uint")
        info = SourceInfo(
            levels=tuple(levels),
            channels=channels,
            bits_per_sample=dtype.itemsize * 8,
            sample_format=fmt,
            dtype=dtype.name,
            min_values=(),
            max_values=(),
            colorspace="GREYSCALE" if channels == 1 else "sRGB",
        )
        self.info = info
        if fmt == "float":
            # the smallest level, or its first chunk when the level is too large to read
            w, h = levels[0].width, levels[0].height
            if w * h * channels * dtype.itemsize > MAX_CHUNK_BYTES:
                w, h = min(w, levels[0].tile_width), min(h, levels[0].tile_height)
            data = self.read_region(0, 0, 0, w, h).astype(np.float64)
            flat = data.reshape(-1, channels)
            mins, maxs = [], []
            for c in range(channels):
                finite = flat[:, c][np.isfinite(flat[:, c])]
                mins.append(float(finite.min()) if finite.size else 0.0)
                maxs.append(float(finite.max()) if finite.size else 1.0)
        else:
            mins = [0.0] * channels
            maxs = [_DEFAULT_MAX.get(dtype.itemsize, 255.0)] * channels
        return SourceInfo(**{**info.__dict__, "min_values": tuple(mins), "max_values": tuple(maxs)})

    def read_tile(self, resolution: int, index: int) -> np.ndarray:
        """Return one tile (see ``ImageSource.read_tile``)."""
        if not 0 <= resolution < len(self._arrays):
            raise ResolutionNotFound(f"Asked for non-existent resolution: {resolution}")
        level = self.info.levels[resolution]
        if not 0 <= index < level.tile_count:
            raise TileNotFound(f"Asked for non-existent tile: {index}")
        return self.read_region(resolution, *level.tile_box(index))

    def read_region(self, resolution: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Return a rectangle of one level (see ``ImageSource.read_region``)."""
        if not 0 <= resolution < len(self._arrays):
            raise ResolutionNotFound(f"Asked for non-existent resolution: {resolution}")
        array = self._arrays[resolution]
        level = self.info.levels[resolution]
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(level.width, x + width), min(level.height, y + height)
        index: list[Any] = [0] * array.ndim
        index[self._axes["y"]] = slice(y0, y1)
        index[self._axes["x"]] = slice(x0, x1)
        if "c" in self._axes:
            index[self._axes["c"]] = slice(None)
        try:
            data = np.asarray(array[tuple(index)])
        except Exception as exc:
            raise ImageReadError(f"zarr read failed ({exc.__class__.__name__})") from exc
        kept = sorted(i for name, i in self._axes.items() if name in ("y", "x", "c"))
        order = [kept.index(self._axes[n]) for n in ("y", "x", "c") if n in self._axes]
        data = np.transpose(data, order)
        if data.ndim == 2:
            data = data[:, :, None]
        return data

    def stored_raw(self, resolution: int) -> bool:
        """zarr chunks go through a store and codecs (see ``ImageSource.stored_raw``)."""
        return False

    def stored_jpeg(self, resolution: int, index: int) -> bytes | None:
        """zarr chunks are never sent as stored (see ``ImageSource.stored_jpeg``)."""
        return None

    def close(self) -> None:
        """Nothing to release: zarr opens chunk files per read."""
