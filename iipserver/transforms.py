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

    As iipsrv: the bounds are floats, ``max - min`` is a float difference, its inverse is
    computed in double and stored as float (``1e30`` when ``|max - min| <= 1e-30``), and
    ``(v - min) * inv`` is float arithmetic. Non-finite float inputs give 0.
    """
    channels = tile.shape[2]
    lo = np.array([mins[c] for c in range(channels)], dtype=_F32)
    diff = np.array([maxs[c] for c in range(channels)], dtype=_F32) - lo
    safe = np.where(np.abs(diff) > 1e-30, diff, _F32(1)).astype(np.float64)
    inv = np.where(np.abs(diff) > 1e-30, 1.0 / safe, 1e30).astype(_F32)
    out = tile.astype(_F32, copy=True)
    bad = ~np.isfinite(out) if tile.dtype.kind == "f" else None
    with np.errstate(invalid="ignore", over="ignore"):
        out -= lo
        out *= inv
    if bad is not None and bad.any():
        out[bad] = 0
    return out


def gamma(tile: np.ndarray, exponent: float) -> np.ndarray:
    """``max(v, 0) ** exponent`` in float32 (identity when the exponent is 1)."""
    if exponent == 1.0:
        return tile
    return np.power(np.maximum(tile, _F32(0)), _F32(exponent), dtype=_F32)


#: ``1 / logf(256)`` computed as iipsrv does (double division stored as float).
_LOG_SCALE = _F32(1.0 / float(np.log(_F32(256))))


def log_gamma(tile: np.ndarray) -> np.ndarray:
    """``log(1 + 255 v) / log(256)`` in float32 (mainline's ``GAM=log``)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (_LOG_SCALE * np.log(_F32(1) + tile * _F32(255), dtype=_F32)).astype(_F32)


def twist(tile: np.ndarray, matrix: Sequence[Sequence[float]]) -> np.ndarray:
    """Recombine channels with ``matrix`` (rows = output channels), keeping the channel count.

    iipsrv 1.1 semantics: only the first ``min(rows, channels)`` rows are used, each row's
    coefficients beyond the channel count are ignored and missing ones count as 0; output
    channels without a row become 0 (1.1 leaves them undefined). Accumulation is float32 in
    column order, skipping zero coefficients, as iipsrv does.
    """
    channels = tile.shape[2]
    out = np.zeros_like(tile, dtype=_F32)
    for k, row in enumerate(matrix[:channels]):
        acc = out[:, :, k]
        for j, m in enumerate(row[:channels]):
            if m == 0:
                continue
            acc += tile[:, :, j] if m == 1 else tile[:, :, j] * _F32(m)
    return out


def shade(tile: np.ndarray, h_angle: int, v_angle: int) -> np.ndarray:
    """Hill-shading of a 3-channel normal map lit from (h_angle, v_angle) degrees; 1 channel out."""
    a = _F32(h_angle * 2 * np.pi / 360.0)
    s_y = _F32(np.cos(a))
    s_x = _F32(np.sqrt(1.0 - float(s_y) * float(s_y)))
    if h_angle > 180:
        s_x = -s_x
    s_z = _F32(-np.sin(_F32(v_angle * 2 * np.pi / 360.0)))
    norm = _F32(np.sqrt(s_x * s_x + s_y * s_y + s_z * s_z))
    s = np.array([s_x / norm, s_y / norm, s_z / norm], dtype=_F32)
    if tile.shape[2] < 3:
        return tile[:, :, :1]
    p = tile[:, :, :3].astype(_F32)
    o = -(p - _F32(0.5)) * _F32(2.0)
    o[np.all(p == 0, axis=2)] = 0
    dot = (s[0] * o[:, :, 0] + s[1] * o[:, :, 1]) + s[2] * o[:, :, 2]
    dot = np.clip(_F32(0.5) * dot, 0, 1)
    return dot.astype(_F32)[:, :, None]


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
