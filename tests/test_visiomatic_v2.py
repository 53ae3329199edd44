"""VisiOmatic v2 replay: the requests the v2 client sends, parsed the way the client parses them.

The v2 client (``src/TileLayer.IIP.js`` and friends on the ``legacy`` branch of
astromatic/visiomatic) exists in no package registry, so this is the CI-runnable check of
/work/shared/spec/visiomatic.md §(b) 10: a Python re-implementation of

* its metadata parsing (§1.2): ``new RegExp(key + ':' + valueRegex).exec(responseText)`` for the
  IIP keys, ``L.IIPUtils.readFITSKey`` for the FITS keys read by ``L.CRS.WCS._readWCS`` and the
  ``CHANnnnn`` channel labels, the Min-Max line split on ``/\\s+/`` with nchannel = tokens/2;
* its URL builders (§1.3, §1.4): ``getTileUrl`` (fixed parameter order, defaults omitted,
  ``GAM=(1/2.2).toFixed(4)``, 1-based MINMAX for changed channels only, CTW always and without
  brackets from ``rgbToMix`` or the mono one-hot rows, QLT only when not 90, JTL from
  floor-halved level sizes), the profile and spectrum ``PFL`` URLs, and the snapshot ``RGN``
  URL;

replayed against iipsrv 1.1 (the reference VisiOmatic v2 deployments ran on) and against our
server over the same STIFF-style images (``vm_*.tif`` in conftest: float32, SMin/SMax tags, a FITS
header in ImageDescription). Both must give the client the same parsed metadata, JPEG tiles of
the size the client lays out, decoded pixels within the differential suite's tolerances, the
same profile values, and the same snapshot. Ours alone must also turn a CDELT/PC header into the
CD matrix the client reads (1.1 has no conversion).

Nothing that crashes 1.1 is sent to it: PFL points stay inside the level, snapshot regions pass
the CVT model of ``docs/iipsrv-1.1-notes.md`` §1 (``cvt_model``) without problems, and upscaled
snapshots are compared without the bottom rows that 1.1 reads out of bounds (notes §2.3).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import pytest
from conftest import (
    VM_CD,
    VM_CDELT,
    VM_CHANNEL_LABELS,
    VM_CRVAL,
    VM_PC,
    VM_SIZE,
    ImageSet,
)
from conftest import TestImage as FixtureImage
from fcgi_client import Response
from reference import ServerProcess, jpeg_info, policy_problems
from test_differential_science import (
    TOL_CMAP,
    TOL_FLOAT,
    _rows_without_out_of_bounds,
    cvt_model,
    jpeg_problems,
)

pytestmark = pytest.mark.reference

#: The layer URL a page would give ``L.tileLayer.iip`` (the FastCGI script path of the harness).
ENDPOINT = "/fcgi-bin/iipsrv.fcgi"

# ----------------------------------------------------------------------------------------
# JavaScript semantics the client relies on


#: JS ``\s``: ECMAScript WhiteSpace and LineTerminator code points.
_JS_SPACE = (
    "[\\t\\n\\v\\f\\r \\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000\\ufeff]"
)
#: JS ``.`` without the ``s`` flag: anything but a line terminator (so it stops at ``\r``).
_JS_DOT = "[^\\n\\r\\u2028\\u2029]"


def js_regexp(source: str) -> re.Pattern[str]:
    """``new RegExp(source)`` as a Python pattern with the JS meanings of ``\\s``, ``\\d``
    (ASCII) and ``.`` (stops at any line terminator); character classes are copied as they are
    (the client's classes use neither)."""
    out: list[str] = []
    i, in_class = 0, False
    while i < len(source):
        c = source[i]
        if c == "\\" and i + 1 < len(source):
            esc = source[i : i + 2]
            out.append(_JS_SPACE if esc == "\\s" and not in_class else esc)
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == ".":
            c = _JS_DOT
        out.append(c)
        i += 1
    return re.compile("".join(out), re.ASCII)


def js_exec(source: str, text: str) -> re.Match[str] | None:
    """``new RegExp(source).exec(text)``: the first match anywhere, no flags."""
    return js_regexp(source).search(text)


def js_split_spaces(text: str) -> list[str]:
    """``text.split(/\\s+/)`` (keeps empty leading/trailing tokens, unlike ``str.split()``)."""
    return js_regexp("\\s+").split(text)


_JS_FLOAT = re.compile(r"[+-]?(?:Infinity|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)")


def js_parse_float(text: str | None) -> float:
    """``parseFloat``: the longest decimal literal at the start (after white space), else NaN."""
    if text is None:
        return math.nan
    m = _JS_FLOAT.match(js_regexp("^\\s*").sub("", text, count=1))
    return float(m.group(0).replace("Infinity", "inf")) if m else math.nan


def js_parse_int(text: str | None) -> float:
    """``parseInt(text, 10)`` (NaN as a float when there is no number)."""
    m = re.match(r"[+-]?\d+", js_regexp("^\\s*").sub("", text or "", count=1), re.ASCII)
    return int(m.group(0)) if m else math.nan


def js_number(x: float) -> str:
    """``Number.prototype.toString()`` (ECMAScript Number::toString, radix 10)."""
    if math.isnan(x):
        return "NaN"
    if x == 0:
        return "0"
    if x < 0:
        return "-" + js_number(-x)
    if math.isinf(x):
        return "Infinity"
    _, digits, exponent = Decimal(repr(float(x))).normalize().as_tuple()
    s = "".join(map(str, digits))
    k, n = len(s), int(exponent) + len(s)
    if k <= n <= 21:
        return s + "0" * (n - k)
    if 0 < n <= 21:
        return s[:n] + "." + s[n:]
    if -6 < n <= 0:
        return "0." + "0" * -n + s
    e = f"+{n - 1}" if n - 1 >= 0 else str(n - 1)
    return (s if k == 1 else s[0] + "." + s[1:]) + "e" + e


def js_to_fixed(x: float, digits: int) -> str:
    """``Number.prototype.toFixed(digits)`` for |x| < 1e21: the exact binary value rounded
    half away from zero."""
    if x == 0:  # -0 < 0 is false: no sign
        x = 0.0
    return str(Decimal(x).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def test_js_helpers() -> None:
    """The JS emulation itself, on values whose JS results are known."""
    assert js_number(2.5) == "2.5" and js_number(3.0) == "3" and js_number(90.0) == "90"
    assert js_number(2 / 3) == "0.6666666666666666" and js_number(-1 / 3) == "-0.3333333333333333"
    assert js_number(-0.284) == "-0.284" and js_number(700 / 375) == "1.8666666666666667"
    assert js_number(1e21) == "1e+21" and js_number(1.5e-7) == "1.5e-7"
    assert js_number(123456789012345680000.0) == "123456789012345680000"
    assert js_number(0.000001) == "0.000001" and js_number(-5.6e-05) == "-0.000056"
    assert js_to_fixed(1 / 2.2, 4) == "0.4545" and js_to_fixed(1 / 1.5, 4) == "0.6667"
    assert js_to_fixed(999.5, 0) == "1000" and js_to_fixed(2.5, 0) == "3"
    assert js_to_fixed(-0.4, 0) == "-0" and js_to_fixed(-0.0, 0) == "0"
    assert js_to_fixed(1.005, 2) == "1.00"  # 1.005 is 1.00499999… in binary, as in JS
    assert js_split_spaces("1  2 ") == ["1", "2", ""]
    assert js_exec("a:\\s*(.*)", "a: 1 2\r\nb").group(1) == "1 2"
    assert js_exec("k:(\\d+)", "k:\u0661\u0662") is None  # JS \d is ASCII only
    assert js_parse_float(" -5.6E-05xyz") == -5.6e-05 and math.isnan(js_parse_float("x"))
    assert js_parse_int("600 ") == 600 and math.isnan(js_parse_int(""))


# ----------------------------------------------------------------------------------------
# The client's metadata parsing (TileLayer.IIP.js _parseMetadata, CRS.WCS.js _readWCS)


#: L.IIPUtils.REG_PDEC
REG_PDEC = "(\\d+\\.\\d*)"


def read_iip_key(text: str, keyword: str, regexp: str) -> re.Match[str] | None:
    """``layer._readIIPKey``: ``new RegExp(keyword + ':' + regexp).exec(text)``."""
    return js_exec(keyword + ":" + regexp, text)


def read_fits_key(keyword: str, text: str) -> str | None:
    """``L.IIPUtils.readFITSKey``: the quoted string (group 1) or the number (group 2) after
    the 8-column keyword and ``=``, searched in the whole response."""
    key = keyword.strip().upper()[:8]
    nspace = 8 - len(key)
    source = (
        key
        + (f"\\ {{{nspace}}}" if nspace > 0 else "")
        + "=\\ *(?:'((?:\\ *[^'\\ ]+)*)\\ *'|([-+]?[0-9]*\\.?[0-9]+(?:[eE][-+]?[0-9]+)?))"
    )
    m = js_exec(source, text)
    if not m:
        return None
    return m.group(1) if m.group(1) else m.group(2)


class ClientBreaks(AssertionError):
    """The v2 client would stop here (an exception, or an alert before the map appears)."""


@dataclass
class V2Metadata:
    """What ``_parseMetadata`` and ``L.CRS.WCS`` keep from the OBJ reply."""

    iip: str | None
    max_size: tuple[int, int]
    tile_size: tuple[int, int]
    resolutions: int
    bits: int
    minmax_tokens: list[str]
    min_values: list[float]
    max_values: list[float]
    nchannel: float
    labels: list[str]
    wcs: dict[str, str | int | float] = field(default_factory=dict)

    @property
    def max_zoom(self) -> int:
        return self.resolutions - 1

    def image_size(self, z: int) -> tuple[int, int]:
        """``iipImageSize[z]``: floor-halved level size."""
        f = 2 ** (self.max_zoom - z)
        return math.floor(self.max_size[0] / f), math.floor(self.max_size[1] / f)

    def grid_size(self, z: int) -> tuple[int, int]:
        """``iipGridSize[z]``."""
        w, h = self.image_size(z)
        return math.ceil(w / self.tile_size[0]), math.ceil(h / self.tile_size[1])

    def tile_display_size(self, z: int, x: int, y: int) -> tuple[int, int]:
        """``_initTile``: the CSS size the client gives a native tile (edge tiles cropped)."""
        (w, h), (gx, gy), (tw, th) = self.image_size(z), self.grid_size(z), self.tile_size
        sx = w % tw if x + 1 == gx else tw
        sy = h % th if y + 1 == gy else th
        return sx or tw, sy or th


#: Keys ``L.CRS.WCS._readWCS`` reads, with the parser it applies.
_WCS_KEYS: list[tuple[str, str]] = [
    ("CTYPE1", "str"),
    ("CTYPE2", "str"),
    ("NAXIS1", "int"),
    ("NAXIS2", "int"),
    ("CRPIX1", "float"),
    ("CRPIX2", "float"),
    ("CRVAL1", "float"),
    ("CRVAL2", "float"),
    ("LONPOLE", "float"),
    ("LATPOLE", "float"),
    ("CD1_1", "float"),
    ("CD1_2", "float"),
    ("CD2_1", "float"),
    ("CD2_2", "float"),
    *[(f"PV{d}_{j}", "float") for d in (1, 2) for j in range(20)],
]


def parse_v2_metadata(resp: Response) -> V2Metadata:
    """Parse an OBJ reply exactly as the v2 client does; raise ClientBreaks where it fails."""
    if resp.status != 200:
        raise ClientBreaks(
            f"status {resp.status}: alert 'There was a problem with the IIP metadata request.'"
        )
    text = resp.body.decode("utf-8", "replace")  # XHR responseText (no charset: UTF-8)
    iip = read_iip_key(text, "IIP", REG_PDEC)

    def need(keyword: str, regexp: str) -> re.Match[str]:
        m = read_iip_key(text, keyword, regexp)
        if m is None:  # matches[1] of null: TypeError, the layer never loads
            raise ClientBreaks(f"{keyword!r} does not match {regexp!r}: TypeError in the client")
        return m

    m = need("Max-size", "(\\d+)\\s+(\\d+)")
    max_size = (js_parse_int(m.group(1)), js_parse_int(m.group(2)))
    m = need("Tile-size", "(\\d+)\\s+(\\d+)")
    tile_size = (js_parse_int(m.group(1)), js_parse_int(m.group(2)))
    resolutions = js_parse_int(need("Resolution-number", "(\\d+)").group(1))
    bits = js_parse_int(need("Bits-per-channel", "(\\d+)").group(1))
    tokens = js_split_spaces(need("Min-Max-sample-values", "\\s*(.*)").group(1))
    nchannel = len(tokens) / 2
    mins, maxs = [], []
    for c in range(math.ceil(nchannel)):  # JS: for (c = 0; c < nchannel; c++)
        mins.append(js_parse_float(tokens[2 * c] if 2 * c < len(tokens) else None))
        maxs.append(js_parse_float(tokens[2 * c + 1] if 2 * c + 1 < len(tokens) else None))
    labels = []
    for c in range(math.ceil(nchannel)):
        numstr = str(c + 1)
        prefix = "000" if c < 9 else ("00" if c < 99 else ("0" if c < 999 else ""))
        value = read_fits_key("CHAN" + prefix + numstr, text)
        labels.append(value if value else "Channel #" + numstr)
    wcs: dict[str, str | int | float] = {}
    for key, kind in _WCS_KEYS:
        value = read_fits_key(key, text)
        if not value:  # if ((v = key(...)))
            continue
        if key == "LATPOLE":  # projparam.natpol.lat = …: natpol is undefined (TypeError)
            raise ClientBreaks("LATPOLE in the header: TypeError in L.CRS.WCS._readWCS")
        wcs[key] = (
            value
            if kind == "str"
            else js_parse_int(value)
            if kind == "int"
            else js_parse_float(value)
        )
    return V2Metadata(
        iip.group(1) if iip else None,
        max_size,
        tile_size,
        resolutions,
        bits,
        tokens,
        mins,
        maxs,
        nchannel,
        labels,
        wcs,
    )


def metadata_problems(meta: V2Metadata) -> list[str]:
    """What the client does not check but needs (§(b) 10): a whole channel count, finite
    numbers, the IIP line, a projection it knows."""
    problems = []
    if meta.iip is None:
        problems.append("no IIP:<version> line: alert 'Unexpected response from IIP server'")
    if meta.nchannel != int(meta.nchannel) or "" in meta.minmax_tokens:
        problems.append(f"Min-Max tokens {meta.minmax_tokens}: nchannel = {meta.nchannel}")
    if not all(math.isfinite(v) for v in meta.min_values + meta.max_values):
        problems.append(
            f"non-finite min/max {meta.min_values} {meta.max_values} (MINMAX=1:NaN,NaN)"
        )
    if not all(isinstance(v, int) and v > 0 for v in (*meta.max_size, *meta.tile_size)):
        problems.append(f"sizes {meta.max_size} {meta.tile_size}")
    return problems


# ----------------------------------------------------------------------------------------
# The client's URL builders (getTileUrl, Control.IIP.Profile, Control.IIP.Image snapshot)

#: iipdefault.channelColors: the palette for N active channels.
CHANNEL_COLORS = [
    [""],
    ["#FFFFFF"],
    ["#00BAFF", "#FFBA00"],
    ["#0000FF", "#00FF00", "#FF0000"],
    ["#0000E0", "#00BA88", "#88BA00", "#E00000"],
    ["#0000CA", "#007BA8", "#00CA00", "#A87B00", "#CA0000"],
    ["#0000BA", "#00719B", "#009B71", "#719B00", "#9B7100", "#BA0000"],
]


def _hex_rgb(color: str) -> tuple[float, float, float]:
    """``L.rgb('#RRGGBB')``."""
    v = int(color[1:], 16)
    return ((v >> 16) & 255) / 255.0, ((v >> 8) & 255) / 255.0, (v & 255) / 255.0


class V2Layer:
    """The state of ``L.TileLayer.IIP`` once its metadata is parsed (default options), with the
    attributes the controls change (``iipContrast`` → ``contrast`` …) and its URL builders."""

    def __init__(self, url: str, meta: V2Metadata, mode: str = "color", channel: int = 0) -> None:
        self.url = re.sub(r"&.*$", "", url)  # initialize: this._url = url.replace(/\&.*$/g, '')
        title = re.match(r"^.*/(.*)\..*$", self.url)
        if title is None:  # this._url.match(…)[1] of null
            raise ClientBreaks(f"layer URL {self.url!r}: no title, TypeError (issue #2)")
        self.title = title.group(1)
        self.meta = meta
        self.mode = mode
        self.channel = channel
        self.contrast: float = 1.0
        self.color_sat: float = 1.0
        self.cmap = "grey"
        self.invert = False
        self.quality = 90
        # "Only 32bit data are likely to be linearly quantized"
        self.gamma: float = 2.2 if meta.bits >= 32 else 1.0
        self.nchannel = int(meta.nchannel)
        self.default_min = list(meta.min_values)
        self.default_max = list(meta.max_values)
        self.min_value = list(meta.min_values)
        self.max_value = list(meta.max_values)
        # channelLabelMatch '.*' flags every channel; palettes stop at 6 channels.
        nchanon = min(self.nchannel, len(CHANNEL_COLORS) - 1)
        self.rgb = [
            _hex_rgb(CHANNEL_COLORS[nchanon][c]) if c < nchanon else (0.0, 0.0, 0.0)
            for c in range(self.nchannel)
        ]
        self.mix: list[list[float]] = [[0.0, 0.0, 0.0] for _ in range(self.nchannel)]
        self.update_mix()

    def _gamma_corr(self, val: float) -> float:
        return math.pow(val, self.gamma) if val > 0.0 else 0.0

    def rgb_to_mix(self, chan: int) -> None:
        """``rgbToMix``: the channel's row of the mixing matrix (same float operations)."""
        cr, cg, cb = (self._gamma_corr(v) for v in self.rgb[chan])
        lum = (cr + cg + cb) / 3.0
        alpha = self.color_sat / 3.0
        self.mix[chan][0] = lum + alpha * (2.0 * cr - cg - cb)
        self.mix[chan][1] = lum + alpha * (2.0 * cg - cr - cb)
        self.mix[chan][2] = lum + alpha * (2.0 * cb - cr - cg)

    def update_mix(self) -> None:
        """``updateMix`` / Control.IIP.Image ``_updateMix`` (after a colour saturation change)."""
        for c in range(self.nchannel):
            self.rgb_to_mix(c)

    def set_min_max(self, chan: int, lo: float, hi: float) -> None:
        self.min_value[chan], self.max_value[chan] = lo, hi

    def settings(self) -> str:
        """``getTileUrl`` up to (not including) ``&JTL=``."""
        s = self.url
        if self.cmap != "grey":
            s += "&CMP=" + self.cmap
        if self.invert:
            s += "&INV"
        if self.contrast != 1:
            s += "&CNT=" + js_number(self.contrast)
        if self.gamma != 1:
            s += "&GAM=" + js_to_fixed(1.0 / self.gamma, 4)
        for c in range(self.nchannel):
            if self.min_value[c] != self.default_min[c] or self.max_value[c] != self.default_max[c]:
                s += (
                    f"&MINMAX={c + 1}:{js_number(self.min_value[c])},{js_number(self.max_value[c])}"
                )
        s += "&CTW="
        rows = []
        if self.mode == "color":
            for n in range(3):
                rows.append(",".join(js_number(self.mix[m][n]) for m in range(self.nchannel)))
        else:
            cc = self.channel if self.channel < self.nchannel else 0
            rows = [",".join("1" if cc == m else "0" for m in range(cc + 1))] * 3
        s += ";".join(rows)
        if self.quality != 90:
            s += "&QLT=" + js_number(self.quality)
        return s

    def tile_url(self, z: int, x: int, y: int) -> str:
        """``getTileUrl({x, y})`` at zoom z (clamped to the native levels)."""
        z = min(z, self.meta.max_zoom)
        return f"{self.settings()}&JTL={z},{x + self.meta.grid_size(z)[0] * y}"

    def tiles(self, z: int) -> list[tuple[int, int]]:
        gx, gy = self.meta.grid_size(z)
        return [(x, y) for y in range(gy) for x in range(gx)]

    def profile_url(self, p1: tuple[float, float], p2: tuple[float, float]) -> str:
        """Profile line from p1 to the map centre p2 (projected pixels at the native zoom):
        ``_updateLine`` forces it horizontal or vertical, ``_profileEnd`` orders the ends."""
        (x1, y1), (x2, y2) = p1, p2
        if abs(x1 - x2) > abs(y1 - y2):
            y2 = y1
        else:
            x2 = x1
        x1, x2 = min(x1, x2), max(x1, x2)
        y1, y2 = min(y1, y2), max(y1, y2)
        f = [js_to_fixed(v, 0) for v in (x1, y1, x2, y2)]
        return f"{self.url}&PFL={self.meta.max_zoom}:{f[0]},{f[1]}-{f[2]},{f[3]}"

    def spectrum_url(self, centre: tuple[float, float]) -> str:
        """Spectrum button: the map centre rounded (``Point.round``) at the native zoom."""
        x, y = (js_to_fixed(math.floor(v + 0.5), 0) for v in centre)
        return f"{self.url}&PFL={self.meta.max_zoom}:{x},{y}-{x},{y}"

    def snapshot_url(self, zoom: int, top_left: tuple[int, int], size: tuple[int, int]) -> str:
        """Snapshot button (``_snapType`` 0): ``getTileUrl({x:1, y:1})`` with ``JTL=z,i``
        replaced by the map's pixel bounds as image fractions, ``WID`` and ``CVT=jpeg``."""
        zfac = 1
        if zoom > self.meta.max_zoom:
            zfac = 2 ** (zoom - self.meta.max_zoom)
            zoom = self.meta.max_zoom
        w, h = self.meta.image_size(zoom)
        sizex, sizey = w * zfac, h * zfac
        (minx, miny), (dx, dy) = top_left, size
        rgn = (
            f"RGN={js_number(minx / sizex)},{js_number(miny / sizey)},"
            f"{js_number(dx / sizex)},{js_number(dy / sizey)}"
            f"&WID={js_number(math.floor(dx / zfac))}&CVT=jpeg"
        )
        return re.sub(r"JTL=\d+,\d+", rgn, self.tile_url(zoom, 1, 1))


def query_of(url: str) -> str:
    return url.split("?", 1)[1]


def layer_url(image: str) -> str:
    return f"{ENDPOINT}?FIF={image}"


def metadata_query(image: str) -> str:
    """``getIIPMetaData``: the fixed OBJ request."""
    return query_of(
        layer_url(image)
        + "&obj=IIP,1.0&obj=max-size&obj=tile-size"
        + "&obj=resolution-number&obj=bits-per-channel"
        + "&obj=min-max-sample-values&obj=subject"
    )


# ----------------------------------------------------------------------------------------
# Helpers


def _show(resp: Response, limit: int = 200) -> str:
    if resp.body.startswith(b"\xff\xd8"):
        return f"{resp.status} {resp.header('Content-Type')!r} JPEG ({len(resp.body)} bytes)"
    return f"{resp.status} {resp.raw[:limit]!r}"


def _report(problems: Sequence[str], limit: int = 12) -> None:
    if problems:
        more = f"\n… and {len(problems) - limit} more" if len(problems) > limit else ""
        pytest.fail("\n".join(problems[:limit]) + more, pytrace=False)


def _metadata(server: ServerProcess, image: str) -> V2Metadata:
    resp = server.get(metadata_query(image))
    try:
        return parse_v2_metadata(resp)
    except ClientBreaks as exc:
        pytest.fail(f"{server.name}: {exc}\n  reply: {_show(resp, 600)}", pytrace=False)


def _layers(
    reference: ServerProcess, ours: ServerProcess, image: str, mode: str = "color", channel: int = 0
) -> tuple[V2Layer, V2Layer]:
    """The layer each server's own metadata gives the client."""
    return (
        V2Layer(layer_url(image), _metadata(reference, image), mode, channel),
        V2Layer(layer_url(image), _metadata(ours, image), mode, channel),
    )


def _jpeg_size(resp: Response) -> tuple[int, int] | None:
    if resp.status != 200 or not resp.body.startswith(b"\xff\xd8"):
        return None
    info = jpeg_info(resp.body)
    return info.width, info.height


def _image_problems(
    url: str,
    ref: Response,
    mine: Response,
    tol: tuple[int, float | None],
    expected_size: tuple[int, int] | None,
    rows: int | None = None,
) -> list[str]:
    """Both 200 image/jpeg of the expected size; same structure/quality; pixels within tol."""
    where = f"{query_of(url)}:"
    for name, resp in (("iipsrv", ref), ("ours", mine)):
        ctype = resp.header("Content-Type") or ""
        if resp.status != 200 or not ctype.startswith("image/jpeg") or _jpeg_size(resp) is None:
            return [f"{where} {name} answered {_show(resp)} (iipsrv {_show(ref)})"]
    sizes = _jpeg_size(ref), _jpeg_size(mine)
    if expected_size is not None and sizes != (expected_size, expected_size):
        return [
            f"{where} sizes iipsrv {sizes[0]}, ours {sizes[1]}, client lays out {expected_size}"
        ]
    problems = [f"{where} ours: {p}" for p in policy_problems(mine)]
    problems += [f"{where} {p}" for p in jpeg_problems(ref, mine, tol, rows=rows)]
    return problems


# ----------------------------------------------------------------------------------------
# Metadata


def _expected_wcs(image: FixtureImage) -> dict[str, str | int | float]:
    w, h = image.levels[0].shape[1], image.levels[0].shape[0]
    return {
        "CTYPE1": "RA---TAN",
        "CTYPE2": "DEC--TAN",
        "NAXIS1": w,
        "NAXIS2": h,
        "CRPIX1": w / 2 + 0.5,
        "CRPIX2": h / 2 + 0.5,
        "CRVAL1": VM_CRVAL[0],
        "CRVAL2": VM_CRVAL[1],
    }


@pytest.mark.parametrize("name", ["vm_single.tif", "vm_cube3.tif"])
def test_metadata(
    reference: ServerProcess, ours: ServerProcess, images: ImageSet, name: str
) -> None:
    """§(a) #1 and #11: status 200, every key parses, both servers give the client the same
    values, the values are the image's, and the Min-Max line has no trailing white space."""
    query = metadata_query(name)
    ref, mine = reference.get(query), ours.get(query)
    problems = []
    metas = {}
    for server, resp in (("iipsrv", ref), ("ours", mine)):
        try:
            metas[server] = meta = parse_v2_metadata(resp)
        except ClientBreaks as exc:
            problems.append(f"{server}: {exc}: {_show(resp, 400)}")
            continue
        problems += [f"{server}: {p}" for p in metadata_problems(meta)]
        line = re.search(rb"Min-Max-sample-values:[^\r\n]*", resp.body)
        if line is None or line.group(0) != line.group(0).rstrip():
            problems.append(f"{server}: Min-Max line {line and line.group(0)!r}")
    _report(problems)
    ref_meta, our_meta = metas["iipsrv"], metas["ours"]
    if ref_meta != our_meta:
        problems.append(f"parsed metadata differ:\n  iipsrv {ref_meta}\n  ours   {our_meta}")
    if mine.body != ref.body:
        problems.append(
            f"OBJ bodies differ:\n  iipsrv {ref.body[:300]!r}\n  ours   {mine.body[:300]!r}"
        )
    problems += policy_problems(mine)

    image = images[name]
    nchan = image.channels
    expected = {
        "iip": "1.0",
        "max_size": VM_SIZE,
        "tile_size": (256, 256),
        "resolutions": 3,
        "bits": 32,
        "nchannel": nchan,
        # SMin/SMaxSampleValue as the float32 values both servers print with %.9g
        "min_values": [float(f"{np.float32(v):.9g}") for v in image.smin or ()],
        "max_values": [float(f"{np.float32(v):.9g}") for v in image.smax or ()],
        "labels": list(VM_CHANNEL_LABELS) if nchan == 3 else ["Channel #1"],
        "wcs": _expected_wcs(image) | VM_CD,
    }
    for key, want in expected.items():
        got = getattr(our_meta, key)
        if got != want:
            problems.append(f"ours: {key} = {got!r}, the image has {want!r}")
    # The title regex needs a '/' and a later '.' (issue #2); greedy, it takes the script name.
    assert V2Layer(layer_url(name), our_meta).title == "iipsrv.fcgi?FIF=" + name.rsplit(".", 1)[0]
    _report(problems)


#: CD = CDELT_i·PC_ij for vm_cdeltpc.tif.
CDELT_PC_CD = {
    "CD1_1": VM_CDELT[0] * VM_PC["PC1_1"],
    "CD1_2": VM_CDELT[0] * VM_PC["PC1_2"],
    "CD2_1": VM_CDELT[1] * VM_PC["PC2_1"],
    "CD2_2": VM_CDELT[1] * VM_PC["PC2_2"],
}


def test_cdelt_pc_header_gets_a_cd_matrix(ours: ServerProcess) -> None:
    """Ours only (1.1 has no conversion): a header with CDELT/PC and no CD reaches the client
    with CD1_1…CD2_2 = CDELT_i·PC_ij, readable by readFITSKey, next to the other WCS keys."""
    meta = _metadata(ours, "vm_cdeltpc.tif")
    problems = [f"ours: {p}" for p in metadata_problems(meta)]
    for key, want in CDELT_PC_CD.items():
        got = meta.wcs.get(key)
        if not isinstance(got, float) or not math.isclose(got, want, rel_tol=1e-12):
            problems.append(f"ours: {key} reads as {got!r}, CDELT·PC = {want!r}")
    rest = {k: v for k, v in meta.wcs.items() if k not in CDELT_PC_CD}
    want_rest = {
        "CTYPE1": "RA---TAN",
        "CTYPE2": "DEC--TAN",
        "NAXIS1": 300,
        "NAXIS2": 200,
        "CRPIX1": 150.5,
        "CRPIX2": 100.5,
        "CRVAL1": VM_CRVAL[0],
        "CRVAL2": VM_CRVAL[1],
    }
    if rest != want_rest:
        problems.append(f"ours: other WCS keys {rest}, the header has {want_rest}")
    _report(problems)


def test_cdelt_pc_metadata_otherwise_as_iipsrv(
    reference: ServerProcess, ours: ServerProcess
) -> None:
    """1.1 sends the CDELT/PC header unchanged (the client then falls back to an identity CD,
    i.e. no usable WCS); everything else the client parses is the same from both servers."""
    ref_meta = _metadata(reference, "vm_cdeltpc.tif")
    our_meta = _metadata(ours, "vm_cdeltpc.tif")
    assert not any(k in ref_meta.wcs for k in CDELT_PC_CD), ref_meta.wcs
    problems = []
    rest = {k: v for k, v in our_meta.wcs.items() if k not in CDELT_PC_CD}
    if rest != ref_meta.wcs:
        problems.append(f"WCS keys other than CD: iipsrv {ref_meta.wcs}, ours {rest}")
    ref_meta.wcs, our_meta.wcs = {}, {}
    if ref_meta != our_meta:
        problems.append(f"parsed metadata differ:\n  iipsrv {ref_meta}\n  ours   {our_meta}")
    _report(problems)


def test_cd_header_keeps_fits_blocks(ours: ServerProcess) -> None:
    """The converted header is still a FITS header: 80-column cards up to END, padded to
    2880·k bytes (visiomatic.md §6: ``subject/<len>:<2880·k bytes of 80-col cards>``)."""
    resp = ours.get("FIF=vm_cdeltpc.tif&OBJ=subject")
    m = re.fullmatch(rb"\r\nsubject/(\d+):(.*)\r\n", resp.body, re.S)
    assert m and int(m.group(1)) == len(m.group(2)), _show(resp, 300)
    header = m.group(2).decode("ascii")
    cards = [header[i : i + 80] for i in range(0, len(header), 80)]
    end = next((i for i, c in enumerate(cards) if c.rstrip() == "END"), None)
    problems = []
    if end is None:
        problems.append("no END card")
    elif any(c.strip() for c in cards[end + 1 :]):
        problems.append("cards after END")
    if len(header) % 2880:
        problems.append(
            f"length {len(header)} is not a multiple of 2880 ({len(cards)} cards, END is card "
            f"{end}: the CD cards were inserted without taking the padding after END)"
        )
    _report(problems)


# ----------------------------------------------------------------------------------------
# Tiles

#: Tiles of the finest level requested with changed settings (corner, right, bottom, last).
FINEST_SAMPLE = [(0, 0), (2, 0), (0, 1), (2, 1)]


@dataclass
class Session:
    """One viewing session: the layer's mode and the controls the user moved."""

    image: str
    mode: str = "color"
    channel: int = 0
    contrast: float = 1.0
    color_sat: float | None = None
    gamma: float | None = None
    cmap: str = "grey"
    invert: bool = False
    quality: int = 90
    minmax: dict[int, tuple[float, float]] = field(default_factory=dict)
    tol: tuple[int, float | None] = TOL_FLOAT
    all_finest: bool = False
    #: §(a) examples this session must reproduce: (z, x, y, query).
    expect: list[tuple[int, int, int, str]] = field(default_factory=list)

    def apply(self, layer: V2Layer) -> V2Layer:
        layer.contrast, layer.cmap, layer.invert = self.contrast, self.cmap, self.invert
        layer.quality = self.quality
        if self.gamma is not None:
            layer.gamma = self.gamma
        if self.color_sat is not None:
            layer.color_sat = self.color_sat
            layer.update_mix()
        for c, (lo, hi) in self.minmax.items():
            layer.set_min_max(c, lo, hi)
        return layer


SESSIONS = {
    # §(a) #2; mono mode on one channel sends the same URLs (CTW=1;1;1).
    "single-default": Session(
        "vm_single.tif",
        all_finest=True,
        expect=[(1, 0, 0, "FIF=vm_single.tif&GAM=0.4545&CTW=1;1;1&JTL=1,0")],
    ),
    # §(a) #3: colour map, inversion, contrast, min/max and quality changed.
    "single-jet-inv-cnt-minmax-qlt": Session(
        "vm_single.tif",
        cmap="jet",
        invert=True,
        contrast=2.5,
        minmax={0: (90.0, 500.5)},
        quality=75,
        tol=TOL_CMAP,
        expect=[
            (
                2,
                1,
                1,
                "FIF=vm_single.tif&CMP=jet&INV&CNT=2.5&GAM=0.4545&MINMAX=1:90,500.5"
                "&CTW=1;1;1&QLT=75&JTL=2,4",
            )
        ],
    ),
    # gamma set to 1 (no GAM), cold map, low contrast, higher quality.
    "single-linear-cold": Session(
        "vm_single.tif",
        mode="mono",
        gamma=1.0,
        cmap="cold",
        contrast=0.75,
        quality=95,
        tol=TOL_CMAP,
        expect=[(0, 0, 0, "FIF=vm_single.tif&CMP=cold&CNT=0.75&CTW=1;1;1&QLT=95&JTL=0,0")],
    ),
    # §(a) #12.
    "cube-color-default": Session(
        "vm_cube3.tif",
        all_finest=True,
        expect=[(1, 0, 0, "FIF=vm_cube3.tif&GAM=0.4545&CTW=0,0,1;0,1,0;1,0,0&JTL=1,0")],
    ),
    # §(a) #13.
    "cube-color-cnt3": Session(
        "vm_cube3.tif",
        contrast=3.0,
        tol=TOL_CMAP,
        expect=[(2, 2, 1, "FIF=vm_cube3.tif&CNT=3&GAM=0.4545&CTW=0,0,1;0,1,0;1,0,0&JTL=2,5")],
    ),
    # colour saturation 2: negative off-diagonal weights; one channel's cuts changed.
    "cube-color-saturated-minmax": Session(
        "vm_cube3.tif",
        color_sat=2.0,
        minmax={1: (90.0, 400.0)},
        quality=80,
        tol=TOL_CMAP,
        expect=[
            (
                0,
                0,
                0,
                "FIF=vm_cube3.tif&GAM=0.4545&MINMAX=2:90,400"
                "&CTW=-0.3333333333333333,-0.3333333333333333,1.6666666666666665"
                ";-0.3333333333333333,1.6666666666666665,-0.3333333333333333"
                ";1.6666666666666665,-0.3333333333333333,-0.3333333333333333&QLT=80&JTL=0,0",
            )
        ],
    ),
    # §(a) #14: mono mode on channel 3.
    "cube-mono-ch3": Session(
        "vm_cube3.tif",
        mode="mono",
        channel=2,
        expect=[(1, 0, 0, "FIF=vm_cube3.tif&GAM=0.4545&CTW=0,0,1;0,0,1;0,0,1&JTL=1,0")],
    ),
    # mono on channel 1 of a cube: CTW=1;1;1 keeps 3 bands in 1.1 (R=G=B=channel 1).
    "cube-mono-ch1": Session(
        "vm_cube3.tif",
        mode="mono",
        channel=0,
        expect=[(1, 1, 0, "FIF=vm_cube3.tif&GAM=0.4545&CTW=1;1;1&JTL=1,1")],
    ),
    "cube-mono-ch2-hot-inv-minmax": Session(
        "vm_cube3.tif",
        mode="mono",
        channel=1,
        cmap="hot",
        invert=True,
        contrast=2.5,
        minmax={1: (85.0, 600.0)},
        quality=75,
        tol=TOL_CMAP,
        expect=[
            (
                1,
                0,
                0,
                "FIF=vm_cube3.tif&CMP=hot&INV&CNT=2.5&GAM=0.4545&MINMAX=2:85,600"
                "&CTW=0,1;0,1;0,1&QLT=75&JTL=1,0",
            )
        ],
    ),
}


@pytest.mark.parametrize("session", SESSIONS.values(), ids=SESSIONS.keys())
def test_tiles(reference: ServerProcess, ours: ServerProcess, session: Session) -> None:
    """Every tile of the two coarsest levels and all (defaults) or a sample (changed settings)
    of the finest, built from each server's own metadata: same URLs, JPEGs of the size the
    client lays out (edge tiles cropped), same quality, decoded pixels within tolerance."""
    ref_layer, our_layer = (
        session.apply(layer)
        for layer in _layers(reference, ours, session.image, session.mode, session.channel)
    )
    for z, x, y, query in session.expect:
        assert query_of(our_layer.tile_url(z, x, y)) == query
    meta = our_layer.meta
    problems: list[str] = []
    for z in range(meta.resolutions):
        coords = our_layer.tiles(z)
        if z == meta.max_zoom and not session.all_finest:
            coords = [c for c in coords if c in FINEST_SAMPLE]
        for x, y in coords:
            url, ref_url = our_layer.tile_url(z, x, y), ref_layer.tile_url(z, x, y)
            if url != ref_url:
                problems.append(f"the client builds {ref_url!r} for iipsrv, {url!r} for ours")
                continue
            ref, mine = reference.get(query_of(url)), ours.get(query_of(url))
            problems += _image_problems(
                url, ref, mine, session.tol, meta.tile_display_size(z, x, y)
            )
    _report(problems)


# ----------------------------------------------------------------------------------------
# Profiles and spectra


@pytest.mark.parametrize(
    ("name", "kind", "p1", "p2", "expected"),
    [
        # drag from p1 to the map centre p2; the client keeps the dominant direction
        ("vm_single.tif", "line", (330.6, 301.2), (210.3, 296.8), "PFL=2:210,301-331,301"),
        ("vm_single.tif", "line", (500.2, 300.4), (497.9, 120.0), "PFL=2:500,120-500,300"),
        ("vm_single.tif", "spectrum", (299.5, 224.6), None, "PFL=2:300,225-300,225"),
        ("vm_cube3.tif", "line", (10.0, 440.0), (590.4, 430.0), "PFL=2:10,440-590,440"),
        ("vm_cube3.tif", "line", (255.0, 0.0), (256.0, 449.4), "PFL=2:255,0-255,449"),
        ("vm_cube3.tif", "spectrum", (300.0, 225.0), None, "PFL=2:300,225-300,225"),
        ("vm_cube3.tif", "spectrum", (0.2, 449.4), None, "PFL=2:0,449-0,449"),
    ],
    ids=[
        "single-horizontal",
        "single-vertical",
        "single-spectrum",
        "cube-horizontal",
        "cube-vertical",
        "cube-spectrum-centre",
        "cube-spectrum-corner",
    ],
)
def test_profile(
    reference: ServerProcess,
    ours: ServerProcess,
    images: ImageSet,
    name: str,
    kind: str,
    p1: tuple[float, float],
    p2: tuple[float, float] | None,
    expected: str,
) -> None:
    """§(a) #4, #15: ``JSON.parse`` works on our reply, ``profile`` holds npix·nchan numbers,
    the same values as 1.1's, and they are the image's pixels (top-left origin)."""
    ref_layer, our_layer = _layers(reference, ours, name)
    url = our_layer.spectrum_url(p1) if p2 is None else our_layer.profile_url(p1, p2)
    assert url == (ref_layer.spectrum_url(p1) if p2 is None else ref_layer.profile_url(p1, p2))
    assert query_of(url) == f"FIF={name}&{expected}"
    nums = [int(v) for v in re.findall(r"\d+", expected.split(":", 1)[1])]
    x1, y1, x2, y2 = nums
    level = images[name].level(our_layer.meta.max_zoom)
    h, w = level.shape[:2]
    assert 0 <= x1 <= x2 < w and 0 <= y1 <= y2 < h  # inside the level (notes §5)
    ref, mine = reference.get(query_of(url)), ours.get(query_of(url))
    problems = []
    for server, resp in (("iipsrv", ref), ("ours", mine)):
        if resp.status != 200:
            problems.append(f"{server}: {_show(resp)}")
    _report(problems)
    try:
        our_profile = json.loads(mine.body)["profile"]
    except (ValueError, KeyError, TypeError) as exc:
        pytest.fail(f"JSON.parse fails on ours ({exc}): {mine.body[:300]!r}", pytrace=False)
    ref_profile = json.loads(ref.body)["profile"]  # no NaN in these images
    nchan = int(our_layer.meta.nchannel)
    if x2 > x1:
        pixels = level[y1, x1:x2]
    elif y2 > y1:
        pixels = level[y1:y2, x1]
    else:
        pixels = level[y1 : y1 + 1, x1]
    want = pixels.reshape(-1).tolist()  # channels interleaved per pixel
    if not isinstance(our_profile, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in our_profile
    ):
        problems.append(f"ours: profile is not a list of numbers: {our_profile!r:.200}")
    elif len(our_profile) % nchan or len(our_profile) != len(want):
        problems.append(f"ours: {len(our_profile)} numbers, npix·nchan = {len(want)}")
    if our_profile != ref_profile:
        problems.append(f"values differ:\n  iipsrv {ref_profile[:8]}…\n  ours   {our_profile[:8]}…")
    if len(our_profile) == len(want) and [np.float32(v) for v in our_profile] != want:
        problems.append(f"ours: values {our_profile[:6]}… are not the pixels {want[:6]}…")
    if not problems and kind == "spectrum":  # _extractAverage per channel
        npix = len(our_profile) // nchan
        averages = [
            sum(our_profile[i * nchan + c] for i in range(npix)) / npix for c in range(nchan)
        ]
        assert all(math.isfinite(a) for a in averages)
    _report(problems)


# ----------------------------------------------------------------------------------------
# Snapshots


@pytest.mark.parametrize(
    ("session", "zoom", "top_left", "size", "expected"),
    [
        # §(a) #5: the whole image in a 1024x700 map at zoom 0; 1.1 clamps the negative
        # fractions to the full image and upscales it to WID=1024.
        (
            "single-default",
            0,
            (-437, -294),
            (1024, 700),
            "RGN=-2.9133333333333336,-2.625,6.826666666666667,6.25&WID=1024&CVT=jpeg",
        ),
        # zoomed in past the native level (zfac 4), changed settings: an inner region.
        (
            "single-jet-inv-cnt-minmax-qlt",
            4,
            (688, 550),
            (1024, 700),
            "RGN=0.2866666666666667,0.3055555555555556,0.4266666666666667,0.3888888888888889"
            "&WID=256&CVT=jpeg",
        ),
        # colour at the native zoom, a map smaller than the image, offset from the corner.
        (
            "cube-color-saturated-minmax",
            2,
            (100, 80),
            (400, 300),
            "RGN=0.16666666666666666,0.17777777777777778,0.6666666666666666,0.6666666666666666"
            "&WID=400&CVT=jpeg",
        ),
        # mono on channel 3 at zoom 1, the map wider than the level (negative left).
        (
            "cube-mono-ch3",
            1,
            (-100, 20),
            (500, 180),
            "RGN=-0.3333333333333333,0.08888888888888889,1.6666666666666667,0.8&WID=500&CVT=jpeg",
        ),
    ],
    ids=["whole-negative-upscaled", "overzoom-inner", "colour-native", "mono-negative-left"],
)
def test_snapshot(
    reference: ServerProcess,
    ours: ServerProcess,
    images: ImageSet,
    session: str,
    zoom: int,
    top_left: tuple[int, int],
    size: tuple[int, int],
    expected: str,
) -> None:
    """§(a) #5: both JPEG, the same size (the one 1.1's CVT model gives), pixels compared
    where 1.1 is deterministic (upscaled outputs without the rows it reads out of bounds)."""
    s = SESSIONS[session]
    ref_layer, our_layer = (
        s.apply(layer) for layer in _layers(reference, ours, s.image, s.mode, s.channel)
    )
    url = our_layer.snapshot_url(zoom, top_left, size)
    assert url == ref_layer.snapshot_url(zoom, top_left, size)
    assert query_of(url) == f"{query_of(our_layer.settings())}&{expected}"
    rgn = re.search(r"RGN=([^&]*)&WID=(\d+)", url)
    assert rgn is not None
    region = tuple(float(v) for v in rgn.group(1).split(","))
    levels = [(lv.shape[1], lv.shape[0]) for lv in images[s.image].levels]
    model = cvt_model(levels, region, int(rgn.group(2)))
    assert not model.problem, f"harness: 1.1 would fail on {url}: {model}"
    ref, mine = reference.get(query_of(url)), ours.get(query_of(url))
    rows = _rows_without_out_of_bounds(model) if model.upscaled else None
    problems = _image_problems(url, ref, mine, s.tol, model.size, rows=rows)
    disposition = mine.header("Content-Disposition")
    if disposition != ref.header("Content-Disposition"):
        problems.append(
            f"Content-Disposition: iipsrv {ref.header('Content-Disposition')!r}, ours {disposition!r}"
        )
    _report(problems)
