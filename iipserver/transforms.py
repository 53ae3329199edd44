"""Pure numpy image transforms in iipsrv 1.1's formulas (spec §10): arrays in, arrays out.

Arrays are ``(height, width, channels)``. Float stages work on float32 as iipsrv does; no
function reads settings, does I/O or keeps state.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_F32 = np.float32
_THIRD = _F32(1.0 / 3.0)


def normalise(tile: np.ndarray, mins: Sequence[float], maxs: Sequence[float]) -> np.ndarray:
    """Map each channel c from [mins[c], maxs[c]] to [0, 1] in float32 (no clipping).

    ``1/(max-min)`` is computed in double and stored as float (``1e30`` when the range is
    ≤ 1e-30); non-finite float inputs become 0.
    """
    channels = tile.shape[2]
    lo = np.array([float(mins[c]) for c in range(channels)], dtype=np.float64)
    span = np.array([float(maxs[c]) for c in range(channels)], dtype=np.float64) - lo
    inv = np.where(np.abs(span) <= 1e-30, 1e30, 1.0 / np.where(span == 0, 1.0, span)).astype(_F32)
    out = tile.astype(_F32, copy=True)
    if tile.dtype.kind == "f":
        out[~np.isfinite(out)] = 0
    out -= lo.astype(_F32)
    out *= inv
    return out


def gamma(tile: np.ndarray, exponent: float) -> np.ndarray:
    """``max(v, 0) ** exponent`` in float32 (identity when the exponent is 1)."""
    if exponent == 1.0:
        return tile
    return np.power(np.maximum(tile, _F32(0)), _F32(exponent), dtype=_F32)


def log_gamma(tile: np.ndarray) -> np.ndarray:
    """``log(1 + 255 v) / log(256)`` in float32 (mainline's ``GAM=log``)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.log1p(tile * _F32(255), dtype=_F32) / np.log(_F32(256))).astype(_F32)


def invert(tile: np.ndarray) -> np.ndarray:
    """``1 - v`` on every channel, unclipped."""
    return (_F32(1) - tile).astype(_F32)


def _hot(v: np.ndarray) -> np.ndarray:
    r = np.select([v < _THIRD, v < 2 * _THIRD], [3 * v, 1], 1)
    g = np.select([v < _THIRD, v < 2 * _THIRD, v < 1], [0, 3 * v - 1, 1], 1)
    b = np.select([v < 2 * _THIRD, v < 1], [0, 3 * v - 2], 1)
    return np.stack([r, g, b], axis=-1)


def _cold(v: np.ndarray) -> np.ndarray:
    return _hot(v)[..., ::-1]


def _jet(v: np.ndarray) -> np.ndarray:
    conds = [v < 0.125, v < 0.375, v < 0.625, v < 0.875, v < 1]
    r = np.select(conds, [0, 0, 4 * v - 1.5, 1, 4.5 - 4 * v], 0.5)
    g = np.select(conds, [0, 4 * v - 0.5, 1, 3.5 - 4 * v, 0], 0)
    b = np.select(conds, [4 * v + 0.5, 1, 2.5 - 4 * v, 0, 0], 0)
    out = np.stack([r, g, b], axis=-1)
    out[v < 0] = 0
    return out


def colormap(tile: np.ndarray, name: str) -> np.ndarray:
    """Map the first channel through a colour map (hot, cold, jet, red, green, blue) to RGB.

    Any other name leaves the tile unchanged, as iipsrv does.
    """
    name = name.lower()
    v = tile[..., 0].astype(_F32)
    if name in ("hot", "cold"):
        with np.errstate(invalid="ignore"):
            out = _hot(v) if name == "hot" else _cold(v)
            out[v <= 0] = 0
            out[(v > 1) | np.isnan(v)] = 1
        return out.astype(_F32)
    if name == "jet":
        with np.errstate(invalid="ignore"):
            out = _jet(v)
        out[np.isnan(v)] = (0.5, 0, 0)
        return out.astype(_F32)
    if name in ("red", "green", "blue"):
        out = np.zeros((*v.shape, 3), dtype=_F32)
        out[..., ("red", "green", "blue").index(name)] = v
        return out
    return tile


def quantise(tile: np.ndarray, contrast: float = 1.0) -> np.ndarray:
    """Scale [0, 1] floats to bytes: ``v·255·contrast``, truncated, clipped, NaN → 255.

    As iipsrv 1.1: ``v·255`` in double times the contrast, stored as float, then truncated.
    """
    scaled = (tile.astype(np.float64) * 255.0 * contrast).astype(_F32)
    np.nan_to_num(scaled, copy=False, nan=255.0, posinf=255.0, neginf=0.0)
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)


def flatten(tile: np.ndarray) -> np.ndarray:
    """Reduce channels for output: 2 → 1 and more than 3 → 3 (extra bands dropped)."""
    channels = tile.shape[2]
    if channels == 2:
        return tile[:, :, :1]
    if channels > 3:
        return tile[:, :, :3]
    return tile


def greyscale(tile: np.ndarray) -> np.ndarray:
    """8-bit RGB to grey with iipsrv's integer Rec.709 weights."""
    rgb = tile.astype(np.uint32)
    y = (1254097 * rgb[..., 0] + 2462056 * rgb[..., 1] + 478151 * rgb[..., 2]) >> 22
    return y.astype(np.uint8)[:, :, None]


def orient(tile: np.ndarray, angle: float, flip: int) -> np.ndarray:
    """Flip (1 horizontal, 2 vertical) then rotate clockwise by a multiple of 90 degrees.

    Angles that are not multiples of 90 are ignored, as iipsrv does.
    """
    if flip == 1:
        tile = tile[:, ::-1]
    elif flip == 2:
        tile = tile[::-1]
    turns = int(angle) // 90 % 4 if int(angle) % 90 == 0 else 0
    if turns:
        tile = np.rot90(tile, k=-turns, axes=(0, 1))
    return tile
