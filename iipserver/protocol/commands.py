"""IIP commands: tokens parsed into typed, immutable command objects (no I/O, no numpy).

Parsing never raises. A token whose argument cannot be understood becomes an ``Invalid``
command holding the error, raised only when the command's turn comes, so that errors appear in
the order iipsrv would meet them.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

from iipserver.encoders import OutputFormat
from iipserver.errors import BannerError, IIPServerError, ProtocolError
from iipserver.protocol.query import Token, tokenize, url_decode

_INT = re.compile(r"\s*([+-]?\d+)")
_FLOAT = re.compile(
    r"\s*([+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf(?:inity)?|nan))", re.IGNORECASE
)


class Command:
    """Base of every parsed command."""


@dataclass(frozen=True)
class Fif(Command):
    """FIF: select the image (path URL-decoded once)."""

    path: str


@dataclass(frozen=True)
class Obj(Command):
    """OBJ: ask for a metadata object (name lower-cased)."""

    name: str


@dataclass(frozen=True)
class Quality(Command):
    """QLT: output quality."""

    value: int


@dataclass(frozen=True)
class Sequence(Command):
    """SDS: horizontal and vertical sequence angles."""

    x: int
    y: int


@dataclass(frozen=True)
class MinMax(Command):
    """MINMAX: normalisation range of one channel (0-based here) or of all (None)."""

    channel: int | None
    lo: float
    hi: float


@dataclass(frozen=True)
class Contrast(Command):
    """CNT: a multiplier, or ``eq`` (equalisation) / ``st`` (stretch)."""

    value: float = 1.0
    mode: str | None = None


@dataclass(frozen=True)
class Gamma(Command):
    """GAM: an exponent, or the logarithmic curve."""

    value: float = 1.0
    log: bool = False


@dataclass(frozen=True)
class Invert(Command):
    """INV: invert the normalised values."""


@dataclass(frozen=True)
class Colormap(Command):
    """CMP: colour-map name (lower-cased)."""

    name: str


@dataclass(frozen=True)
class ColorTwist(Command):
    """CTW: channel recombination matrix, one row per output channel."""

    matrix: tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class Shade(Command):
    """SHD: hill-shading light direction in degrees."""

    h_angle: int
    v_angle: int


@dataclass(frozen=True)
class Colour(Command):
    """COL: ``grey`` or ``binary`` output."""

    mode: str


@dataclass(frozen=True)
class Rotate(Command):
    """ROT: rotation in degrees and flip (0 none, 1 horizontal, 2 vertical)."""

    angle: float
    flip: int


@dataclass(frozen=True)
class Tile(Command):
    """JTL/PTL/WTL (and JTLS): one tile of one resolution (0 = smallest)."""

    resolution: int
    index: int
    fmt: OutputFormat = OutputFormat.JPEG
    angles: tuple[int, int] | None = None


@dataclass(frozen=True)
class Size(Command):
    """WID or HEI: requested CVT output width or height (unsigned, 0 = unset)."""

    axis: str
    value: int


@dataclass(frozen=True)
class RegionCommand(Command):
    """RGN: CVT viewport as fractions x, y, w, h (float32 values)."""

    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Convert(Command):
    """CVT: export the current view as one image."""

    fmt: OutputFormat


@dataclass(frozen=True)
class Profile(Command):
    """PFL: raw values along a row, a column or at a point of one resolution."""

    resolution: int
    x1: int
    y1: int
    x2: int
    y2: int


@dataclass(frozen=True)
class Spectra(Command):
    """SPECTRA: the value at one pixel of one tile for every horizontal view."""

    resolution: int
    tile: int
    x: int
    y: int


@dataclass(frozen=True)
class Tiles(Command):
    """TIL: a rectangle of tiles of one resolution, as binary records."""

    resolution: int
    start: int
    end: int


@dataclass(frozen=True)
class Iiif(Command):
    """IIIF: an IIIF Image API request ``<id>/info.json`` or ``<id>/<region>/<size>/…``."""

    argument: str


@dataclass(frozen=True)
class DeepZoom(Command):
    """DeepZoom: ``<path>.dzi`` or ``<path>_files/<L>/<x>_<y>.jpg``."""

    argument: str


@dataclass(frozen=True)
class Zoomify(Command):
    """Zoomify: ``<path>/ImageProperties.xml`` or ``<path>/TileGroup<g>/<z>-<x>-<y>.jpg``."""

    argument: str


@dataclass(frozen=True)
class Ignored(Command):
    """A command iipsrv accepts with no effect here (LYR, ICC)."""

    name: str


@dataclass(frozen=True)
class NotYetSupported(Command):
    """A command of iipsrv's registry this server does not implement yet."""

    name: str


@dataclass(frozen=True)
class Unknown(Command):
    """A command iipsrv does not know: error ``2 2 <name as typed>``."""

    name: str


@dataclass(frozen=True)
class Invalid(Command):
    """A known command whose argument could not be parsed; raises ``error`` when run."""

    name: str
    error: IIPServerError


class _Malformed(Exception):
    pass


#: Integers are saturated here: no image, level, tile or size comes anywhere near.
SATURATION = 10**18


def whole(digits: str) -> int:
    """An optionally signed digit string as an int, saturated at ±10^18 (Python refuses to
    convert 4300+ digits, and nothing in an image needs more than 19)."""
    body = digits.lstrip("+-").lstrip("0") or "0"
    sign = -1 if digits.startswith("-") else 1
    if len(body) > 18:
        return sign * SATURATION
    return sign * int(body)


def atoi(text: str) -> int:
    """C ``atoi`` on the leading number of ``text`` (saturated); raises if there is none."""
    m = _INT.match(text)
    if m is None:
        raise _Malformed(text)
    return whole(m.group(1))


def atof(text: str) -> float:
    """C ``atof`` on the leading number of ``text``; raises if there is none."""
    m = _FLOAT.match(text)
    if m is None:
        raise _Malformed(text)
    return float(m.group(1))


def _fif(arg: str) -> Command:
    return Fif(url_decode(arg))


def _obj(arg: str) -> Command:
    return Obj(arg.lower())


def _qlt(arg: str) -> Command:
    return Quality(min(100, max(0, atoi(arg))))


def _sds(arg: str) -> Command:
    first, sep, second = arg.partition(",")
    x = atoi(first)
    return Sequence(x, atoi(second) if sep else x)


def _minmax(arg: str) -> Command:
    channel_text, sep, bounds = arg.partition(":")
    lo_text, sep2, hi_text = bounds.partition(",")
    if not sep or not sep2:
        raise _Malformed(arg)
    lo, hi = atof(lo_text), atof(hi_text)
    if channel_text.strip() == "-":
        return MinMax(None, lo, hi)
    channel = atoi(channel_text)
    return MinMax(channel - 1 if channel >= 1 else -1, lo, hi)


def _cnt(arg: str) -> Command:
    mode = arg.lower()
    if mode in ("eq", "equalization", "equalisation"):
        return Contrast(mode="eq")
    if mode in ("st", "stretch"):
        return Contrast(mode="st")
    return Contrast(value=atof(arg))


def _gam(arg: str) -> Command:
    if arg.lower() in ("log", "logarithm"):
        return Gamma(log=True)
    return Gamma(value=atof(arg))


def _rot(arg: str) -> Command:
    text = arg.strip()
    flip = 0
    if text.startswith("!"):
        text = text[1:]
        flip = 1
    angle = atof(text)
    if not math.isfinite(angle):
        raise _Malformed(arg)
    if flip and angle == 180:
        return Rotate(0.0, 2)
    return Rotate(angle, flip)


def _lenient_float(text: str) -> float:
    m = _FLOAT.match(text)
    return float(m.group(1)) if m else 0.0


def _ctw(arg: str) -> Command:
    text = url_decode(arg)
    start, end = text.find("["), text.find("]")
    if start >= 0 and end > start:
        text = text[start + 1 : end]
    rows = tuple(
        tuple(_lenient_float(v) for v in row.split(",")) for row in text.split(";") if row.strip()
    )
    if not rows or len(rows) > 256 or any(len(r) > 256 for r in rows):
        raise _Malformed(arg)
    return ColorTwist(rows)


def _shd(arg: str) -> Command:
    first, sep, second = arg.partition(",")
    if not sep:
        raise _Malformed(arg)
    return Shade(atoi(first), atoi(second))


def _tile(fmt: OutputFormat) -> Callable[[str], Command]:
    def parse(arg: str) -> Command:
        first, sep, second = arg.partition(",")
        resolution = atoi(first)
        index = atoi(second) if sep else resolution
        if resolution < 0 or index < 0:
            raise BannerError("negative resolution or tile")
        return Tile(resolution, index, fmt)

    return parse


def _size(axis: str) -> Callable[[str], Command]:
    def parse(arg: str) -> Command:
        return Size(axis, atoi(arg) % (1 << 32))  # iipsrv stores an unsigned int

    return parse


def _rgn(arg: str) -> Command:
    values = [_f32(atof(v)) for v in arg.split(",") if v != ""][:4]
    if len(values) < 4:
        return Ignored("rgn")  # iipsrv applies a region only when all four values are given
    return RegionCommand(*values)


def _f32(value: float) -> float:
    try:
        return float(struct.unpack("f", struct.pack("f", value))[0])
    except OverflowError:
        return value


def _cvt(arg: str) -> Command:
    fmt = {"png": OutputFormat.PNG, "webp": OutputFormat.WEBP}.get(arg.lower(), OutputFormat.JPEG)
    return Convert(fmt)


def _pfl(arg: str) -> Command:
    head, sep, rest = arg.partition(":")
    resolution = atoi(head)
    if not sep:
        rest = arg
    start, dash, end = rest.partition("-")
    x1_text, _, y1_text = start.partition(",")
    x1, y1 = atoi(x1_text), atoi(y1_text)
    if dash:
        x2_text, _, y2_text = end.partition(",")
        x2, y2 = atoi(x2_text), atoi(y2_text)
    else:
        x2, y2 = x1, y1
    return Profile(resolution, x1, y1, x2, y2)


def _spectra(arg: str) -> Command:
    parts = arg.split(",")
    if len(parts) < 4:
        raise _Malformed(arg)
    resolution, tile, x, y = (atoi(p) for p in parts[:4])
    return Spectra(resolution, tile, x, y)


def _til(arg: str) -> Command:
    head, sep, rest = arg.partition(",")
    resolution = atoi(head)
    if not sep:
        rest = head
    start_text, dash, end_text = rest.partition("-")
    start = atoi(start_text)
    end = atoi(end_text) if dash else start
    return Tiles(resolution, start, max(start, end))


def _jtls(arg: str) -> Command:
    parts = arg.split(",")
    if len(parts) < 4:
        raise _Malformed(arg)
    x, resolution, index, y = (atoi(p) for p in parts[:4])
    if resolution < 0 or index < 0:
        raise BannerError("negative resolution or tile")
    return Tile(resolution, index, OutputFormat.JPEG, angles=(x, y))


#: Command name (lower case) → argument parser. Names of iipsrv 1.1's registry and mainline's.
PARSERS: dict[str, Callable[[str], Command]] = {
    "fif": _fif,
    "obj": _obj,
    "qlt": _qlt,
    "sds": _sds,
    "minmax": _minmax,
    "cnt": _cnt,
    "gam": _gam,
    "inv": lambda arg: Invert(),
    "cmp": lambda arg: Colormap(arg.lower()),
    "col": lambda arg: Colour(arg.lower()),
    "rot": _rot,
    "ctw": _ctw,
    "shd": _shd,
    "jtl": _tile(OutputFormat.JPEG),
    "ptl": _tile(OutputFormat.PNG),
    "wtl": _tile(OutputFormat.WEBP),
    "jtls": _jtls,
    "wid": _size("width"),
    "hei": _size("height"),
    "rgn": _rgn,
    "cvt": _cvt,
    "pfl": _pfl,
    "spectra": _spectra,
    "til": _til,
    "iiif": lambda arg: Iiif(url_decode(arg)),
    "deepzoom": lambda arg: DeepZoom(url_decode(arg)),
    "zoomify": lambda arg: Zoomify(url_decode(arg)),
    "lyr": lambda arg: Ignored("lyr"),
    "icc": lambda arg: Ignored("icc"),
}

#: iipsrv commands parsed by later work; answered with a clear "not supported" error for now.
PENDING = ("cnv", "atl", "ttl")


def parse_token(token: Token) -> Command:
    """Parse one token into a command (never raises)."""
    parser = PARSERS.get(token.key)
    if parser is None:
        if token.key in PENDING:
            return NotYetSupported(token.name.upper())
        return Unknown(token.name)
    try:
        return parser(token.argument)
    except _Malformed:
        return Invalid(token.key, ProtocolError("2 1", f"{token.name}={token.argument}"))
    except IIPServerError as exc:
        return Invalid(token.key, exc)


def parse_tokens(tokens: list[Token]) -> list[Command]:
    """Parse tokens into commands, in request order."""
    return [parse_token(token) for token in tokens]


def parse(request: str) -> list[Command]:
    """Parse a whole request string into commands, in request order."""
    return parse_tokens(tokenize(request))
