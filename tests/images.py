"""Seeded test images written as tiled pyramidal TIFFs (the layouts iipsrv 1.1 reads)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile


def halve(level: np.ndarray) -> np.ndarray:
    """2×2 mean with floor halving, rounded back to the input dtype."""
    h, w = level.shape[0] // 2, level.shape[1] // 2
    a = level[: 2 * h, : 2 * w].astype(np.float64)
    mean = (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]) / 4
    if np.issubdtype(level.dtype, np.integer):
        return np.round(mean).astype(level.dtype)
    return mean.astype(level.dtype)


def pyramid_levels(full: np.ndarray, tile: int = 256, min_levels: int = 1) -> list[np.ndarray]:
    """Full level first, then halvings until a level fits in one tile."""
    levels = [full]
    while levels[-1].shape[0] > tile or levels[-1].shape[1] > tile or len(levels) < min_levels:
        levels.append(halve(levels[-1]))
    return levels


def write_pyramid(
    path: Path,
    levels: Sequence[np.ndarray],
    *,
    tile: tuple[int, int] = (256, 256),
    layout: str = "ifds",
    compression: str | None = None,
    compressionargs: dict[str, Any] | None = None,
    photometric: str | None = None,
    planarconfig: str | None = None,
    extratags: Sequence[tuple[Any, ...]] = (),
    description: str | None = None,
    bigtiff: bool = False,
    **kwargs: Any,
) -> Path:
    """Write ``levels`` (largest first) as a pyramid.

    ``layout="ifds"`` writes each level as its own top-level IFD (iipsrv 1.1's layout);
    ``layout="subifds"`` stores the reduced levels as SubIFDs of the first page. No JSON
    ImageDescription and no Software tag are written unless asked for.
    """
    common: dict[str, Any] = dict(
        tile=tile,
        compression=compression,
        compressionargs=compressionargs,
        photometric=photometric,
        planarconfig=planarconfig,
        metadata=None,
        software=False,
        **kwargs,
    )
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        for i, level in enumerate(levels):
            data = np.ascontiguousarray(level)
            if planarconfig == "separate" and data.ndim == 3:
                data = np.ascontiguousarray(np.moveaxis(data, 2, 0))
            extra: dict[str, Any] = {}
            if i == 0:
                extra["extratags"] = list(extratags)
                if description is not None:
                    extra["description"] = description
                if layout == "subifds" and len(levels) > 1:
                    extra["subifds"] = len(levels) - 1
            else:
                extra["subfiletype"] = 1
            tif.write(data, **common, **extra)
    return path


def rgb_image(width: int = 1000, height: int = 750) -> np.ndarray:
    """The conformance RGB pattern: R = floor(0.255·x), G = floor(0.34·y), B = 128."""
    x = np.arange(width, dtype=np.float64)[None, :]
    y = np.arange(height, dtype=np.float64)[:, None]
    out = np.empty((height, width, 3), dtype=np.uint8)
    out[..., 0] = (0.255 * x).astype(np.uint8)
    out[..., 1] = (0.34 * y).astype(np.uint8)
    out[..., 2] = 128
    return out


def star_field(width: int, height: int, seed: int = 1, channels: int = 1) -> np.ndarray:
    """A float32 sky: noisy background plus point sources, shape (h, w) or (h, w, c)."""
    rng = np.random.default_rng(seed)
    sky = rng.normal(100.0, 5.0, size=(height, width, channels)).astype(np.float32)
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(max(4, width * height // 4000)):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        flux = rng.uniform(50, 5000)
        sigma = rng.uniform(0.8, 2.5)
        star = flux * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
        sky += star[:, :, None].astype(np.float32) * rng.uniform(0.5, 1.5, size=channels).astype(
            np.float32
        )
    return sky[:, :, 0] if channels == 1 else sky


def smin_smax_tags(mins: Sequence[float], maxs: Sequence[float]) -> list[tuple[Any, ...]]:
    """Extra tags for SMinSampleValue/SMaxSampleValue (DOUBLE, one per sample)."""
    return [
        (340, "d", len(mins), tuple(float(v) for v in mins), True),
        (341, "d", len(maxs), tuple(float(v) for v in maxs), True),
    ]
