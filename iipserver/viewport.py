"""CVT geometry: the level, the region and the output size iipsrv 1.1 computes for WID/HEI/RGN.

Arithmetic follows iipsrv 1.1 step by step (float32 fractions, unsigned integer divisions, C
``round`` on floats), so output sizes equal the reference's (docs/iipsrv-1.1-notes.md §1). Where
1.1 crashes or reads out of bounds (a level below 0, a region starting at the level's edge, a
zero output size) the values are clamped instead (policy §2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_F32 = np.float32
_U32 = 1 << 32


def _f(value: float) -> float:
    """Round to float32 and back (one C float operation)."""
    return float(_F32(value))


def c_round(value: float) -> int:
    """C ``round``: halves away from zero."""
    return math.floor(abs(value) + 0.5) * (1 if value >= 0 else -1)


def _u32(value: float) -> int:
    """C conversion of a non-negative float to unsigned int (x86-64: out of range gives 0)."""
    if math.isnan(value) or value < 0 or value >= _U32:
        return 0
    return int(value)


@dataclass(frozen=True)
class Region:
    """A requested viewport as fractions of the full image (RGN), float32 values."""

    left: float = 0.0
    top: float = 0.0
    width: float = 1.0
    height: float = 1.0

    @classmethod
    def from_fractions(cls, x: float, y: float, w: float, h: float) -> Region:
        """Clamp as iipsrv's RGN does: x, y, w, h into [0, 1] and w shrunk to 1 - x."""
        left = _f(min(1.0, max(0.0, x)))
        top = _f(min(1.0, max(0.0, y)))
        if _f(left + _f(w)) > 1.0:
            w = _f(1.0 - left)
        return cls(left, top, _f(min(1.0, max(0.0, w))), _f(min(1.0, max(0.0, h))))

    @property
    def is_set(self) -> bool:
        """True when the region is not the whole image."""
        return self.width < 1 or self.height < 1 or self.left > 0 or self.top > 0


@dataclass(frozen=True)
class Plan:
    """What a CVT reads and writes: a level-``resolution`` rectangle and the output size."""

    resolution: int
    x: int
    y: int
    width: int
    height: int
    out_width: int
    out_height: int


def _calc(res: int, n: int, dim: int, req: int) -> int:
    rs = max(req, 1)
    j, d = 1, dim
    while d >= rs:
        d //= 2
        j += 1
    j = min(j, n + 1)
    return max(0, min(res, n - j + 1, n - 1))


def plan(
    full: tuple[int, int],
    levels: Sequence[tuple[int, int]],
    region: Region,
    requested: tuple[int, int],
    max_size: int,
    allow_upscaling: bool,
) -> Plan:
    """Choose the level and output size of a CVT as iipsrv 1.1 does.

    Args:
        full: full-resolution (width, height).
        levels: real (width, height) of each level, smallest first (IIP numbering).
        region: the RGN viewport.
        requested: (WID, HEI) as unsigned values, 0 = not given.
        max_size: MAX_CVT (-1: no limit).
        allow_upscaling: ALLOW_UPSCALING.
    """
    width, height = full
    n = len(levels)
    rw, rh = requested
    m = _U32 - 1 if max_size < 0 else max_size
    res = n - 1
    if rw:
        res = _calc(res, n, width, _u32(math.floor(_f(_f(rw) / region.width))))
    if rh:
        res = _calc(res, n, height, _u32(math.floor(_f(_f(rh) / region.height))))
    big_w, big_h = width >> (n - 1 - res), height >> (n - 1 - res)
    scale = _scale(width, big_w, big_h, rw, rh)
    sw, sh = _f(_f(big_w * region.width) * scale), _f(_f(big_h * region.height) * scale)
    if sw > m or sh > m:
        dim = int(sw) if big_w > big_h else int(sh)
        while dim > m:
            dim //= 2
            res -= 1
    res = max(res, 0)  # 1.1 goes below level 0 here and reads past its level list
    return _region_and_size(full, levels, res, region, (rw, rh), m, allow_upscaling)


def _scale(width: int, big_w: int, big_h: int, rw: int, rh: int) -> float:
    if rw == 0 and rh > 0:
        srw, srh = ((big_w * rh) % _U32) // big_h, rh
    elif rh == 0 and rw > 0:
        srw, srh = rw, ((big_h * rw) % _U32) // big_w
    else:
        srw, srh = rw, rh
    s = _f(_f(srw) / _f(width))
    s = min(s, _f(_f(srh) / _f(big_h)))
    return 1.0 if s <= 0 or s > 1 else s


def _view_size(full: int, k: int, fraction: float, offset: float) -> int:
    size = c_round(_f(_f(full) / k))
    w = c_round(_f(fraction * size))
    left = c_round(_f(offset * size))
    if w + left > size:
        w = size - left
    return max(w, 1)


def _region_and_size(
    full: tuple[int, int],
    levels: Sequence[tuple[int, int]],
    res: int,
    region: Region,
    requested: tuple[int, int],
    m: int,
    allow_upscaling: bool,
) -> Plan:
    width, height = full
    n = len(levels)
    k = 1 << (n - res - 1)
    level_w, level_h = levels[res]
    vw = _view_size(width, k, region.width, region.left)
    vh = _view_size(height, k, region.height, region.top)
    if region.is_set:
        left = c_round(_f(_f(_f(width) * region.left) / k))
        top = c_round(_f(_f(_f(height) * region.top) / k))
        left, top = min(left, level_w - 1), min(top, level_h - 1)  # 1.1: empty region, crash
        cut_w = max(1, min(vw, level_w - left))
        cut_h = max(1, min(vh, level_h - top))
    else:
        left = top = 0
        cut_w, cut_h = level_w, level_h
    rw, rh = requested
    ow = rw if rw else (c_round(_f(_f((vw * rh) % _U32) / _f(vh))) if rh else width)
    oh = rh if rh else (c_round(_f(_f((vh * rw) % _U32) / _f(vw))) if rw else height)
    ow, oh = min(ow, m), min(oh, m)
    if not allow_upscaling:
        ow, oh = min(ow, level_w), min(oh, level_h)
    ratio = _f(_f(_f(ow) / _f(cut_w)) / _f(_f(oh) / _f(cut_h))) if ow and oh else 1.0
    if ratio < 1.001:
        oh = c_round(_f(_f(_f(ow) / _f(cut_w)) * _f(cut_h)))
    elif ratio > 1.001:
        ow = c_round(_f(_f(_f(oh) / _f(cut_h)) * _f(cut_w)))
    return Plan(res, left, top, cut_w, cut_h, max(ow, 1), max(oh, 1))
