"""Pure numpy image transforms in iipsrv 1.1's formulas (spec §10): arrays in, arrays out.

Arrays are ``(height, width, channels)``. Float stages work on float32 as iipsrv does; no
function reads settings, does I/O or keeps state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
        if np.all(lo == lo[0]) and np.all(inv == inv[0]):  # one range: fast scalar broadcast
            out -= lo[0]
            out *= inv[0]
        else:  # a length-3 inner broadcast is slow in numpy: go channel by channel
            for c in range(channels):
                plane = out[:, :, c]
                plane -= lo[c]
                plane *= inv[c]
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


# Colour maps as pieces: the piece of v is the number of edges <= v; in each piece a channel is
# ``a·v + b`` computed in double and stored as float, as iipsrv's ``3.*value-1.`` expressions.
_HOT_EDGES = (_THIRD, 2 * _THIRD, _F32(1))
_HOT = (  # (a, b) per piece for R, G, B
    ((3.0, 0.0), (0.0, 1.0), (0.0, 1.0), (0.0, 1.0)),
    ((0.0, 0.0), (3.0, -1.0), (0.0, 1.0), (0.0, 1.0)),
    ((0.0, 0.0), (0.0, 0.0), (3.0, -2.0), (0.0, 1.0)),
)
_JET_EDGES = (_F32(0.125), _F32(0.375), _F32(0.625), _F32(0.875), _F32(1))
_JET = (
    ((0.0, 0.0), (0.0, 0.0), (4.0, -1.5), (0.0, 1.0), (-4.0, 4.5), (0.0, 0.5)),
    ((0.0, 0.0), (4.0, -0.5), (0.0, 1.0), (-4.0, 3.5), (0.0, 0.0), (0.0, 0.0)),
    ((4.0, 0.5), (0.0, 1.0), (-4.0, 2.5), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)),
)


def _pieces(
    v: np.ndarray,
    edges: tuple[np.float32, ...],
    channels: tuple[tuple[tuple[float, float], ...], ...],
) -> np.ndarray:
    piece = np.zeros(v.shape, dtype=np.intp)
    for edge in edges:
        piece += v >= edge
    d = np.clip(v.astype(np.float64), -1.0, 2.0)
    out = np.empty((*v.shape, 3), dtype=_F32)
    for c, coefficients in enumerate(channels):
        a = np.array([ab[0] for ab in coefficients])[piece]
        b = np.array([ab[1] for ab in coefficients])[piece]
        out[..., c] = a * d + b
    return out


def _hot(v: np.ndarray) -> np.ndarray:
    out = _pieces(v, _HOT_EDGES, _HOT)
    out[v <= 0] = 0
    out[np.isnan(v)] = 1  # every comparison fails: iipsrv's last branch
    return out


def _cold(v: np.ndarray) -> np.ndarray:
    return _hot(v)[..., ::-1]


def _jet(v: np.ndarray) -> np.ndarray:
    out = _pieces(v, _JET_EDGES, _JET)
    out[v < 0] = 0
    out[np.isnan(v)] = (0.5, 0, 0)
    return out


def colormap(tile: np.ndarray, name: str) -> np.ndarray:
    """Map the first channel through a colour map (hot, cold, jet, red, green, blue) to RGB.

    Any other name leaves the tile unchanged, as iipsrv does.
    """
    name = name.lower()
    v = tile[..., 0].astype(_F32)
    if name in ("hot", "cold", "jet"):
        with np.errstate(invalid="ignore"):
            return {"hot": _hot, "cold": _cold, "jet": _jet}[name](v)
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


# --- resampling (8-bit data, iipsrv 1.1's formulas) --------------------------------------------

#: Output rows resampled per block, to bound the index arrays' memory.
_RESAMPLE_ROWS = 256


def resize_nearest(tile: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest neighbour: source index ``floor(i · (w/W'))`` with float32 scales."""
    h, w = tile.shape[:2]
    xs, ys = _F32(w) / _F32(width), _F32(h) / _F32(height)
    cols = np.floor(np.arange(width, dtype=_F32) * xs).astype(np.intp)
    rows = np.floor(np.arange(height, dtype=_F32) * ys).astype(np.intp)
    return tile[np.minimum(rows, h - 1)][:, np.minimum(cols, w - 1)]


def resize_bilinear(tile: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear interpolation as iipsrv 1.1 computes it, in float32, truncated to bytes.

    The right-hand neighbour of the last column is the first pixel of the next row, as in 1.1;
    indices past the last pixel are clamped to it (1.1 reads one pixel beyond its buffer there).
    Computed separably with 1.1's operations in 1.1's order (so the same bytes): each source
    row is interpolated across once, then output rows mix two of those.
    """
    h, w, c = tile.shape
    last_pixel = tile[h - 1, w - 1]
    ext = np.empty((h + 1, w + 1, c), dtype=tile.dtype)  # the neighbours 1.1's indices reach
    ext[:h, :w] = tile
    ext[: h - 1, w] = tile[1:, 0]
    ext[h - 1, w] = last_pixel
    ext[h] = last_pixel
    xs, ys = _F32(w) / _F32(width), _F32(h) / _F32(height)
    i_scaled = np.arange(width, dtype=_F32) * xs
    ii = np.floor(i_scaled).astype(np.intp)
    a = ((ii + 1).astype(_F32) - i_scaled)[None, :, None]
    b = (i_scaled - ii.astype(_F32))[None, :, None]
    j_scaled = np.arange(height, dtype=_F32) * ys
    jj = np.floor(j_scaled).astype(np.intp)
    rows = np.unique(np.concatenate([jj, jj + 1]))
    where = np.searchsorted(rows, np.arange(h + 1))
    across = ext[rows].reshape(len(rows), (w + 1) * c)
    cols = (ii[:, None] * c + np.arange(c)).ravel()  # (pixel, channel) columns of a flat row
    a = np.repeat(a.ravel(), c)[None, :]
    b = np.repeat(b.ravel(), c)[None, :]
    # per source row: left·a + right·b (1.1's tx for that row, and its ty one row up)
    left = np.take(across, cols, axis=1).astype(_F32)
    right = np.take(across, cols + c, axis=1).astype(_F32)
    mixed = (left * a + right * b).reshape(len(rows), width, c)
    out = np.empty((height, width, c), dtype=np.uint8)
    for start in range(0, height, _RESAMPLE_ROWS):
        part = slice(start, min(height, start + _RESAMPLE_ROWS))
        cw = ((jj[part] + 1).astype(_F32) - j_scaled[part])[:, None, None]
        dw = (j_scaled[part] - jj[part].astype(_F32))[:, None, None]
        block = cw * mixed[where[jj[part]]] + dw * mixed[where[jj[part] + 1]]
        out[part] = np.clip(block, 0, 255).astype(np.uint8)
    return out


# --- histogram-based operations (spec §10; docs/iipsrv-1.1-notes.md §3–4) ---------------------


def histogram(tile: np.ndarray) -> np.ndarray:
    """256-bin histogram of the per-pixel channel average of an 8-bit tile (C ``round``)."""
    total = tile.astype(_F32).sum(axis=2, dtype=_F32)
    bins = np.floor(total / _F32(tile.shape[2]) + _F32(0.5)).astype(np.intp)
    return np.bincount(np.clip(bins, 0, 255).ravel(), minlength=256)[:256]


def equalise(tile: np.ndarray, hist: np.ndarray) -> np.ndarray:
    """Histogram equalisation of every byte through iipsrv's LUT built from ``hist``."""
    nonzero = np.flatnonzero(hist)
    if nonzero.size == 0:
        return tile
    cdf = np.cumsum(hist.astype(_F32), dtype=_F32)
    scale = _F32(255) / cdf[255]
    cdfmin = cdf[nonzero[0]] / _F32(tile.shape[0] * tile.shape[1])
    lut = np.floor(np.abs(scale * (cdf - cdfmin)) + _F32(0.5)) * np.sign(scale * (cdf - cdfmin))
    return np.clip(lut, 0, 255).astype(np.uint8)[tile]


def stretch_range(hist: np.ndarray, bits: int, integer: bool) -> tuple[float, float]:
    """Contrast-stretch bounds: first and last non-empty bins (shifted for >8-bit integers)."""
    nonzero = np.flatnonzero(hist)
    if nonzero.size == 0:
        return 0.0, 255.0
    lo, hi = int(nonzero[0]), int(nonzero[-1])
    if bits > 8 and integer:
        lo, hi = lo << (bits - 8), hi << (bits - 8)
    return float(lo), float(hi)


def otsu(hist: np.ndarray) -> int:
    """Otsu threshold over ``hist`` (float32 sums; ties keep the lowest bin)."""
    counts = hist.astype(_F32)
    total = _F32(counts.sum(dtype=np.float64))
    levels = np.arange(256, dtype=_F32)
    weighted_total = _F32(0)
    for n in range(256):
        weighted_total = _F32(weighted_total + levels[n] * counts[n])
    wb = _F32(0)
    sumb = _F32(0)
    best, threshold = _F32(0), 0
    for n in range(256):
        wb = _F32(wb + counts[n])
        if wb == 0:
            continue
        wf = _F32(total - wb)
        if wf == 0:
            break
        sumb = _F32(sumb + levels[n] * counts[n])
        mb, mf = _F32(sumb / wb), _F32((weighted_total - sumb) / wf)
        diff = _F32(_F32(_F32(wb * wf) * _F32(mb - mf)) * _F32(mb - mf))
        if diff > best:
            best, threshold = diff, n
    return threshold


def binarise(tile: np.ndarray, threshold: int) -> np.ndarray:
    """Grey (if RGB) then ``< threshold → 0, else 255``; one channel out."""
    grey = greyscale(tile) if tile.shape[2] == 3 else tile[:, :, :1]
    return np.where(grey < threshold, np.uint8(0), np.uint8(255))


# --- colour -------------------------------------------------------------------------------------

_D65 = (95.047, 100.0, 108.8827)
_LAB_TO_SRGB = np.array(
    [
        [3.240479, -1.537150, -0.498535],
        [-0.969256, 1.875992, 0.041556],
        [0.055648, -0.204043, 1.057311],
    ],
    dtype=np.float32,
)


def lab_to_srgb(tile: np.ndarray) -> np.ndarray:
    """8-bit CIELAB (L scaled 0–255, a/b signed bytes) to 8-bit sRGB, D65, as iipsrv 1.1."""
    lab = tile[:, :, :3]
    big_l = (lab[:, :, 0].astype(np.float64) / 2.55).astype(_F32).astype(np.float64)
    a = lab[:, :, 1].view(np.int8).astype(np.float64)
    b = lab[:, :, 2].view(np.int8).astype(np.float64)
    dark = big_l < 8.0
    y = np.where(dark, big_l * _D65[1] / 903.3, 0.0)
    cby = np.where(dark, 7.787 * (y.astype(_F32) / _D65[1]) + 16.0 / 116.0, (big_l + 16.0) / 116.0)
    y = np.where(dark, y, _D65[1] * cby**3).astype(_F32).astype(np.float64)

    def axis(t: np.ndarray, white: float) -> np.ndarray:
        return np.where(t < 0.2069, white * (t - 0.13793) / 7.787, white * t**3).astype(_F32)

    x = axis(a / 500.0 + cby, _D65[0]).astype(np.float64) / 100.0
    z = axis(cby - b / 200.0, _D65[2]).astype(np.float64) / 100.0
    y = y / 100.0
    xyz = np.stack([x, y, z], axis=-1).astype(_F32).astype(np.float64)
    rgb = np.maximum(xyz @ _LAB_TO_SRGB.astype(np.float64).T, 0.0)
    rgb = np.where(rgb <= 0.0031308, rgb * 12.92, 1.055 * np.power(rgb, 1.0 / 2.4) - 0.055)
    return np.minimum(rgb * 255.0, 255.0).astype(np.uint8)


# --- tone curves through a lookup table ---------------------------------------------------------

#: Colour-map breakpoints: inside one piece every output channel is linear in its input.
_PIECES = {
    "hot": (0.0, 1 / 3, 2 / 3, 1.0),
    "cold": (0.0, 1 / 3, 2 / 3, 1.0),
    "jet": (0.0, 0.125, 0.375, 0.625, 0.875, 1.0),
}


@dataclass(frozen=True)
class Tone:
    """The per-value stages after CTW: gamma (or log) → invert → colour map → contrast/quantise."""

    gamma: float = 1.0
    log: bool = False
    invert: bool = False
    colormap: str | None = None
    contrast: float = 1.0

    def exact(self, data: np.ndarray) -> np.ndarray:
        """Apply the stages directly (float32 arithmetic as iipsrv), to 8-bit output."""
        data = log_gamma(data) if self.log else gamma(data, self.gamma)
        if self.invert:
            data = invert(data)
        if self.colormap is not None:
            data = colormap(data, self.colormap)
        return quantise(data, self.contrast)

    def _before_colormap(self, data: np.ndarray) -> np.ndarray:
        data = log_gamma(data) if self.log else gamma(data, self.gamma)
        return invert(data) if self.invert else data


#: Bits of a float32 value dropped to form its table bucket (32 - 12 = 20-bit buckets).
_TONE_SHIFT = 12


@dataclass(frozen=True)
class ToneTable:
    """Output per float32 bucket (the top 20 bits of the value), flagged where it varies.

    ``packed`` holds the output byte(s) and a flag set where the output is not constant over
    the bucket: uint16 (byte 0, flag in byte 1) for one output channel, uint32 (R, G, B in
    bytes 0–2, flag in byte 3) for a colour map. The finite
    buckets that vary (a few hundred: where the output steps) have a block of the exact
    output of each of their 4096 values: ``block_of[bucket]`` is the row of ``blocks``
    (-1 for none); values in no block (non-finite ones) are computed exactly.
    """

    packed: np.ndarray
    colour: bool
    block_of: np.ndarray | None = None
    blocks: np.ndarray | None = None
    """(blocks, 4096, output channels) uint8."""


#: Most varying buckets given a block of exact outputs (4 KiB, or 12 KiB for colour, each).
MAX_BLOCKS = 4096


def _bucket_table(
    exact: Callable[[np.ndarray], np.ndarray],
    before_colormap: Callable[[np.ndarray], np.ndarray] | None,
    colormap: str | None,
) -> ToneTable:
    """Table of ``exact`` over the 2^20 float32 buckets (the top 20 bits of a value).

    ``exact`` must be monotone within each colour-map piece (pieces are found by applying
    ``before_colormap``): then a bucket whose two ends give the same bytes is constant, and
    the others are flagged to be computed exactly.
    """
    keys = np.arange(1 << (32 - _TONE_SHIFT), dtype=np.uint32) << _TONE_SHIFT
    ends = [keys.view(_F32), (keys | ((1 << _TONE_SHIFT) - 1)).view(_F32)]
    with np.errstate(all="ignore"):
        out = [exact(e.reshape(-1, 1, 1)).reshape(len(keys), -1) for e in ends]
        varies = np.any(out[0] != out[1], axis=1)
        varies |= (keys >> 23 & 0xFF) == 0xFF  # infinities and NaNs
        if colormap in _PIECES and before_colormap is not None:
            edges = np.array(_PIECES[colormap], dtype=_F32)
            inputs = [before_colormap(e.reshape(-1, 1, 1)).ravel() for e in ends]
            varies |= np.searchsorted(edges, inputs[0]) != np.searchsorted(edges, inputs[1])
            varies |= np.isnan(inputs[0]) | np.isnan(inputs[1])
    channels = out[0].shape[1]
    if channels == 1:  # half the memory, so more of the table stays in the CPU cache
        packed = out[0][:, 0].astype(np.uint16) | (varies.astype(np.uint16) << 8)
    else:
        packed = np.zeros(len(keys), dtype=np.uint32)
        for channel in range(channels):
            packed |= out[0][:, channel].astype(np.uint32) << (8 * channel)
        packed |= varies.astype(np.uint32) << 24
    finite = np.flatnonzero(varies & ((keys >> 23 & 0xFF) != 0xFF))
    if finite.size > MAX_BLOCKS:
        return ToneTable(packed, channels == 3)
    block_of = np.full(len(keys), -1, dtype=np.int32)
    block_of[finite] = np.arange(finite.size, dtype=np.int32)
    low = np.arange(1 << _TONE_SHIFT, dtype=np.uint32)
    blocks = np.empty((finite.size, 1 << _TONE_SHIFT, channels), dtype=np.uint8)
    with np.errstate(all="ignore"):
        for start in range(0, finite.size, 256):
            part = keys[finite[start : start + 256], None] | low[None, :]
            values = part.reshape(-1, 1, 1).view(_F32)
            blocks[start : start + 256] = exact(values).reshape(-1, 1 << _TONE_SHIFT, channels)
    return ToneTable(packed, channels == 3, block_of, blocks)


@functools.lru_cache(maxsize=8)
def tone_table(tone: Tone) -> ToneTable:
    """Build the table for ``tone``: each output is monotone in the value within a colour-map
    piece, so a bucket whose two ends give the same bytes (and lie in one piece) is constant."""
    return _bucket_table(tone.exact, tone._before_colormap, tone.colormap)


def _lookup(
    data: np.ndarray, table: ToneTable, exact: Callable[..., np.ndarray], by_position: bool = False
) -> np.ndarray:
    """Float32 ``data`` through ``table``; flagged buckets through ``exact``, which is given
    the flagged values as (n, 1, 1), and with ``by_position`` also their flat positions."""
    data = np.ascontiguousarray(data, dtype=_F32)
    channels = 3 if table.colour else 1

    def compute(values: np.ndarray, fix: np.ndarray) -> np.ndarray:
        """Exact outputs (n, channels) of the flagged values: from the blocks, else computed."""
        bits = values.reshape(-1).view(np.uint32)[fix]
        result = np.empty((fix.size, channels), dtype=np.uint8)
        rest = np.arange(fix.size)
        if table.block_of is not None and table.blocks is not None:
            block = table.block_of[bits >> _TONE_SHIFT]
            found = block >= 0
            result[found] = table.blocks[block[found], bits[found] & ((1 << _TONE_SHIFT) - 1)]
            rest = np.flatnonzero(~found)
        if rest.size:
            picked = values.reshape(-1)[fix[rest]].reshape(-1, 1, 1)
            done = exact(picked, fix[rest]) if by_position else exact(picked)
            result[rest] = done.reshape(rest.size, channels)
        return result

    if table.colour:  # a colour map reads channel 0 and writes RGB
        values = np.ascontiguousarray(data[:, :, 0])
        looked = np.take(table.packed, values.view(np.uint32) >> _TONE_SHIFT)
        fix = np.flatnonzero(looked >= 1 << 24)
        rgba = looked.view(np.uint8).reshape(*values.shape, 4)
        if fix.size:
            rgba.reshape(-1, 4)[fix, :3] = compute(values, fix).reshape(-1, 3)
        return np.ascontiguousarray(rgba[:, :, :3])
    looked = np.take(table.packed, data.view(np.uint32) >> _TONE_SHIFT)
    fix = np.flatnonzero(looked >= 1 << 8)
    out = looked.astype(np.uint8)
    if fix.size:
        out.reshape(-1)[fix] = compute(data, fix).ravel()
    return out


def apply_tone(data: np.ndarray, tone: Tone, table: ToneTable | None = None) -> np.ndarray:
    """``tone.exact(data)`` through ``table`` (by default the cached ``tone_table(tone)``)."""
    return _lookup(data, tone_table(tone) if table is None else table, tone.exact)


# --- the whole chain from stored values, through one table --------------------------------------


@dataclass(frozen=True)
class Levels:
    """normalise → CTW → tone when every channel goes through the same one-value function:
    one channel (a CTW on it is one coefficient), or several with one range, no CTW and no
    colour map. Such a chain can be tabulated over the stored values themselves, skipping
    the float32 copy that normalising makes (spec §10 order, same arithmetic).
    """

    low: float
    high: float
    twist: tuple[tuple[float, ...], ...] | None
    tone: Tone

    def exact(self, data: np.ndarray) -> np.ndarray:
        """The chain computed directly (``data`` as stored, any dtype)."""
        channels = data.shape[2]
        out = normalise(data, [self.low] * channels, [self.high] * channels)
        if self.twist is not None:
            out = twist(out, self.twist)
        return self.tone.exact(out)

    def scale(self) -> np.float32:
        """The float32 factor normalising multiplies by (as ``normalise`` computes it)."""
        diff = _F32(self.high) - _F32(self.low)
        return _F32(1.0 / float(diff)) if abs(diff) > 1e-30 else _F32(1e30)

    def from_difference(self, difference: np.ndarray) -> np.ndarray:
        """The chain on ``value - low`` (float32), the first step of normalising."""
        with np.errstate(over="ignore", invalid="ignore"):
            out = difference * self.scale()
        if self.twist is not None:
            out = twist(out, self.twist)
        return self.tone.exact(out)

    def _before_colormap_difference(self, difference: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            out = difference * self.scale()
        if self.twist is not None:
            out = twist(out, self.twist)
        return self.tone._before_colormap(out)


#: Stored sample types tabulated exactly, one entry per possible value.
_DIRECT_TYPES = frozenset({"uint8", "int8", "uint16", "int16"})


def levels_supported(dtype: np.dtype) -> bool:
    """Tell whether ``apply_levels`` takes data of this type."""
    return dtype == np.float32 or dtype.name in _DIRECT_TYPES


@functools.lru_cache(maxsize=8)
def levels_table(levels: Levels) -> ToneTable:
    """Table of ``levels`` over float32 buckets of ``value - low`` (buckets of the stored
    value itself would be too coarse where the value is large and the range narrow). The
    chain is monotone within a colour-map piece: a product, a scalar CTW, the tone stages."""
    return _bucket_table(
        levels.from_difference, levels._before_colormap_difference, levels.tone.colormap
    )


@functools.lru_cache(maxsize=8)
def levels_lut(levels: Levels, dtype: str) -> np.ndarray:
    """Exact output for every value of an 8- or 16-bit type: (values, output channels)."""
    info = np.iinfo(dtype)
    values = np.arange(info.min, info.max + 1, dtype=np.int64).astype(dtype)
    with np.errstate(all="ignore"):
        out = levels.exact(values.reshape(-1, 1, 1))
    return np.ascontiguousarray(out.reshape(values.size, -1))


def apply_levels(data: np.ndarray, levels: Levels, table: ToneTable | None = None) -> np.ndarray:
    """``levels.exact(data)`` through a table (same bytes): for float32 data ``table``, by
    default the cached ``levels_table(levels)``; an exact per-value table for 8/16-bit data."""
    if data.dtype == np.float32:
        table = levels_table(levels) if table is None else table
        with np.errstate(over="ignore", invalid="ignore"):
            difference = np.subtract(data, _F32(levels.low), dtype=_F32)
        shape = data.shape
        raw = data.reshape(-1)

        def exact(_: np.ndarray, fix: np.ndarray) -> np.ndarray:
            return levels.exact(raw[fix].reshape(-1, 1, 1))

        return _lookup(difference.reshape(shape), table, exact, by_position=True)
    lut = levels_lut(levels, data.dtype.name)
    info = np.iinfo(data.dtype)
    index = data.astype(np.intp) - info.min if info.min else data
    if lut.shape[1] == 3:  # colour map on one channel
        return np.take(lut, index[:, :, 0], axis=0)
    return np.take(lut[:, 0], index)
