"""VisiOmatic 3 display transforms (policy §3, visiomatic.md §3): pure numpy, arrays in and out.

These are the VisiOmatic 3 server's formulas, used for requests in its dialect: background
statistics and default cuts, the mono and colour conversions to 8 bits, its colour maps, and
the Bresenham line of its profiles. Tiles are ``(height, width, channels)`` float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from iipserver import colormaps

_F32 = np.float32

#: Largest multiplier used when a channel's range is empty (VisiOmatic's ``maxfac``).
MAX_FACTOR = 1.0e30


def background(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Background level and MAD per channel, as VisiOmatic 3 computes them.

    Args:
        rows: ``(channels, n)`` samples (every 16th image row, flattened), any dtype.

    Returns:
        (level, mad), each a float32 array with one value per channel.
    """
    x = rows.astype(_F32)
    level = np.full(x.shape[0], np.nan, dtype=_F32)
    mad = np.full(x.shape[0], np.nan, dtype=_F32)
    usable = np.isfinite(x).any(axis=1)  # an all-NaN channel has no background: NaN, no warning
    if usable.any():
        level[usable], mad[usable] = _background(x[usable] if not usable.all() else x)
    return level, mad


def _background(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``background`` of channels that each hold a finite sample; ``x`` is modified."""
    with np.errstate(all="ignore"):
        # means accumulate in double and are stored as float: float32 pairwise sums differ
        # between numpy releases, the correctly rounded mean does not
        norm = _F32(abs(np.nanmean(x, dtype=np.float64)))
        if norm > 0.0:
            x /= norm
        else:
            norm = _F32(1.0)
        med = np.nanmedian(x, axis=1, keepdims=True)
        std = np.nanstd(x, axis=1, dtype=np.float64).astype(_F32)
        ax = np.abs(x - med)
        mad = np.nanmedian(ax, axis=1, keepdims=True)
        x[ax > 3.0 * mad] = np.nan
        med = np.nanmedian(x, axis=1, keepdims=True)
        ax = np.abs(x - med)
        mad = np.nanmedian(ax, axis=1)
        tiny = 1e5 * mad < std
        mad[tiny] = 0.1 * std[tiny]
        level = norm * np.nanmean(3.5 * med - 2.5 * x, axis=1, dtype=np.float64).astype(_F32)
    return np.asarray(level, dtype=_F32), np.asarray(norm * mad, dtype=_F32)


def default_cuts(level: np.ndarray, mad: np.ndarray) -> np.ndarray:
    """Display cuts per channel: ``[level - 2·MAD, level + 400·MAD]``, shape (channels, 2)."""
    return np.array([level - 2.0 * mad, level + 400.0 * mad], dtype=_F32).T


def mix_matrix(channels: int, mix: Sequence[tuple[int, float, float, float]]) -> np.ndarray:
    """The 3 × channels colour matrix: MIX weights (1-based channels) interpolated over the
    channel index and scaled by 3/channels; all ones without MIX."""
    if not mix:
        return np.ones((3, channels), dtype=_F32)
    indices = np.arange(channels, dtype=_F32)
    known = np.array([m[0] for m in mix], dtype=int) - 1
    weights = np.array([m[1:] for m in mix], dtype=_F32)
    matrix = np.empty((3, channels), dtype=_F32)
    for row in range(3):
        matrix[row] = np.interp(indices, known, weights[:, row]) * 3 / channels
    return matrix


def _stretch(data: np.ndarray, lo: Any, factor: Any, offset: float) -> np.ndarray:
    out = np.nan_to_num(data - lo, nan=0.0, copy=False) * factor + offset
    return np.asarray(out, dtype=_F32)


def _to_bytes(values: np.ndarray, gamma: float, invert: bool) -> np.ndarray:
    values[values < 0.0] = 0.0
    values[values > 1.0] = 1.0
    inverse = 1.0 / gamma if gamma > 0.01 else 0.01
    out = (255.49 * np.power(values, inverse)).astype(np.uint8)
    return 255 - out if invert else out


def mono(
    tile: np.ndarray,
    cuts: tuple[float, float],
    brightness: float,
    contrast: float,
    gamma: float,
    invert: bool,
    colormap: str,
) -> np.ndarray:
    """One channel ``(h, w)`` to bytes: ``(x-min)·CNT/(max-min) + 0.01·CNT·BRT``, clipped,
    ``^(1/GAM)``, ×255.49 truncated, inverted, then a colour map (``grey`` keeps one channel)."""
    span = cuts[1] - cuts[0]
    factor = contrast / span if span > 0.0 else MAX_FACTOR
    values = _stretch(
        tile.astype(_F32, copy=True), _F32(cuts[0]), _F32(factor), 0.01 * contrast * brightness
    )
    grey = _to_bytes(values, gamma, invert)
    if colormap == "grey":
        return grey[:, :, None]
    return colormap_table(colormap)[grey]


def colour(
    tile: np.ndarray,
    cuts: np.ndarray,
    matrix: np.ndarray,
    brightness: float,
    contrast: float,
    gamma: float,
    invert: bool,
) -> np.ndarray:
    """All channels ``(h, w, c)`` to RGB bytes through the colour matrix (3 × c)."""
    span = (cuts[:, 1] - cuts[:, 0]).astype(_F32)
    span[span <= 0] = MAX_FACTOR
    factor = (contrast / span).astype(_F32)
    values = _stretch(
        tile.astype(_F32, copy=True), cuts[:, 0].astype(_F32), factor, 0.01 * contrast * brightness
    )
    h, w, c = values.shape
    rgb = (values.reshape(h * w, c) @ matrix.T.astype(_F32)).reshape(h, w, 3).astype(_F32)
    return _to_bytes(rgb, gamma, invert)


def colormap_table(name: str) -> np.ndarray:
    """256 × 3 uint8 RGB table of a colour map (``jet``, ``cool``/``cold``, ``hot``)."""
    return colormaps.table(name)


def line(x0: int, y0: int, x1: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of the inclusive Bresenham line from (x0, y0) to (x1, y1): arrays of x and y.

    Steps along the longer axis; the other coordinate advances when the error term reaches
    zero (the rule of scikit-image's ``draw.line``, which VisiOmatic 3 uses).
    """
    r, c, r1, c1 = y0, x0, y1, x1
    dr, dc = abs(r1 - r), abs(c1 - c)
    sr = 1 if r1 - r > 0 else -1
    sc = 1 if c1 - c > 0 else -1
    steep = dr > dc
    if steep:
        r, c = c, r
        dr, dc = dc, dr
        sr, sc = sc, sr
    d = 2 * dr - dc
    rows = np.empty(dc + 1, dtype=np.intp)
    cols = np.empty(dc + 1, dtype=np.intp)
    for i in range(dc):
        rows[i], cols[i] = (c, r) if steep else (r, c)
        while d >= 0:
            r += sr
            d -= 2 * dc
        c += sc
        d += 2 * dr
    rows[dc], cols[dc] = y1, x1
    return cols, rows
