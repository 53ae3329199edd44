"""Differential tests of the science pipeline: iipsrv 1.1 and iipserver answer the same request.

Covered (spec = /work/shared/spec/iip-protocol.md §9-§14, notes = docs/iipsrv-1.1-notes.md,
which win where they differ):

* every processing command alone and in the combinations VisiOmatic v2 sends (GAM, CTW without
  brackets, CMP, INV, CNT numeric/eq/st, MINMAX, SHD, COL=grey|binary, ROT, QLT) on JTL tiles
  and CVT regions, over float32 (1, 3 and 5 bands), uint16, uint8 grey and RGB images;
* CVT output sizes, exactly, over many WID/HEI/RGN combinations and the MAX_CVT and
  ALLOW_UPSCALING settings (extra server pairs), with the pixels and Content-Disposition;
* PFL and SPECTRA bodies byte for byte, TIL record framing and data;
* image sequences (``seq_pyr_<x>_<y>.tif``): OBJ views, SDS, JTL/CVT/TIL of one view,
  PFL/SPECTRA across views.

Rules: status codes equal; headers as in test_differential (iipsrv's in its order, ours may add
Content-Length/Content-Type/Cache-Control; values equal except Server); JPEG answers compared on
decoded pixels within the ``TOL_*`` tolerances below (policy §5: JPEG bytes need not be equal;
1.1 sends no PNG, so there is nothing to compare exactly); text answers byte for byte, after
applying the documented departures (policy §2: ``null`` for NaN/Inf in PFL, quoted PFL keys,
well-formed error replies, real COL=binary on 8-bit tiles, no FILESYSTEM_PREFIX in texts).

Nothing that crashes 1.1 or makes it read out of bounds is sent to it (spec §5.7, notes §1, §5,
§7, §9): CVT cases are filtered with the size model of notes §1 (``cvt_model``), PFL coordinates
stay inside the level, TIL resolutions below the level count, JTL rotations non-negative.
Those inputs go to our server only (``test_ours_survives_*``).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import ImageSet, ServerPair, ServerPairs
from fcgi_client import Response
from reference import (
    ServerProcess,
    array_problems,
    compare_headers,
    decode,
    embedded_reply,
    jpeg_info,
    jpeg_structure_problems,
    policy_problems,
    til_records,
)

pytestmark = pytest.mark.reference

# ----------------------------------------------------------------------------------------
# Tolerances on decoded JPEG pixels: (max |diff|, mean |diff| limit or None).

#: 8-bit data with no float processing (CVT resizing, ROT, COL=grey, CNT=eq on 8-bit): the
#: pixels before JPEG are integer-exact in both servers; both encode with libjpeg-turbo's
#: IFAST DCT, so they decode identically in practice. 4 levels leave room for a different but
#: valid encoder (as in test_differential) without hiding a wrong pixel pipeline.
TOL_PLAIN = (4, None)
#: Float pipeline (normalise → SHD → CTW → GAM → INV → CMP → ×255, truncation): a float32 vs
#: double rounding can move a pre-JPEG value across an integer (one level); JPEG spreads that
#: over its 8×8 block, more on star peaks. A wrong range, gamma, matrix or channel shifts the
#: mean by many levels, so the mean must stay below one level.
TOL_FLOAT = (8, 1.0)
#: Colour maps and contrast multipliers amplify that one-level step: JET has slope 4 and
#: CNT=2.5 multiplies it again (1 level of v → up to 10 levels of output).
TOL_CMAP = (12, 1.0)
#: Histogram LUTs (CNT=eq) have steps of many levels where the histogram is concentrated
#: (a star field's background), so one level of input can move an output pixel a lot; the
#: mean still catches a wrong histogram (a wrong one shifts it by tens of levels).
TOL_HIST = (32, 1.0)
#: COL=binary: pixels are 0 or 255; a threshold one off flips about 1 % of them (notes §4),
#: which is a mean of about 2.5, so the mean limit 0.5 catches it; single flips are allowed.
TOL_BINARY = (255, 0.5)
#: QLT=100: quantisation no longer hides DCT rounding (test_differential's measurement).
TOL_Q100 = (6, 1.5)

# ----------------------------------------------------------------------------------------
# Helpers


def _p(query: str, id_: str, tol: tuple[int, float | None] = TOL_FLOAT):
    return pytest.param(query, tol, id=id_)


def _show(resp: Response, limit: int = 300) -> str:
    raw = resp.raw
    if b"\xff\xd8" in raw[:2000]:
        head, _, _ = raw.partition(b"\xff\xd8")
        return repr(head) + f" + JPEG ({len(resp.body)} body bytes)"
    return repr(raw[:limit]) + ("…" if len(raw) > limit else "")


def _fail(query: str, ref: Response | None, ours: Response, problems: list[str]) -> None:
    if problems:
        theirs = _show(ref) if ref is not None else "(not sent)"
        pytest.fail(
            "; ".join(problems)
            + f"\n  query:  {query!r}\n  iipsrv: {theirs}\n  ours:   {_show(ours)}",
            pytrace=False,
        )


def _is_jpeg(resp: Response) -> bool:
    return resp.status == 200 and resp.body.startswith(b"\xff\xd8")


def pixel_problems(
    ref_jpeg: bytes,
    our_jpeg: bytes,
    tol: tuple[int, float | None],
    *,
    rows: int | None = None,
) -> list[str]:
    """Decoded pixels within ``tol``; only the first ``rows`` rows if given."""
    return array_problems(decode(ref_jpeg), decode(our_jpeg), tol, rows)


def jpeg_problems(
    ref: Response, ours: Response, tol: tuple[int, float | None], *, rows: int | None = None
) -> list[str]:
    """Same geometry, components, sampling and quality; decoded pixels close."""
    if not _is_jpeg(ours):
        return [f"ours is not a JPEG (status {ours.status}, {ours.header('Content-Type')!r})"]
    problems = jpeg_structure_problems(ref.body, ours.body)
    return problems or pixel_problems(ref.body, ours.body, tol, rows=rows)


def common_problems(ref: Response, ours: Response, prefix: str) -> list[str]:
    problems = (
        [] if ref.status == ours.status else [f"status: iipsrv {ref.status}, ours {ours.status}"]
    )
    problems += policy_problems(ours)
    if prefix.encode() in ours.raw:
        problems.append("ours reveals FILESYSTEM_PREFIX")
    return problems


def compare_image(
    query: str,
    ref: Response,
    ours: Response,
    prefix: str,
    tol: tuple[int, float | None],
    *,
    rows: int | None = None,
) -> None:
    assert _is_jpeg(ref), f"iipsrv did not answer a JPEG: {_show(ref)}"
    problems = common_problems(ref, ours, prefix)
    if not problems:
        problems += compare_headers(ref, ours)
        problems += jpeg_problems(ref, ours, tol, rows=rows)
    _fail(query, ref, ours, problems)


def compare_text(
    query: str, ref: Response, ours: Response, prefix: str, expected: bytes | None = None
) -> None:
    """Status, headers, and our body equal to ``expected`` (default: iipsrv's body)."""
    problems = common_problems(ref, ours, prefix)
    if not problems:
        problems += compare_headers(ref, ours)
        want = ref.body if expected is None else expected
        if ours.body != want:
            problems.append(f"body: expected {want[:300]!r}, ours {ours.body[:300]!r}")
    _fail(query, ref, ours, problems)


def _both(reference: ServerProcess, ours: ServerProcess, query: str) -> tuple[Response, Response]:
    return reference.get(query), ours.get(query)


def _prefix(images: ImageSet) -> str:
    return f"{images.root}/"


# ----------------------------------------------------------------------------------------
# iipsrv 1.1's CVT size model (notes §1), used to keep crashing inputs away from 1.1 and to
# know whether an output is upscaled (1.1's bilinear upscaling reads past its buffer, §2.3).

_f32 = np.float32


def _roundf(x: float) -> int:
    """C ``roundf`` for the non-negative values used here (halves away from zero)."""
    return math.floor(float(x) + 0.5)


def _clamp01(x: np.float32) -> np.float32:
    return _f32(min(max(float(x), 0.0), 1.0))


@dataclass
class Cvt11:
    """What iipsrv 1.1 does with a CVT request: level, region at that level, output size."""

    res: int
    region: tuple[int, int, int, int]  # left, top, width, height in level pixels (clipped)
    size: tuple[int, int]
    problem: str = ""  # non-empty: 1.1 crashes, reads out of bounds or fails there

    @property
    def upscaled(self) -> bool:
        return self.size[0] > self.region[2] or self.size[1] > self.region[3]


def _view(rgn: tuple[float, float, float, float] | None) -> tuple[np.float32, ...]:
    """RGN::run and View::setViewWidth/Height (notes §1.1): left, top, width, height."""
    vl, vt, vw, vh = _f32(0), _f32(0), _f32(1), _f32(1)
    if rgn is not None:
        x, y, w, h = (_f32(v) for v in rgn)
        if w > 0 and h > 0:
            vl, vt = _clamp01(x), _clamp01(y)
            if _f32(vl + w) > 1.0:
                w = _f32(_f32(1.0) - vl)
            vw, vh = _clamp01(w), _clamp01(h)
    return vl, vt, vw, vh


def _resolution(
    levels: list[tuple[int, int]], view: tuple[np.float32, ...], wid: int, hei: int, max_cvt: int
) -> int:
    """View::getResolution (notes §1.2); may return a negative level (1.1 then crashes)."""
    n = len(levels)
    full_w, full_h = levels[0]
    _, _, vw, vh = view
    res = n - 1
    for dim, req in (
        (full_w, math.floor(_f32(_f32(wid) / vw)) if wid else None),
        (full_h, math.floor(_f32(_f32(hei) / vh)) if hei else None),
    ):
        if req is None:
            continue
        rs, j, d = max(req, 1), 1, dim
        while d >= rs:
            d //= 2
            j += 1
        res = max(min(res, n - min(j, n + 1) + 1, n - 1), 0)
    rw_, rh_ = full_w >> (n - 1 - res), full_h >> (n - 1 - res)
    if wid == 0 and hei > 0:
        srw, srh = (rw_ * hei) // rh_, hei
    elif hei == 0 and wid > 0:
        srw, srh = wid, (rh_ * wid) // rw_
    else:
        srw, srh = wid, hei
    s = min(_f32(_f32(srw) / _f32(full_w)), _f32(_f32(srh) / _f32(rh_)))
    if s <= 0 or s > 1:
        s = _f32(1)
    if _f32(_f32(rw_) * vw * s) > max_cvt or _f32(_f32(rh_) * vh * s) > max_cvt:
        if _f32(_f32(rw_) * vw / _f32(max_cvt)) > _f32(_f32(rh_) * vw / _f32(max_cvt)):  # sic
            dim = int(_f32(_f32(rw_) * vw * s))
        else:
            dim = int(_f32(_f32(rh_) * vh * s))
        while dim > max_cvt:
            dim //= 2
            res -= 1
    return res


def _view_size(full: int, k: int, frac: np.float32, start: np.float32) -> int:
    """View::getViewWidth/Height (notes §1.3), unclipped against the real level size."""
    lw = _roundf(_f32(_f32(full) / _f32(k)))
    size = _roundf(_f32(frac * _f32(lw)))
    off = _roundf(_f32(start * _f32(lw)))
    if size + off > lw:
        size = lw - off
    return max(size, 1)


def cvt_model(
    levels: list[tuple[int, int]],
    rgn: tuple[float, float, float, float] | None = None,
    wid: int = 0,
    hei: int = 0,
    max_cvt: int = 5000,
    upscale: bool = True,
) -> Cvt11:
    """Notes §1.1-§1.5 for non-negative WID/HEI; ``levels`` = real (w, h), largest first."""
    n = len(levels)
    full_w, full_h = levels[0]
    view = vl, vt, vw, vh = _view(rgn)
    res = _resolution(levels, view, wid, hei, max_cvt)
    if res < 0:
        return Cvt11(res, (0, 0, 0, 0), (0, 0), "resolution below 0")
    k = 1 << (n - res - 1)
    im_w, im_h = levels[n - 1 - res]
    uw, uh = _view_size(full_w, k, vw, vl), _view_size(full_h, k, vh, vt)
    left = top = 0
    rw_px, rh_px = im_w, im_h
    if vw < 1 or vh < 1 or vl > 0 or vt > 0:
        left = _roundf(_f32(_f32(_f32(full_w) * vl) / _f32(k)))
        top = _roundf(_f32(_f32(_f32(full_h) * vt) / _f32(k)))
        if left >= im_w or top >= im_h:
            return Cvt11(res, (left, top, 0, 0), (0, 0), "region starts at the level edge")
        rw_px, rh_px = min(uw, im_w - left), min(uh, im_h - top)
    ow = wid if wid else (_roundf(_f32(_f32((uw * hei) % 2**32) / _f32(uh))) if hei else full_w)
    oh = hei if hei else (_roundf(_f32(_f32((uh * wid) % 2**32) / _f32(uw))) if wid else full_h)
    ow, oh = min(ow, max_cvt), min(oh, max_cvt)
    if not upscale:
        ow, oh = min(ow, im_w), min(oh, im_h)
    if ow > 0 and oh > 0:
        ratio = _f32(_f32(_f32(ow) / _f32(rw_px)) / _f32(_f32(oh) / _f32(rh_px)))
        if ratio < 1.001:
            oh = _roundf(_f32(_f32(_f32(ow) / _f32(rw_px)) * _f32(rh_px)))
        elif ratio > 1.001:
            ow = _roundf(_f32(_f32(_f32(oh) / _f32(rh_px)) * _f32(rw_px)))
    problem = "" if ow > 0 and oh > 0 else "zero output size"
    return Cvt11(res, (left, top, rw_px, rh_px), (ow, oh), problem)


def _rows_without_out_of_bounds(model: Cvt11) -> int:
    """Output rows of an upscaled CVT that do not depend on 1.1's out-of-bounds reads.

    The bilinear resize reads one pixel past the source when its source row is one of the
    last two (p12/p22, notes §2.3): that is the last ``2·ceil(H'/h)`` output rows; JPEG then
    spreads a wrong pixel over its 16-row MCU and fancy upsampling one row further.
    """
    out_h, src_h = model.size[1], model.region[3]
    return max(0, out_h - 2 * math.ceil(out_h / src_h) - 17)


# ----------------------------------------------------------------------------------------
# JTL with processing: every command alone and VisiOmatic v2's combinations.

PROCESSED_TILE_QUERIES = [
    # star.tif: float32, 1 band, SMin/SMax tags, 512x384 (2 levels).
    _p("FIF=star.tif&GAM=0.4545&JTL=1,0", "star-gam"),
    _p("FIF=star.tif&GAM=2.2&JTL=1,3", "star-gam-2.2"),
    _p("FIF=star.tif&CTW=1;1;1&JTL=1,1", "star-ctw-mono"),
    _p("FIF=star.tif&GAM=0.4545&CTW=1;1;1&JTL=1,0", "v2-default-star"),
    _p("FIF=star.tif&GAM=0.4545&CTW=1;1;1&JTL=0,0", "v2-default-star-0-0"),
    _p(
        "FIF=star.tif&CMP=jet&INV&CNT=2.5&GAM=0.4545&MINMAX=1:90,500.5&CTW=1;1;1&QLT=75&JTL=1,3",
        "v2-captured-jet-inv-cnt",
        TOL_CMAP,
    ),
    _p("FIF=star.tif&CMP=jet&INV&CNT=2.5&MINMAX=1:90,300&JTL=1,1", "jet-inv-cnt-minmax", TOL_CMAP),
    _p("FIF=star.tif&CMP=hot&INV&MINMAX=1:95,400&CTW=1;1;1&JTL=1,2", "hot-inv-minmax", TOL_CMAP),
    _p("FIF=star.tif&CNT=2.5&JTL=1,1", "star-cnt-2.5", TOL_CMAP),
    _p("FIF=star.tif&CNT=0.5&JTL=1,0", "star-cnt-0.5"),
    _p("FIF=star.tif&CNT=eq&JTL=1,1", "star-cnt-eq", TOL_HIST),
    _p("FIF=star.tif&CNT=equalization&JTL=0,0", "star-cnt-equalization", TOL_HIST),
    _p("FIF=star.tif&CNT=st&JTL=1,1", "star-cnt-st", TOL_HIST),
    _p("FIF=star.tif&CNT=stretch&GAM=0.4545&JTL=1,2", "star-cnt-stretch-gam", TOL_HIST),
    _p("FIF=star.tif&CMP=hot&JTL=1,0", "star-cmp-hot", TOL_CMAP),
    _p("FIF=star.tif&CMP=cold&JTL=1,0", "star-cmp-cold", TOL_CMAP),
    _p("FIF=star.tif&CMP=jet&JTL=1,0", "star-cmp-jet", TOL_CMAP),
    _p("FIF=star.tif&CMP=red&JTL=1,0", "star-cmp-red", TOL_CMAP),
    _p("FIF=star.tif&CMP=green&JTL=1,0", "star-cmp-green", TOL_CMAP),
    _p("FIF=star.tif&CMP=blue&JTL=1,0", "star-cmp-blue", TOL_CMAP),
    _p("FIF=star.tif&CMP=grey&JTL=1,0", "star-cmp-grey-is-none"),
    _p("FIF=star.tif&CMP=JET&MINMAX=1:90,200&JTL=0,0", "star-cmp-uppercase", TOL_CMAP),
    _p("FIF=star.tif&INV&JTL=1,0", "star-inv"),
    _p("FIF=star.tif&COL=grey&JTL=1,1", "star-col-grey-1-band"),
    _p("FIF=star.tif&COL=binary&JTL=1,1", "star-col-binary", TOL_BINARY),
    _p("FIF=star.tif&QLT=40&GAM=0.4545&JTL=1,0", "star-qlt40-gam"),
    _p("FIF=star.tif&QLT=95&CMP=jet&JTL=1,0", "star-qlt95-jet", TOL_CMAP),
    _p("FIF=star.tif&QLT=100&GAM=0.4545&JTL=1,1", "star-qlt100-gam", TOL_Q100),
    _p("FIF=star.tif&ROT=90&GAM=0.4545&JTL=1,1", "star-rot90-gam"),
    _p("FIF=star.tif&ROT=!180&CMP=cold&JTL=1,2", "star-flip-v-cold", TOL_CMAP),
    # grey16.tif: uint16, 600x400 (3 levels).
    _p("FIF=grey16.tif&GAM=0.4545&JTL=2,1", "u16-gam"),
    _p("FIF=grey16.tif&GAM=0.4545&CTW=1;1;1&JTL=1,0", "u16-v2-default"),
    _p("FIF=grey16.tif&MINMAX=1:0,30000&GAM=0.5&JTL=2,0", "u16-minmax-gam"),
    _p("FIF=grey16.tif&CNT=eq&JTL=1,0", "u16-cnt-eq", TOL_HIST),
    _p("FIF=grey16.tif&CNT=st&JTL=1,0", "u16-cnt-st", TOL_HIST),
    _p("FIF=grey16.tif&CNT=3&JTL=2,4", "u16-cnt-3", TOL_CMAP),
    _p("FIF=grey16.tif&CMP=hot&INV&JTL=2,2", "u16-hot-inv", TOL_CMAP),
    _p("FIF=grey16.tif&COL=binary&JTL=1,0", "u16-col-binary", TOL_BINARY),
    _p("FIF=grey16.tif&COL=binary&JTL=2,5", "u16-col-binary-edge", TOL_BINARY),
    # uint8 RGB and grey (the float pipeline starts on 8-bit data once processing is asked).
    _p("FIF=rgb_raw.tif&GAM=0.4545&JTL=2,5", "rgb-gam"),
    _p("FIF=rgb_raw.tif&INV&JTL=1,1", "rgb-inv"),
    _p("FIF=rgb_raw.tif&CNT=0.5&JTL=1,0", "rgb-cnt-0.5"),
    _p("FIF=rgb_raw.tif&CTW=0,0,1;0,1,0;1,0,0&JTL=1,0", "rgb-ctw-swap"),
    _p("FIF=rgb.tif&CMP=jet&JTL=1,0", "rgb-cmp-jet-first-channel", TOL_CMAP),
    _p("FIF=rgb.tif&COL=grey&JTL=1,0", "rgb-col-grey", TOL_PLAIN),
    _p("FIF=rgb.tif&COL=gray&JTL=2,11", "rgb-col-gray-edge", TOL_PLAIN),
    _p("FIF=rgb.tif&CNT=eq&JTL=1,0", "rgb-cnt-eq", TOL_HIST),
    _p("FIF=rgb.tif&CNT=st&JTL=1,0", "rgb-cnt-st", TOL_HIST),
    _p("FIF=grey.tif&CNT=eq&JTL=2,5", "grey-cnt-eq", TOL_HIST),
    _p("FIF=grey.tif&CNT=st&JTL=2,5", "grey-cnt-st", TOL_HIST),
    _p("FIF=grey.tif&CNT=eq&ROT=90&JTL=2,3", "grey-eq-rot90", TOL_HIST),
    _p("FIF=deflate.tif&COL=grey&CNT=eq&JTL=1,1", "deflate-grey-eq", TOL_HIST),
    # cube.tif: 3 float bands (VisiOmatic colour mode).
    _p("FIF=cube.tif&CTW=1,0,0;0,1,0;0,0,1&JTL=1,0", "cube-ctw-identity"),
    _p("FIF=cube.tif&GAM=0.4545&CTW=0,0,1;0,1,0;1,0,0&JTL=1,0", "v2-cube-colour-captured"),
    _p("FIF=cube.tif&CNT=3&GAM=0.4545&CTW=0,0,1;0,1,0;1,0,0&JTL=1,1", "v2-cube-cnt3", TOL_CMAP),
    _p("FIF=cube.tif&GAM=0.4545&CTW=0,0,1;0,0,1;0,0,1&JTL=1,0", "v2-cube-mono-ch2"),
    _p(
        "FIF=cube.tif&GAM=0.4545&CTW=0.6666666666666666,-0.3333333333333333,0.6666666666666666;"
        "-0.3333333333333333,0.6666666666666666,0.6666666666666666;"
        "0.6666666666666666,0.6666666666666666,-0.3333333333333333&JTL=0,0",
        "v2-cube-saturated-mix",
    ),
    _p("FIF=cube.tif&CTW=0.5,0.5,0;0,1,0;0.2,0.3,0.5&MINMAX=2:80,200&JTL=1,1", "cube-ctw-minmax"),
    _p("FIF=cube.tif&CTW=1,0;0,1;1&JTL=1,0", "cube-ctw-short-rows"),
    _p("FIF=cube.tif&CMP=jet&JTL=1,0", "cube-cmp-first-channel", TOL_CMAP),
    _p("FIF=cube.tif&INV&GAM=0.4545&JTL=0,0", "cube-inv-gam"),
    _p("FIF=cube.tif&COL=grey&JTL=1,0", "cube-col-grey-not-srgb"),  # greyscale only on sRGB
    _p("FIF=cube5.tif&COL=grey&JTL=1,0", "cube5-col-grey-not-srgb"),
    _p("FIF=band5.tif&COL=grey&JTL=0,0", "band5-col-grey-not-srgb"),
    _p("FIF=normals.tif&COL=grey&JTL=1,0", "normals-col-grey-srgb"),
    _p("FIF=cube.tif&COL=binary&JTL=1,0", "cube-col-binary", TOL_BINARY),
    _p("FIF=cube.tif&CNT=eq&JTL=1,1", "cube-cnt-eq", TOL_HIST),
    # cube5.tif: 5 float bands (3 rows of 5 coefficients; flattened to 3 without CTW).
    _p("FIF=cube5.tif&JTL=0,0", "cube5-flatten"),
    _p("FIF=cube5.tif&GAM=0.4545&CTW=1,0,0,0,0;0,0,1,0,0;0,0,0,0,1&JTL=1,0", "v2-cube5-pick"),
    _p(
        "FIF=cube5.tif&GAM=0.4545&CTW=0.5,0.5,0,0,0;0,0,1,0,0;0,0,0,0.5,0.5&JTL=1,1",
        "v2-cube5-mix",
    ),
    _p("FIF=cube5.tif&GAM=0.4545&CTW=0,0,0,1;0,0,0,1;0,0,0,1&JTL=0,0", "v2-cube5-mono-ch3"),
    _p("FIF=cube5.tif&CMP=hot&MINMAX=1:80,400&JTL=1,0", "cube5-cmp-hot", TOL_CMAP),
    _p("FIF=band5.tif&CTW=1,0,0,0,0;0,1,0,0,0;0,0,0,1,0&JTL=1,0", "band5-u16-ctw"),
    # normals.tif: a 3-band float normal map for SHD (1 output band).
    _p("FIF=normals.tif&SHD=30,45&JTL=1,0", "shd-30-45"),
    _p("FIF=normals.tif&SHD=200,10&JTL=0,0", "shd-200-10"),
    _p("FIF=normals.tif&SHD=90,90&JTL=1,1", "shd-90-90"),
    _p("FIF=normals.tif&SHD=0,0&JTL=1,0", "shd-0-0"),
    _p("FIF=normals.tif&SHD=315,60&CMP=jet&JTL=0,0", "shd-cmp-jet", TOL_CMAP),
    _p("FIF=normals.tif&SHD=45,30&GAM=0.4545&INV&JTL=1,0", "shd-gam-inv"),
    # ROT on 8-bit JTL (notes §9: 180 remaps the tile index, 90/270 rotate in place).
    _p("FIF=rgb.tif&ROT=90&JTL=2,3", "rot90", TOL_PLAIN),
    _p("FIF=rgb.tif&ROT=180&JTL=2,3", "rot180-remap", TOL_PLAIN),
    _p("FIF=rgb.tif&ROT=180&JTL=2,0", "rot180-remap-corner", TOL_PLAIN),
    _p("FIF=rgb.tif&ROT=270&JTL=2,3", "rot270", TOL_PLAIN),
    _p("FIF=rgb.tif&ROT=!0&JTL=2,3", "flip-h", TOL_PLAIN),
    _p("FIF=rgb.tif&ROT=!180&JTL=2,3", "flip-v", TOL_PLAIN),
    _p("FIF=rgb.tif&ROT=!90&JTL=2,3", "flip-rot90", TOL_PLAIN),
    _p("FIF=rgb.tif&ROT=!270&JTL=1,2", "flip-rot270", TOL_PLAIN),
    _p("FIF=rgb.tif&ROT=450&JTL=1,1", "rot450-is-90", TOL_PLAIN),
    _p("FIF=grey.tif&ROT=180&JTL=1,3", "grey-rot180", TOL_PLAIN),
    _p("FIF=rgb.tif&ROT=360&JTL=1,1", "rot360-none", TOL_PLAIN),
    _p("FIF=rgb.tif&ROT=45&JTL=0,0", "rot45-none", TOL_PLAIN),
    # QLT (the quantisation tables are compared too).
    _p("FIF=rgb.tif&QLT=40&GAM=0.4545&JTL=1,2", "rgb-qlt40-gam"),
    _p("FIF=rgb.tif&QLT=100&INV&JTL=1,2", "rgb-qlt100-inv", TOL_Q100),
]


@pytest.mark.parametrize(("query", "tol"), PROCESSED_TILE_QUERIES)
def test_processed_tile(
    reference: ServerProcess, ours: ServerProcess, images: ImageSet, query: str, tol
) -> None:
    ref, mine = _both(reference, ours, query)
    compare_image(query, ref, mine, _prefix(images), tol)


def test_gam_log_ours_only(ours: ServerProcess, images: ImageSet) -> None:
    """GAM=log is mainline-only (1.1 reads it as 0); policy §1 supports it:
    ``logf(1 + 255·v) / logf(256)`` after normalisation (spec §10). Compared with numpy at
    QLT=100, where JPEG adds at most a level or two; star.tif's SMin is its minimum, so v ≥ 0."""
    query = "FIF=star.tif&QLT=100&GAM=log&JTL=1,0"
    mine = ours.get(query)
    _fail(query, None, mine, [] if _is_jpeg(mine) else ["not a JPEG"])
    star = images["star.tif"]
    tile = star.level(1)[:256, :256].astype(np.float32)
    lo, hi = np.float32(star.smin[0]), np.float32(star.smax[0])
    v = (tile - lo) * np.float32(1.0 / (hi - lo))
    expected = np.floor(np.clip(np.log1p(255.0 * v) / np.log(256.0) * 255.0, 0, 255))
    got = decode(mine.body)[..., 0].astype(np.float64)
    diff = np.abs(got - expected)
    assert diff.max() <= 3 and diff.mean() < 0.5, (diff.max(), diff.mean())
    plain = decode(ours.get("FIF=star.tif&QLT=100&JTL=1,0").body)[..., 0].astype(np.float64)
    assert got.mean() > plain.mean() + 20  # the log stretch brightens the faint sky


# ----------------------------------------------------------------------------------------
# COL=binary on 8-bit tiles. 1.1's JTL "binarises" the JPEG bytes (garbage, notes §4), but its
# CVT binarises real pixels: a CVT that cuts exactly one tile at its own size, with no resize,
# is the reference for our JTL (same histogram, same Otsu threshold).


def _cvt_of_tile(images: ImageSet, name: str, r: int, t: int) -> str:
    """A CVT query whose 1.1 output is exactly tile ``t`` of level ``r`` (checked with the
    model of notes §1)."""
    img = images[name]
    levels = [(lv.shape[1], lv.shape[0]) for lv in img.levels]
    full_w, full_h = levels[0]
    level_h, level_w = img.level(r).shape[:2]
    k = full_w // level_w
    across, _ = img.ntiles(r)
    x, y = (t % across) * img.tile, (t // across) * img.tile
    w, h = min(img.tile, level_w - x), min(img.tile, level_h - y)
    rgn = (x * k / full_w, y * k / full_h, w * k / full_w, h * k / full_h)
    model = cvt_model(levels, rgn, w, 0)
    assert not model.problem and model.region == (x, y, w, h) and model.size == (w, h), model
    return f"FIF={name}&RGN={','.join(repr(v) for v in rgn)}&WID={w}&COL=binary&CVT=jpeg"


@pytest.mark.parametrize(
    ("name", "r", "t"),
    [
        ("rgb.tif", 0, 0),
        ("rgb.tif", 1, 3),
        ("rgb_raw.tif", 2, 5),
        ("rgb_raw.tif", 2, 11),
        ("grey.tif", 2, 6),
        ("deflate.tif", 0, 0),
        ("meta.tif", 0, 0),
    ],
    ids=lambda v: str(v).removesuffix(".tif"),
)
def test_col_binary_on_8bit_tiles(
    reference: ServerProcess, ours: ServerProcess, images: ImageSet, name: str, r: int, t: int
) -> None:
    """Policy §2: our JTL really binarises; it must equal 1.1's CVT of the same tile."""
    query = f"FIF={name}&COL=binary&JTL={r},{t}"
    cvt = _cvt_of_tile(images, name, r, t)
    ref, mine = reference.get(cvt), ours.get(query)
    assert _is_jpeg(ref), _show(ref)
    problems = policy_problems(mine)
    problems += jpeg_problems(ref, mine, TOL_BINARY)
    if not problems:
        pixels = decode(mine.body)
        middle = float(np.mean((pixels > 48) & (pixels < 208)))
        if pixels.shape[2] != 1 or middle > 0.03:
            problems.append(
                f"not black and white: {pixels.shape[2]} channels, {middle:.1%} mid-grey pixels"
            )
    _fail(f"{query} (iipsrv: {cvt})", ref, mine, problems)


def test_col_binary_1_1_garbage_is_not_copied(
    reference: ServerProcess, ours: ServerProcess
) -> None:
    """The accident itself: 1.1's body is not a JPEG, ours is."""
    query = "FIF=rgb.tif&COL=binary&JTL=1,0"
    ref, mine = _both(reference, ours, query)
    assert ref.status == 200 and not ref.body.startswith(b"\xff\xd8")
    _fail(query, ref, mine, [] if _is_jpeg(mine) else ["ours is not a JPEG"])


# ----------------------------------------------------------------------------------------
# CVT: sizes exactly, over WID/HEI/RGN and the MAX_CVT / ALLOW_UPSCALING settings.


@dataclass(frozen=True)
class CvtCase:
    image: str
    wid: int = 0
    hei: int = 0
    rgn: tuple[float, float, float, float] | None = None
    max_cvt: int = 5000
    upscale: bool = True
    extra: str = ""  # more commands before CVT (processing)
    interpolation: int = 1

    @property
    def query(self) -> str:
        parts = [f"FIF={self.image}"]
        if self.extra:
            parts.append(self.extra)
        if self.rgn is not None:
            parts.append("RGN=" + ",".join(repr(v) for v in self.rgn))
        if self.wid:
            parts.append(f"WID={self.wid}")
        if self.hei:
            parts.append(f"HEI={self.hei}")
        return "&".join([*parts, "CVT=jpeg"])

    @property
    def settings(self) -> dict[str, str]:
        out = {}
        if self.max_cvt != 5000:
            out["MAX_CVT"] = str(self.max_cvt)
        if not self.upscale:
            out["ALLOW_UPSCALING"] = "0"
        if self.interpolation != 1:
            out["INTERPOLATION"] = str(self.interpolation)
        return out

    def label(self) -> str:
        env = "".join(f"-{k.lower().replace('_', '')}{v}" for k, v in self.settings.items())
        return f"{self.image.removesuffix('.tif')}-{self.query.split('&', 1)[1]}{env}"


#: The image sizes (largest level first) that conftest writes, for the model.
LEVELS = {
    "rgb_raw.tif": [(1000, 750), (500, 375), (250, 187)],
    "star.tif": [(512, 384), (256, 192)],
    "grey16.tif": [(600, 400), (300, 200), (150, 100)],
    "cube5.tif": [(300, 200), (150, 100)],
    "normals.tif": [(320, 240), (160, 120)],
    "deflate.tif": [(320, 240), (160, 120)],
}

#: notes §1.8, the observed table (on a 1000x750 3-level RGB image), minus the 5000-pixel
#: outputs (slow) and the negative WID/HEI (u32 wrap-around).
_NOTES_TABLE = [
    (5000, 1, 0, 0, None),
    (5000, 1, 200, 0, None),
    (5000, 1, 0, 100, None),
    (5000, 1, 200, 200, None),
    (5000, 1, 333, 0, None),
    (5000, 1, 0, 0, (0, 0, 0.5, 0.25)),
    (5000, 1, 200, 0, (0, 0, 0.5, 0.25)),
    (5000, 1, 0, 0, (0.9, 0.9, 0.5, 0.5)),
    (5000, 1, 1, 0, None),
    (5000, 1, 250, 0, None),
    (5000, 1, 251, 0, None),
    (5000, 1, 500, 0, None),
    (5000, 1, 501, 0, None),
    (5000, 1, 0, 187, None),
    (5000, 1, 0, 188, None),
    (5000, 1, 300, 100, None),
    (5000, 1, 100, 300, None),
    (5000, 1, 640, 480, None),
    (5000, 1, 0, 0, (0.1, 0.2, 0.3, 0.4)),
    (5000, 1, 0, 0, (0.123, 0.456, 0.333, 0.222)),
    (5000, 1, 0, 0, (0.3333, 0.3333, 0.3333, 0.3333)),
    (5000, 1, 100, 0, (0.1, 0.1, 0.3, 0.3)),
    (5000, 1, 0, 100, (0.1, 0.1, 0.3, 0.3)),
    (5000, 1, 300, 300, (0.25, 0.25, 0.5, 0.5)),
    (5000, 1, 128, 0, (0.777, 0.05, 0.5, 0.2)),
    (5000, 1, 999, 0, (0, 0, 1, 0.1)),
    (5000, 1, 2000, 0, (0.5, 0.5, 0.5, 0.5)),
    (5000, 1, 0, 0, (0.001, 0.001, 0.01, 0.01)),
    (5000, 1, 250, 10, (0, 0, 0.5, 0.5)),
    (5000, 1, 0, 0, (0.5, 0.5, 0, 0.5)),
    (300, 1, 0, 0, None),
    (300, 1, 400, 0, None),
    (300, 1, 0, 400, None),
    (300, 1, 0, 0, (0, 0, 0.5, 0.5)),
    (300, 1, 1000, 0, (0, 0, 0.2, 0.2)),
    (300, 1, 299, 0, None),
    (300, 1, 301, 0, None),
    (300, 0, 0, 0, None),
    (300, 0, 2000, 0, None),
    (300, 0, 0, 0, (0, 0, 0.5, 0.25)),
    (300, 0, 1000, 0, (0, 0, 0.1, 0.1)),
    (300, 0, 0, 1000, None),
]


def _notes_cases() -> list[CvtCase]:
    return [
        CvtCase("rgb_raw.tif", wid, hei, rgn, m, bool(up)) for m, up, wid, hei, rgn in _NOTES_TABLE
    ]


def _grid_cases(count: int) -> list[CvtCase]:
    """A fixed pseudo-random sample of combinations on the other images, without the inputs
    that crash 1.1 and without outputs above 1.5 megapixels (time)."""
    rng = random.Random(20240302)
    wids = [0, 0, 1, 7, 100, 150, 199, 257, 400, 999]
    heis = [0, 0, 0, 50, 99, 191, 300]
    rgns = [
        None,
        None,
        (0, 0, 0.5, 0.5),
        (0.123, 0.456, 0.333, 0.222),
        (0.777, 0.05, 0.5, 0.2),
        (0.3333, 0.6667, 0.5, 0.3),
        (0.9, 0.9, 0.5, 0.5),
        (0.01, 0.2, 0.98, 0.0123),
        (0.5, 0, 0.25, 1),
        (-0.284, -0.688, 2.048, 1.8666666666666667),  # VisiOmatic snapshot (clamped)
    ]
    envs = [(5000, True), (300, True), (300, False), (5000, False), (128, True)]
    names = [n for n in LEVELS if n != "rgb_raw.tif"]
    out: list[CvtCase] = []
    seen = set()
    while len(out) < count:
        name = rng.choice(names)
        case = CvtCase(
            name, rng.choice(wids), rng.choice(heis), rng.choice(rgns), *rng.choice(envs)
        )
        if case in seen:
            continue
        seen.add(case)
        model = cvt_model(LEVELS[name], case.rgn, case.wid, case.hei, case.max_cvt, case.upscale)
        if not model.problem and model.size[0] * model.size[1] <= 1_500_000:
            out.append(case)
    return out


CVT_SIZE_CASES = _notes_cases() + _grid_cases(70)


@pytest.fixture
def pair_for(
    reference: ServerProcess, ours: ServerProcess, server_pair: ServerPairs
) -> Callable[[CvtCase], ServerPair]:
    """The (iipsrv, ours) pair running with a case's settings."""

    def get(case: CvtCase) -> ServerPair:
        return server_pair(**case.settings) if case.settings else (reference, ours)

    return get


def _levels(images: ImageSet, name: str) -> list[tuple[int, int]]:
    return [(lv.shape[1], lv.shape[0]) for lv in images[name].levels]


def _tolerance_for(image: str) -> tuple[int, float | None]:
    return (
        TOL_PLAIN if image in ("rgb_raw.tif", "rgb.tif", "grey.tif", "deflate.tif") else TOL_FLOAT
    )


def check_cvt(case: CvtCase, pair: ServerPair, images: ImageSet, tol=None) -> None:
    """Sizes exactly (and as the model of notes §1 says), headers, Content-Disposition,
    pixels within tolerance; upscaled outputs without the rows 1.1 reads out of bounds."""
    ref_server, our_server = pair
    query = case.query
    ref, mine = ref_server.get(query), our_server.get(query)
    assert _is_jpeg(ref), f"{query}: iipsrv did not answer a JPEG: {_show(ref)}"
    levels = _levels(images, case.image)
    model = cvt_model(levels, case.rgn, case.wid, case.hei, case.max_cvt, case.upscale)
    info = jpeg_info(ref.body)
    rot = re.search(r"ROT=!?(\d+)", case.extra)
    if rot and int(rot.group(1)) % 180 == 90:  # rotated after resizing (notes §2.1)
        model.size = model.size[::-1]
    assert model.size == (info.width, info.height), (
        f"harness: the notes §1 model says {model.size} for {query!r} {case.settings}, "
        f"iipsrv sent {info.width}x{info.height}"
    )
    problems = common_problems(ref, mine, _prefix(images))
    if not problems:
        problems += compare_headers(ref, mine)
        stem = case.image.rsplit(".", 1)[0]
        disposition = mine.header("Content-Disposition")
        if disposition != f'inline;filename="{stem}.jpg"':
            problems.append(f"Content-Disposition {disposition!r}")
        rows = None
        if model.upscaled and case.interpolation == 1:
            rows = _rows_without_out_of_bounds(model)
        problems += jpeg_problems(ref, mine, tol or _tolerance_for(case.image), rows=rows)
    _fail(f"{query} {case.settings}", ref, mine, problems)


@pytest.mark.parametrize("case", CVT_SIZE_CASES, ids=CvtCase.label)
def test_cvt_size(pair_for, images: ImageSet, case: CvtCase) -> None:
    if case.image in LEVELS:
        assert _levels(images, case.image) == LEVELS[case.image], "conftest images changed"
    check_cvt(case, pair_for(case), images)


#: Downscaling (deterministic in 1.1) with processing, rotation and quality.
CVT_PROCESSED = [
    (CvtCase("rgb.tif", 200), TOL_PLAIN),
    (CvtCase("grey.tif", 333), TOL_PLAIN),
    (CvtCase("deflate.tif", 100), TOL_PLAIN),
    (CvtCase("star.tif", 200, extra="GAM=0.4545"), TOL_FLOAT),
    (CvtCase("star.tif", 300, extra="GAM=0.4545&CTW=1;1;1"), TOL_FLOAT),
    (CvtCase("star.tif", 300, extra="CMP=jet&INV&CNT=2.5&MINMAX=1:90,300"), TOL_CMAP),
    (CvtCase("star.tif", 250, extra="CMP=hot&GAM=0.4545&CTW=1;1;1"), TOL_CMAP),
    (CvtCase("star.tif", 300, extra="CNT=eq"), TOL_HIST),
    (CvtCase("star.tif", 300, extra="CNT=st"), TOL_HIST),
    (CvtCase("star.tif", 300, extra="COL=binary"), TOL_BINARY),
    (CvtCase("star.tif", 0, 150, (0.25, 0.25, 0.5, 0.5), extra="INV&CNT=1.5"), TOL_CMAP),
    (CvtCase("rgb_raw.tif", 300, extra="COL=binary"), TOL_BINARY),
    (CvtCase("rgb.tif", 300, extra="COL=binary"), TOL_BINARY),
    (CvtCase("rgb_raw.tif", 300, extra="COL=grey"), TOL_PLAIN),
    (CvtCase("cube.tif", 200, extra="COL=grey"), TOL_FLOAT),  # not sRGB: stays colour
    (CvtCase("rgb_raw.tif", 300, extra="CNT=eq"), TOL_HIST),
    (CvtCase("rgb_raw.tif", 300, extra="CNT=st"), TOL_HIST),
    (CvtCase("rgb_raw.tif", 200, extra="GAM=0.4545&CTW=0,0,1;0,1,0;1,0,0"), TOL_FLOAT),
    (CvtCase("grey16.tif", 250), TOL_FLOAT),
    (CvtCase("grey16.tif", 250, extra="CNT=eq"), TOL_HIST),
    (CvtCase("grey16.tif", 250, extra="CNT=st"), TOL_HIST),
    (CvtCase("grey16.tif", 250, extra="COL=binary"), TOL_BINARY),
    (CvtCase("cube.tif", 250), TOL_FLOAT),
    (CvtCase("cube.tif", 250, extra="GAM=0.4545&CTW=0,0,1;0,1,0;1,0,0"), TOL_FLOAT),
    (CvtCase("cube.tif", 250, extra="CTW=0.5,0.5,0;0,1,0;0.2,0.3,0.5"), TOL_FLOAT),
    (CvtCase("cube5.tif", 250), TOL_FLOAT),
    (CvtCase("cube5.tif", 250, extra="GAM=0.4545&CTW=1,0,0,0,0;0,0,1,0,0;0,0,0,0,1"), TOL_FLOAT),
    (CvtCase("normals.tif", 250, extra="SHD=30,45"), TOL_FLOAT),
    (CvtCase("normals.tif", 0, 100, (0.1, 0.1, 0.8, 0.8), extra="SHD=120,20&CMP=jet"), TOL_CMAP),
    (CvtCase("rgb_raw.tif", 300, extra="ROT=90"), TOL_PLAIN),
    (CvtCase("rgb_raw.tif", 300, extra="ROT=180"), TOL_PLAIN),
    (CvtCase("rgb_raw.tif", 300, extra="ROT=270"), TOL_PLAIN),
    (CvtCase("rgb_raw.tif", 300, extra="ROT=!0"), TOL_PLAIN),
    (CvtCase("rgb_raw.tif", 300, extra="ROT=!180"), TOL_PLAIN),
    (CvtCase("rgb_raw.tif", 300, extra="ROT=!90"), TOL_PLAIN),
    (CvtCase("rgb_raw.tif", 200, 0, (0.1, 0.2, 0.5, 0.5), extra="ROT=90"), TOL_PLAIN),
    (CvtCase("star.tif", 200, extra="ROT=270&GAM=0.4545"), TOL_FLOAT),
    (CvtCase("rgb_raw.tif", 300, extra="QLT=30"), TOL_PLAIN),
    (CvtCase("rgb_raw.tif", 300, extra="QLT=100"), TOL_Q100),
    (CvtCase("star.tif", 300, extra="QLT=90&GAM=0.4545"), TOL_FLOAT),
]


@pytest.mark.parametrize(("case", "tol"), CVT_PROCESSED, ids=[c.label() for c, _ in CVT_PROCESSED])
def test_cvt_processed(pair_for, images: ImageSet, case: CvtCase, tol) -> None:
    model = cvt_model(_levels(images, case.image), case.rgn, case.wid, case.hei)
    assert not model.problem and not model.upscaled, model
    check_cvt(case, pair_for(case), images, tol)


#: Nearest-neighbour resampling (INTERPOLATION=0) reads no pixel out of bounds, so upscaled
#: outputs compare whole.
CVT_NEAREST = [
    CvtCase("rgb_raw.tif", 200, interpolation=0),
    CvtCase("rgb_raw.tif", 0, 0, (0, 0, 0.5, 0.25), interpolation=0),
    CvtCase("rgb_raw.tif", 0, 0, (0.9, 0.9, 0.5, 0.5), interpolation=0),
    CvtCase("star.tif", 700, interpolation=0),
    CvtCase("grey16.tif", 0, 333, (0.2, 0.3, 0.4, 0.5), interpolation=0),
    CvtCase("cube5.tif", 160, interpolation=0),
]


@pytest.mark.parametrize("case", CVT_NEAREST, ids=CvtCase.label)
def test_cvt_nearest(pair_for, images: ImageSet, case: CvtCase) -> None:
    check_cvt(case, pair_for(case), images)


@pytest.mark.parametrize(
    "query",
    [
        "FIF=rgb_raw.tif&CVT=jpeg",  # MAX_CVT=128: res below 0 (notes §1.2)
        "FIF=rgb_raw.tif&RGN=0.999,0.5,0.5,0.5&CVT=jpeg",  # zero-width output
        "FIF=rgb_raw.tif&RGN=0.5,0.999,0.5,0.5&WID=300&CVT=jpeg",  # top at the level edge
        "FIF=star.tif&RGN=0.999,0.999,0.5,0.5&CVT=jpeg",
        "FIF=grey16.tif&RGN=0,0,0.5,0.5&WID=250&HEI=1&CVT=jpeg",
        "FIF=rgb_raw.tif&WID=652455&CVT=jpeg",  # huge WID (spec §5.7)
        "FIF=rgb_raw.tif&WID=-1&CVT=jpeg",
    ],
    ids=[
        "res-below-0",
        "zero-width",
        "top-at-edge",
        "corner",
        "zero-height",
        "huge-wid",
        "wid-minus-1",
    ],
)
def test_ours_survives_cvt_crashers(server_pair: ServerPairs, images: ImageSet, query: str) -> None:
    """Inputs that crash 1.1 or make it fail after its headers (notes §1.2-§1.5), to ours only:
    a well-formed JPEG or an ordinary 4xx error, and the server stays up."""
    _, mine_server = server_pair(MAX_CVT="128")
    crashes = len(mine_server.crashes)
    mine = mine_server.get(query)
    problems = policy_problems(mine)
    if mine.status == 200:
        if not _is_jpeg(mine):
            problems.append("200 without a JPEG body")
        else:
            info = jpeg_info(mine.body)
            if not (0 < info.width <= 128 and 0 < info.height <= 128):
                problems.append(f"output {info.width}x{info.height} is not within MAX_CVT=128")
    elif not 400 <= mine.status < 500:
        problems.append(f"status {mine.status}")
    if _prefix(images).encode() in mine.raw:
        problems.append("ours reveals FILESYSTEM_PREFIX")
    after = mine_server.get("FIF=rgb.tif&OBJ=Max-size")
    if after.body != b"\r\nMax-size:1000 750\r\n" or len(mine_server.crashes) > crashes:
        problems.append(f"server unhealthy afterwards: {after.raw[:80]!r}")
    _fail(query, None, mine, problems)


# ----------------------------------------------------------------------------------------
# PFL (notes §5): exact text for finite values.

PFL_QUERIES = [
    "FIF=grey.tif&PFL=0:10,20-30,20",  # horizontal, end exclusive
    "FIF=grey.tif&PFL=2:100,5-100,40",  # vertical
    "FIF=grey.tif&PFL=1:17,33",  # point
    "FIF=grey.tif&PFL=1:17,33-17,33",  # zero-length line = point
    "FIF=grey.tif&PFL=1:40,33-17,33",  # reversed horizontal = point
    "FIF=grey.tif&PFL=1:17,50-40,10",  # diagonal = horizontal from (x1, y1)
    "FIF=grey.tif&PFL=2:5,60-5,20",  # reversed vertical = point
    "FIF=grey.tif&PFL=1:0,0-500,0",  # whole row, across tiles
    "FIF=grey.tif&PFL=2:0,0-0,750",  # whole column, across tiles
    "FIF=grey.tif&PFL=0:0,5-250,5",  # x2 == level width is accepted
    "FIF=grey.tif&PFL=0:5,0-5,187",  # y2 == level height is accepted
    "FIF=grey.tif&PFL=2:999,749",  # last pixel
    "FIF=grey.tif&PFL=1:3,4,5",  # extra number ignored
    "FIF=rgb_raw.tif&PFL=1:5,5-12,5",  # 3 channels interleaved
    "FIF=rgb.tif&PFL=2:250,300-250,310",  # JPEG-compressed source
    "FIF=grey16.tif&PFL=2:3,7-20,7",  # 16-bit
    "FIF=grey16.tif&PFL=1:299,0-299,10",
    "FIF=grey16.tif&PFL=0:140,90",
    "FIF=band5.tif&PFL=1:10,10-13,10",  # 5 channels, 16-bit
    "FIF=int32.tif&PFL=1:10,10-13,10",  # 32-bit integers print as %g
    "FIF=star.tif&PFL=1:100,50-120,50",  # float: fixed, 9 decimals
    "FIF=star.tif&PFL=0:100,50-100,70",
    "FIF=star.tif&PFL=1:3.7,4.2-9,4",  # atoi
    "FIF=star.tif&PFL=1:511,383",
    "FIF=cube.tif&PFL=1:10,10-14,10",  # 3 float bands
    "FIF=cube5.tif&PFL=1:10,10-13,10",  # 5 float bands
    "FIF=cube5.tif&PFL=0:0,99",
    "FIF=f2.tif&PFL=2:10,10-13,10",  # 2 float bands, negative values
    "FIF=normals.tif&PFL=0:3,3-3,6",
    "FIF=bigfloat.tif&PFL=0:10,20-40,20",
    # Errors: the banner (400) for a bad resolution or coordinates.
    "FIF=grey.tif&PFL=3:0,0",
    "FIF=grey.tif&PFL=-1:0,0",
    "FIF=grey.tif&PFL=0:-1,0",
    "FIF=grey.tif&PFL=0:251,0",
    "FIF=grey.tif&PFL=0:0,188",
    "FIF=grey.tif&PFL=0:0,0-251,0",  # x2 > level width
    "FIF=grey.tif&PFL=0:3,0-3,188",  # y2 > level height
    "FIF=star.tif&PFL=1:0,10-600,10",
]


def _pfl_id(query: str) -> str:
    return query.replace("FIF=", "").replace(".tif&PFL=", ":")


@pytest.mark.parametrize("query", PFL_QUERIES, ids=_pfl_id)
def test_pfl(reference: ServerProcess, ours: ServerProcess, images: ImageSet, query: str) -> None:
    ref, mine = _both(reference, ours, query)
    if ref.status == 400 and (ref.header("Content-Type") or "").startswith("text/html"):
        # The banner: status only (its page is ours to write), and a well-formed reply.
        _fail(query, ref, mine, common_problems(ref, mine, _prefix(images)))
        return
    assert ref.status == 200 and b"nan" not in ref.body and b"inf" not in ref.body, _show(ref)
    compare_text(query, ref, mine, _prefix(images))


@pytest.mark.parametrize(
    "query",
    [
        "FIF=f1nomm.tif&PFL=2:98,100-103,100",  # NaN
        "FIF=f1nomm.tif&PFL=2:300,198-300,205",  # +Inf
        "FIF=f1nomm.tif&PFL=2:898,600-902,600",  # -Inf
        "FIF=f1nomm.tif&PFL=2:100,100",
    ],
    ids=["nan", "inf", "minus-inf", "nan-point"],
)
def test_pfl_non_finite_is_null(
    reference: ServerProcess, ours: ServerProcess, images: ImageSet, query: str
) -> None:
    """Policy §2: 1.1 prints ``nan``/``inf`` (invalid JSON); ours prints ``null`` there and
    is otherwise 1.1's text."""
    import json

    ref, mine = _both(reference, ours, query)
    assert re.search(rb"\bnan\b|\binf\b", ref.body), _show(ref)
    expected = re.sub(rb"-?\b(?:nan|inf)\b", b"null", ref.body)
    compare_text(query, ref, mine, _prefix(images), expected)
    json.loads(mine.body)


@pytest.mark.parametrize(
    "query",
    [
        "FIF=grey.tif&PFL=0:250,0",  # x == level width: 1.1 reads the next row
        "FIF=grey.tif&PFL=0:0,187",  # y == level height: 1.1 reads past the tile
        "FIF=grey.tif&PFL=0:250,186-250,187",
        "PFL=0:0,0-10,0",  # no FIF: 1.1 crashes
    ],
    ids=["x-at-width", "y-at-height", "vertical-at-width", "no-fif"],
)
def test_ours_survives_pfl_out_of_bounds(ours: ServerProcess, images: ImageSet, query: str) -> None:
    """Not sent to 1.1 (out-of-bounds read or crash, notes §5): ours answers an error."""
    mine = ours.get(query)
    problems = policy_problems(mine)
    if not 400 <= mine.status < 500:
        problems.append(f"status {mine.status}, expected a 4xx error")
    _fail(query, None, mine, problems)


# ----------------------------------------------------------------------------------------
# SPECTRA (notes §6): exact XML.

SPECTRA_QUERIES = [
    "FIF=grey.tif&SPECTRA=0,0,10,20",
    "FIF=grey.tif&SPECTRA=2,5,255,255",
    "FIF=grey.tif&SPECTRA=1,2,0,0",
    "FIF=rgb_raw.tif&SPECTRA=1,0,7,9",  # channels ignored: an interleaved byte
    "FIF=rgb.tif&SPECTRA=2,4,100,3",
    "FIF=grey16.tif&SPECTRA=1,1,3,4",
    "FIF=grey16.tif&SPECTRA=2,0,255,0",
    "FIF=star.tif&SPECTRA=1,3,100,100",
    "FIF=star.tif&SPECTRA=0,0,5,5",
    "FIF=cube.tif&SPECTRA=1,0,5,5",
    "FIF=cube5.tif&SPECTRA=1,0,5,5",
    "FIF=band5.tif&SPECTRA=1,0,5,5",
    "FIF=int32.tif&SPECTRA=1,0,5,5",
    "FIF=f2.tif&SPECTRA=2,3,10,10",
    # Edge tiles too small for x,y: an empty list.
    "FIF=grey.tif&SPECTRA=0,0,250,10",
    "FIF=grey.tif&SPECTRA=0,0,10,200",
    "FIF=grey.tif&SPECTRA=2,3,240,10",
    "FIF=grey.tif&SPECTRA=1,3,10,130",
    # Outside the nominal tile: 400 with 1.1's text.
    "FIF=grey.tif&SPECTRA=0,0,256,0",
    "FIF=grey.tif&SPECTRA=0,0,0,256",
    "FIF=grey.tif&SPECTRA=0,0,-1,0",
    "FIF=star.tif&SPECTRA=1,0,0,-5",
    "FIF=cube5.tif&SPECTRA=0,0,1000,1000",
]


@pytest.mark.parametrize("query", SPECTRA_QUERIES, ids=lambda q: q.replace("FIF=", ""))
def test_spectra(
    reference: ServerProcess, ours: ServerProcess, images: ImageSet, query: str
) -> None:
    ref, mine = _both(reference, ours, query)
    if ref.status == 400:
        assert ref.body == b"SPECTRA :: Error: x,y coordinates outside of tile boundaries"
    compare_text(query, ref, mine, _prefix(images))


@pytest.mark.parametrize(
    "query",
    [
        "FIF=grey.tif&SPECTRA=5,0,1,1",
        "FIF=grey.tif&SPECTRA=3,0,1,1",
        "FIF=grey.tif&SPECTRA=1,99,1,1",
        "FIF=seq&SPECTRA=1,9,1,1",
    ],
    ids=[
        "resolution-past-levels",
        "resolution-equals-levels",
        "tile-past-end",
        "seq-tile-past-end",
    ],
)
def test_spectra_missing_tile(
    reference: ServerProcess, ours: ServerProcess, images: ImageSet, query: str
) -> None:
    """1.1 writes the 404 reply after its 200 headers and ``<spectra>``; policy §2 (well-formed
    replies): ours is that 404 reply on its own."""
    ref, mine = _both(reference, ours, query)
    embedded = embedded_reply(ref.body)
    assert ref.status == 200 and embedded is not None and embedded[0] == 404, _show(ref)
    problems = policy_problems(mine)
    if mine.status != 404 or mine.body != embedded[1]:
        problems.append(f"expected 404 {embedded[1]!r}, ours {mine.status} {mine.body!r}")
    _fail(query, ref, mine, problems)


# ----------------------------------------------------------------------------------------
# TIL (notes §7): record framing byte for byte, raw data byte for byte, JPEG decoded.

TIL_QUERIES = [
    "FIF=rgb.tif&TIL=1,1-2",  # 2x2 tiles: 0,2,1,3 (x outer)
    "FIF=rgb.tif&TIL=2,2-5",  # 4x3 tiles: 1,5,2,6
    "FIF=rgb.tif&TIL=2,7-8",  # x range swapped: columns 0..3, rows 1..2
    "FIF=rgb.tif&TIL=1,3-0",  # end < start: end = start
    "FIF=rgb.tif&TIL=2,6-1",
    "FIF=rgb.tif&TIL=2,0",  # single tile
    "FIF=rgb.tif&TIL=2,11",  # single edge tile
    "FIF=rgb.tif&TIL=0",  # no comma: r only
    "FIF=rgb.tif&QLT=40&TIL=1,0-3",
    "FIF=rgb.tif&CNT=eq&ROT=90&GAM=2&TIL=1,0",  # no processing in TIL
    "FIF=rgb_raw.tif&TIL=2,9-11",
    "FIF=grey.tif&TIL=2,3-7",
    "FIF=deflate.tif&TIL=1,1-0",
    "FIF=grey16.tif&TIL=0,0",  # raw 16-bit: type 03
    "FIF=grey16.tif&TIL=2,1-5",
    "FIF=star.tif&TIL=1,0-3",  # raw float: type 00
    "FIF=star.tif&TIL=1,3-1",
    "FIF=cube.tif&TIL=1,1",
    "FIF=cube5.tif&TIL=1,0-1",
    "FIF=band5.tif&TIL=1,0-1",
    "FIF=int32.tif&TIL=1,0-1",
    "FIF=f2.tif&TIL=2,10-11",
    "FIF=normals.tif&TIL=0,0",
]


def til_problems(ref: Response, ours: Response) -> list[str]:
    """Framing and raw data identical; JPEG payloads decoded within TOL_PLAIN."""
    ref_records, ref_rest = til_records(ref.body)
    our_records, our_rest = til_records(ours.body)
    problems = []
    if ref_rest or our_rest:
        problems.append(f"trailing bytes: iipsrv {ref_rest[:60]!r}, ours {our_rest[:60]!r}")
    if len(ref_records) != len(our_records):
        return [
            *problems,
            f"records: iipsrv {[r.head for r in ref_records]}, ours {[r.head for r in our_records]}",
        ]
    for a, b in zip(ref_records, our_records, strict=True):
        where = f"record {a.head!r}"
        if (a.resolution, a.index, a.kind, a.subtype) != (b.resolution, b.index, b.kind, b.subtype):
            problems.append(f"{where}: ours {b.head!r} {b.kind.hex()} {b.subtype.hex()}")
        elif a.data.startswith(b"\xff\xd8"):
            # JPEG bytes may differ (policy §5; 1.1 adds a COM marker), so the length in
            # the head may too; it must be the payload's.
            if not b.data.startswith(b"\xff\xd8"):
                problems.append(f"{where}: ours is not a JPEG")
            else:
                problems += [f"{where}: {p}" for p in pixel_problems(a.data, b.data, TOL_PLAIN)]
        elif a.head != b.head or a.data != b.data:
            problems.append(f"{where}: raw data differ (ours {b.head!r}, {len(b.data)} bytes)")
    return problems


@pytest.mark.parametrize("query", TIL_QUERIES, ids=lambda q: q.replace("FIF=", ""))
def test_til(reference: ServerProcess, ours: ServerProcess, images: ImageSet, query: str) -> None:
    ref, mine = _both(reference, ours, query)
    assert ref.status == 200 and ref.body.startswith(b"Tile,"), _show(ref)
    problems = common_problems(ref, mine, _prefix(images))
    if not problems:
        problems += compare_headers(ref, mine) + til_problems(ref, mine)
    _fail(query, ref, mine, problems)


@pytest.mark.parametrize(
    "query",
    ["FIF=rgb.tif&TIL=1,5", "FIF=rgb.tif&TIL=1,4-5", "FIF=grey16.tif&TIL=0,1"],
    ids=["tile-past-end", "range-past-end", "u16-tile-past-end"],
)
def test_til_missing_tile(
    reference: ServerProcess, ours: ServerProcess, images: ImageSet, query: str
) -> None:
    """1.1 writes its 404 reply after the TIL headers; ours is that 404 reply alone."""
    ref, mine = _both(reference, ours, query)
    embedded = embedded_reply(ref.body)
    assert ref.status == 200 and embedded is not None and embedded[0] == 404, _show(ref)
    problems = policy_problems(mine)
    if mine.status != 404 or mine.body != embedded[1]:
        problems.append(f"expected 404 {embedded[1]!r}, ours {mine.status} {mine.body!r}")
    _fail(query, ref, mine, problems)


@pytest.mark.parametrize(
    "query",
    [
        "FIF=rgb.tif&TIL=3,0",  # resolution == levels: 1.1 crashed (notes §7)
        "FIF=rgb.tif&TIL=7,0",
        "FIF=rgb.tif&TIL=-1,0",
        "FIF=rgb.tif&TIL=1,-1",
        "FIF=rgb.tif&ROT=-90&JTL=1,0",  # 1.1: uninitialised memory (notes §9)
        "FIF=rgb.tif&ROT=-180&JTL=1,0",
    ],
    ids=["til-r-eq-levels", "til-r-past", "til-r-negative", "til-t-negative", "rot-90", "rot-180"],
)
def test_ours_survives_til_and_rot_crashers(ours: ServerProcess, query: str) -> None:
    mine = ours.get(query)
    problems = policy_problems(mine)
    if not (400 <= mine.status < 500 or (mine.status == 200 and "ROT" in query and _is_jpeg(mine))):
        problems.append(f"status {mine.status}: expected a 4xx error (or a JPEG for ROT)")
    _fail(query, None, mine, problems)


# ----------------------------------------------------------------------------------------
# Image sequences (notes §8): seq_pyr_<x>_<y>.tif, x in 0/10/20, y in 80/90.


def _quote_pfl_keys(body: bytes) -> bytes:
    """1.1 writes sequence PFL keys unquoted (invalid JSON); policy §2 quotes them."""
    return re.sub(rb"(?m)^(\t\t)(-?\d+):", rb'\1"\2":', body)


SEQUENCE_TEXT_QUERIES = [
    "FIF=seq&OBJ=Horizontal-views&OBJ=Vertical-views",
    "FIF=seq&OBJ=Max-size&OBJ=Resolution-number&OBJ=Bits-per-channel",
    "FIF=seq&OBJ=Min-Max-sample-values",
    "FIF=seq&SDS=20,80&OBJ=Horizontal-views&OBJ=Vertical-views",
    "FIF=seq&SDS=20,80&OBJ=Max-size&OBJ=Min-Max-sample-values",
    "FIF=seq&SDS=10,70&OBJ=Max-size",  # SDS opens no file in 1.1
    "FIF=seq&SPECTRA=1,1,10,10",
    "FIF=seq&SPECTRA=0,0,3,3",
    "FIF=seq&SDS=0,80&SPECTRA=1,0,100,100",
    "FIF=seq&SDS=20,80&SPECTRA=1,0,100,100",  # SDS x is ignored
    "FIF=seq&SPECTRA=1,1,100,100",  # edge tile: empty list
    "FIF=seq&SDS=20,80&TIL=0,0",
    "FIF=seq&SDS=10,90&TIL=1,1-0",
    "FIF=seq&SDS=10&JTL=0,0",  # SDS=v is x=y=v: missing file
    "FIF=seq&SDS=5,90&JTL=0,0",  # missing horizontal view
    "FIF=seq&SDS=10,70&PFL=0:3,3",  # missing vertical view
]


@pytest.mark.parametrize("query", SEQUENCE_TEXT_QUERIES, ids=lambda q: q.replace("FIF=seq&", ""))
def test_sequence_text(
    reference: ServerProcess, ours: ServerProcess, images: ImageSet, query: str
) -> None:
    ref, mine = _both(reference, ours, query)
    if ref.status == 404:
        expected = ref.body.replace(_prefix(images).encode(), b"")
        compare_text(query, ref, mine, _prefix(images), expected)
    elif b"TIL=" in query.encode():
        problems = common_problems(ref, mine, _prefix(images))
        if not problems:
            problems += compare_headers(ref, mine) + til_problems(ref, mine)
        _fail(query, ref, mine, problems)
    else:
        compare_text(query, ref, mine, _prefix(images))


@pytest.mark.parametrize(
    "query",
    [
        "FIF=seq&PFL=1:10,10-14,10",
        "FIF=seq&PFL=0:3,3",
        "FIF=seq&PFL=0:3,3-3,6",
        "FIF=seq&SDS=0,80&PFL=1:10,10-14,10",
        "FIF=seq&SDS=20,80&PFL=1:200,150-200,160",  # SDS x ignored, y used
        "FIF=seq&SDS=10,90&PFL=1:299,199",
    ],
    ids=lambda q: q.replace("FIF=seq&", ""),
)
def test_sequence_pfl(
    reference: ServerProcess, ours: ServerProcess, images: ImageSet, query: str
) -> None:
    """PFL across horizontal views: 1.1's text with the keys quoted (policy §2)."""
    import json

    ref, mine = _both(reference, ours, query)
    assert ref.status == 200 and b"\t\t10: [" in ref.body, _show(ref)
    compare_text(query, ref, mine, _prefix(images), _quote_pfl_keys(ref.body))
    assert set(json.loads(mine.body)["profile"]) == {"0", "10", "20"}


#: JTL/CVT of one view. Histogram-based requests (CNT=eq|st, COL=binary) keep the vertical
#: angle at 90: 1.1 computes the histogram once per image from view (0, current y) and keeps
#: it, so only one vertical angle gives order-independent answers.
SEQUENCE_IMAGE_QUERIES = [
    _p("FIF=seq&JTL=0,0", "default-view"),
    _p("FIF=seq&SDS=10,80&JTL=1,0", "sds-10-80"),
    _p("FIF=seq&SDS=20,90&JTL=1,1", "sds-20-90-edge"),
    _p("FIF=seq&SDS=0,80&JTL=1,1", "sds-0-80"),
    _p("FIF=seq&SDS=20,80&FIF=seq&JTL=1,0", "fif-resets-sds"),
    _p("FIF=seq&SDS=20,90&GAM=0.4545&CMP=jet&JTL=1,1", "sds-gam-jet", TOL_CMAP),
    _p("FIF=seq&SDS=10,80&GAM=0.4545&CTW=1;1;1&MINMAX=1:80,400&JTL=1,0", "sds-v2-minmax"),
    _p("FIF=seq&SDS=10,80&WID=100&CVT=jpeg", "sds-cvt"),
    _p("FIF=seq&SDS=20,90&RGN=0.2,0.2,0.5,0.5&WID=120&GAM=0.4545&CVT=jpeg", "sds-cvt-rgn"),
    _p("FIF=seq&CNT=eq&JTL=1,0", "eq-default-view", TOL_HIST),
    _p("FIF=seq&SDS=20,90&CNT=eq&JTL=1,0", "eq-view-20", TOL_HIST),
    _p("FIF=seq&SDS=10,90&CNT=st&JTL=1,1", "st-view-10", TOL_HIST),
    _p("FIF=seq&SDS=20,90&COL=binary&JTL=1,0", "binary-view-20", TOL_BINARY),
    _p("FIF=seq&SDS=10,90&CNT=eq&WID=100&CVT=jpeg", "eq-cvt-view-10", TOL_HIST),
]


@pytest.mark.parametrize(("query", "tol"), SEQUENCE_IMAGE_QUERIES)
def test_sequence_image(
    reference: ServerProcess, ours: ServerProcess, images: ImageSet, query: str, tol
) -> None:
    ref, mine = _both(reference, ours, query)
    compare_image(query, ref, mine, _prefix(images), tol)
    if "CVT" in query:
        assert mine.header("Content-Disposition") == 'inline;filename="seq.jpg"'


def test_reference_did_not_crash(reference: ServerProcess, server_pair: ServerPairs) -> None:
    """The tests above never sent 1.1 an input that kills it (every pair started so far)."""
    crashes = {"default": reference.crashes}
    crashes.update({str(key): ref.crashes for key, (ref, _) in server_pair.pairs.items()})
    assert all(not c for c in crashes.values()), crashes
