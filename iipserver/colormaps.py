"""The 256-entry colour maps of VisiOmatic 3's dialect (OpenCV's JET, COOL and HOT).

Each map is defined by key colours on an evenly spaced grid (JET: 256 keys from its piecewise
linear ramps; COOL and HOT: 64 keys), sampled at 256 evenly spaced positions by linear
interpolation in float32 and rounded half to even, which is how OpenCV builds the tables that
VisiOmatic 3 applies with ``cv2.applyColorMap``.
"""

from __future__ import annotations

import functools

import numpy as np

_F32 = np.float32


def _grid(n: int) -> np.ndarray:
    return (np.arange(n, dtype=_F32) * (_F32(1) / _F32(n - 1))).astype(_F32)


def _keys(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if name == "jet":
        x = np.arange(256) / 255.0
        r = np.clip(np.minimum(4 * x - 1.5, 4.5 - 4 * x), 0, 1)
        g = np.clip(np.minimum(4 * x - 0.5, 3.5 - 4 * x), 0, 1)
        b = np.clip(np.minimum(4 * x + 0.5, 2.5 - 4 * x), 0, 1)
    elif name in ("cool", "cold"):
        k = np.arange(64) / 63.0
        r, g, b = k, 1 - k, np.ones(64)
    elif name == "hot":
        n = np.arange(64, dtype=np.float64)
        r = np.minimum(1, 2.5 * n / 63)
        g = np.clip((2.5 * n - 63) / 63, 0, 1)
        b = np.clip((5 * n - 252) / 63, 0, 1)
    else:
        raise ValueError(f"unknown colour map {name!r}")
    return r.astype(_F32), g.astype(_F32), b.astype(_F32)


@functools.lru_cache(maxsize=8)
def table(name: str) -> np.ndarray:
    """RGB table, shape (256, 3) uint8, of ``jet``, ``cool`` (alias ``cold``) or ``hot``."""
    keys = _keys(name)
    x, xi = _grid(len(keys[0])), _grid(256)
    hi = np.clip(np.searchsorted(x, xi, side="left"), 1, len(x) - 1)
    lo = hi - 1
    channels = []
    for y in keys:
        v = (y[lo] + ((xi - x[lo]) * (y[hi] - y[lo])) / (x[hi] - x[lo])).astype(_F32)
        channels.append(np.clip(np.rint(v * _F32(255)), 0, 255).astype(np.uint8))
    out = np.stack(channels, axis=1)
    out.flags.writeable = False
    return out
