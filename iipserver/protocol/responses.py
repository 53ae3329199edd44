"""Response bodies and header blocks in iipsrv 1.1's formats (spec §5, §7; policy §2 fixes)."""

from __future__ import annotations

import email.utils
import functools
import html
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from iipserver import __version__, fitsheader
from iipserver.settings import Settings
from iipserver.sources.base import SourceInfo

SERVER = f"iipserver/{__version__}"
NETFPX = "application/vnd.netfpx"
ERROR_DISPOSITION = 'inline;filename="IIPisAMadGameClosedToOurUnderstanding.netfpx"'
STATUS_TEXT = {
    200: "OK",
    204: "No Content",
    303: "See Other",
    304: "Not Modified",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    501: "Not Implemented",
}


@dataclass
class Response:
    """A complete response: status, ordered header list and body."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    cache: str = ""
    """How the shared cache took part (``hit``, ``miss``, ``store``), for the log."""
    stored: bytes | memoryview | None = field(default=None, repr=False, compare=False)
    """The CGI output this response was unpacked from (sent as is by ``cgi()``)."""

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (case-insensitive), or None."""
        lower = name.lower()
        return next((v for k, v in self.headers if k.lower() == lower), None)

    def pack(self) -> bytes:
        """Bytes to store in the shared cache: a marker, then the CGI output (``cgi()``), so
        that a hit is sent as stored; never pickle."""
        return _PACKED + self.cgi()

    @classmethod
    def unpack(cls, data: bytes) -> Response | None:
        """Rebuild a stored response (None if the bytes are not one); ``cgi()`` of the result
        returns the stored bytes without formatting them again."""
        if not data.startswith(_PACKED):
            return None
        start = len(_PACKED)
        end = data.find(b"\r\n\r\n", start)
        if end < 0:
            return None
        try:
            lines = data[start:end].decode("latin-1").split("\r\n")
            status = int(lines[0].removeprefix("Status: ")[:3])
            headers = [(k, v) for k, _, v in (line.partition(": ") for line in lines[1:])]
        except ValueError:
            return None
        response = cls(status, headers, data[end + 4 :])
        response.stored = memoryview(data)[start:]
        return response

    @property
    def status_line(self) -> str:
        """WSGI status string, e.g. ``200 OK``."""
        return f"{self.status} {STATUS_TEXT.get(self.status, 'Unknown')}"

    def cgi(self) -> bytes:
        """The response as CGI output (``Status:`` line, headers, blank line, body), the form
        a FastCGI responder sends; header text is latin-1 as WSGI's."""
        if self.stored is not None:
            return bytes(self.stored)
        head = f"Status: {self.status_line}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in self.headers
        )
        return (head + "\r\n").encode("latin-1") + self.body


_PACKED = b"IIPSRV2\n"


def http_date(timestamp: float) -> str:
    """Format a POSIX time as an HTTP date (``Sat, 21 Nov 2026 07:36:48 GMT``)."""
    return _http_date(int(timestamp))


@functools.lru_cache(maxsize=1024)  # image mtimes repeat: formatting one costs ~5 µs
def _http_date(seconds: int) -> str:
    return email.utils.formatdate(seconds, usegmt=True)


def cors_headers(settings: Settings) -> list[tuple[str, str]]:
    """CORS header lines (mainline's set, spec §5.2) when CORS is set."""
    if not settings.cors:
        return []
    return [
        ("Access-Control-Allow-Origin", settings.cors),
        ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
        (
            "Access-Control-Allow-Headers",
            "Accept, Content-Type, X-Requested-With, If-Modified-Since, If-None-Match",
        ),
        ("Access-Control-Max-Age", "86400"),
    ]


# --- success envelopes -------------------------------------------------------------------------


def obj_response(settings: Settings, body: bytes, last_modified: float | None) -> Response:
    """OBJ metadata reply (spec §5.1): Server, X-Powered-By, Cache-Control, Last-Modified, type."""
    headers = [
        ("Server", SERVER),
        ("X-Powered-By", "IIPImage"),
        ("Cache-Control", settings.cache_control),
    ]
    if last_modified is not None:
        headers.append(("Last-Modified", http_date(last_modified)))
    headers += [("Content-Type", NETFPX), ("Content-Length", str(len(body)))]
    headers += cors_headers(settings)
    return Response(200, headers, body)


def image_response(
    settings: Settings, data: bytes, media_type: str, last_modified: float
) -> Response:
    """Tile reply (spec §5.3 JTL row), with CORS when set (policy §1)."""
    headers = [
        ("Server", SERVER),
        ("X-Powered-By", "IIPImage"),
        ("Content-Type", media_type),
        ("Content-Length", str(len(data))),
        ("Last-Modified", http_date(last_modified)),
        ("Cache-Control", settings.cache_control),
    ]
    headers += cors_headers(settings)
    return Response(200, headers, data)


def _safe_filename(name: str) -> str:
    """A file name safe inside a quoted header value (no quotes, controls or non-ASCII)."""
    return "".join(c if 32 <= ord(c) < 127 and c not in '"\\;' else "_" for c in name) or "image"


def attachment_name(requested_path: str, extension: str) -> str:
    """``<stem>.<ext>``: the image path after its last ``/``, up to its last ``.`` (spec §5.3)."""
    base = requested_path.rsplit("/", 1)[-1]
    stem = base.rsplit(".", 1)[0] if "." in base else base
    return _safe_filename(f"{stem}.{extension}")


def region_response(
    settings: Settings, data: bytes, media_type: str, last_modified: float, filename: str
) -> Response:
    """CVT reply (spec §5.3 CVT row), with Content-Length and CORS when set."""
    headers = [
        ("Server", SERVER),
        ("X-Powered-By", "IIPImage"),
        ("Cache-Control", settings.cache_control),
        ("Last-Modified", http_date(last_modified)),
        ("Content-Type", media_type),
        ("Content-Disposition", f'inline;filename="{filename}"'),
        ("Content-Length", str(len(data))),
    ]
    headers += cors_headers(settings)
    return Response(200, headers, data)


def data_response(
    settings: Settings, body: bytes, media_type: str, last_modified: float
) -> Response:
    """PFL (JSON), SPECTRA (XML) and TIL (netfpx) replies: Server, type, Last-Modified, CC."""
    headers = [
        ("Server", SERVER),
        ("Content-Type", media_type),
        ("Last-Modified", http_date(last_modified)),
        ("Cache-Control", settings.cache_control),
        ("Content-Length", str(len(body))),
    ]
    headers += cors_headers(settings)
    return Response(200, headers, body)


def redirect_response(settings: Settings, location: str) -> Response:
    """303 See Other to ``location`` (the IIIF base URI redirect)."""
    headers = [("Server", SERVER), ("Location", location), ("Content-Type", "text/plain"),
               ("Content-Length", "0")]  # fmt: skip
    headers += cors_headers(settings)
    return Response(303, headers, b"")


def not_modified(
    settings: Settings, last_modified: float | str, etag: str | None = None
) -> Response:
    """304 reply: no body; the validators and freshness of the 200 it stands for."""
    modified = last_modified if isinstance(last_modified, str) else http_date(last_modified)
    headers = [("Server", SERVER), ("Last-Modified", modified)]
    if etag:
        headers.append(("ETag", etag))
    headers.append(("Cache-Control", settings.cache_control))
    headers += cors_headers(settings)
    return Response(304, headers, b"")


def options_response(settings: Settings) -> Response:
    """204 answer to a CORS preflight."""
    headers = [("Server", SERVER), ("Allow", "GET, HEAD, POST, OPTIONS"), ("Content-Length", "0")]
    headers += cors_headers(settings)
    return Response(204, headers, b"")


# --- error envelopes ---------------------------------------------------------------------------


def error_line(code: str, argument: str) -> str:
    """One IIP error line: ``Error/<len>:<code> <arg>`` with the true byte length (policy §2)."""
    text = f"{code} {argument}"
    return f"Error/{len(text.encode('utf-8', 'surrogateescape'))}:{text}\r\n"


def iip_error_response(settings: Settings, errors: Sequence[tuple[str, str]]) -> Response:
    """IIP protocol error reply (spec §5.4): 400 with the netfpx envelope."""
    body = "".join(error_line(c, a) for c, a in errors).encode("utf-8", "surrogateescape")
    headers = [("Server", SERVER), ("Cache-Control", "no-cache"), ("Content-Type", NETFPX)]
    headers += cors_headers(settings)
    headers += [("Content-Disposition", ERROR_DISPOSITION), ("Content-Length", str(len(body)))]
    return Response(400, headers, body)


def json_error_response(settings: Settings, status: int, detail: dict[str, object]) -> Response:
    """VisiOmatic 3 dialect error: ``{"detail": [entry]}`` (FastAPI's shape), JSON."""
    text = json.dumps({"detail": [detail]}, separators=(",", ":"), ensure_ascii=False)
    body = text.encode("utf-8", "replace")  # undecodable request bytes become "?"
    headers = [
        ("Server", SERVER),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-cache"),
    ]
    headers += cors_headers(settings)
    return Response(status, headers, body)


def text_error_response(settings: Settings, status: int, message: str) -> Response:
    """Plain-text error (404 missing image or tile, 400 bad parameter, 500 fault)."""
    body = message.encode("utf-8", "replace")
    headers = [
        ("Server", SERVER),
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-cache"),
    ]
    headers += cors_headers(settings)
    return Response(status, headers, body)


def banner_response(settings: Settings, status: int = 400) -> Response:
    """The HTML page iipsrv answers to an empty or unusable request."""
    body = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>iipserver</title>'
        "</head><body><h1>iipserver</h1>"
        f"<h2>Version {html.escape(__version__)}</h2>"
        "<p>An IIPImage protocol server. Requests look like "
        "<code>?FIF=image.tif&amp;OBJ=IIP,1.0&amp;OBJ=Max-size</code> or "
        "<code>?FIF=image.tif&amp;JTL=0,0</code>.</p></body></html>"
    ).encode()
    headers = [
        ("Server", SERVER),
        ("Content-Type", "text/html; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Content-Disposition", 'inline;filename="iipsrv.html"'),
        ("Cache-Control", "no-cache"),
    ]
    headers += cors_headers(settings)
    return Response(status, headers, body)


# --- OBJ bodies (spec §7) ----------------------------------------------------------------------

#: 1.1 metadata object names → source metadata key (``subject`` = ImageDescription).
METADATA_OBJECTS = {
    "copyright": "copyright",
    "title": "document_name",
    "subject": "description",
    "description": "description",
    "author": "artist",
    "creator": "artist",
    "keywords": "",
    "comment": "",
    "last-author": "",
    "rev-number": "",
    "edit-time": "",
    "last-printed": "",
    "create-dtm": "datetime",
    "date": "datetime",
    "last-save-dtm": "",
    "app-name": "software",
    "software": "software",
    "rights": "copyright",
    "make": "make",
    "model": "model",
    "xmp": "xmp",
    "scale": "scale",
}
SUMMARY_INFO = ("copyright", "subject", "author", "create-dtm", "app-name")
OPT_COMMANDS = "CVT CNT QLT JTL JTLS WID HEI RGN MINMAX SHD CMP INV CTW"
OPT_OBJECTS = (
    "Horizontal-views Vertical-views Tile-size Bits-per-channel Min-Max-sample-values Resolutions"
)


def _float9(value: float) -> str:
    """``%.9g`` of a float32 value promoted to double, as iipsrv prints sample ranges."""
    import numpy as np

    return f"{float(np.float32(value)):.9g}"


def colorspace_line(info: SourceInfo) -> str:
    """The ``Colorspace,0-<n-1>,0:…`` line."""
    last = len(info.levels) - 1
    if info.colorspace in ("GREYSCALE",):
        tail = "0 0 1 1 0"
    elif info.colorspace == "CIELAB":
        tail = "1 0 4 3 0 1 2"
    else:
        tail = "0 0 3 3 0 1 2"
    return f"Colorspace,0-{last},0:{tail}"


def metadata_value(info: SourceInfo, name: str, settings: Settings) -> str:
    """The text of metadata object ``name`` for an image ('' when absent)."""
    key = METADATA_OBJECTS[name]
    value = info.metadata.get(key, "") if key else ""
    if key == "copyright" and not value:
        value = settings.copyright
    if key == "description" and fitsheader.looks_like_fits(value):
        value = fitsheader.with_cd_matrix(value)  # VisiOmatic reads only the CD form of the WCS
    return value


def metadata_line(name: str, value: str) -> str:
    """``<name>/<byte length>:<value>`` (1.1's metadata line)."""
    return f"{name}/{len(value.encode('utf-8', 'surrogateescape'))}:{value}"


def _max_size(info: SourceInfo, rotation: float) -> list[str]:
    w, h = info.width, info.height
    if int(rotation) % 180 == 90:
        w, h = h, w
    return [f"Max-size:{w} {h}"]


def _min_max(info: SourceInfo) -> list[str]:
    ranges = zip(info.min_values, info.max_values, strict=False)
    return [
        "Min-Max-sample-values:" + " ".join(f" {_float9(lo)}  {_float9(hi)}" for lo, hi in ranges)
    ]


def _summary(info: SourceInfo, settings: Settings) -> list[str]:
    lines = []
    for name in SUMMARY_INFO:
        value = metadata_value(info, name, settings)
        if value:
            lines.append(metadata_line(name, value))
    return lines


ObjectLines = Callable[[SourceInfo, Settings, float], list[str]]

#: Image object name → body lines (spec §7).
OBJECTS: dict[str, ObjectLines] = {
    "iip-server": lambda i, s, r: ["IIP-server:3.65"],
    "iip-opt-comm": lambda i, s, r: [f"IIP-opt-comm:{OPT_COMMANDS}"],
    "iip-opt-obj": lambda i, s, r: [f"IIP-opt-obj:{OPT_OBJECTS}"],
    "max-size": lambda i, s, r: _max_size(i, r),
    "basic-info": lambda i, s, r: [
        "IIP-server:3.65",
        f"Max-size:{i.width} {i.height}",
        f"Resolution-number:{len(i.levels)}",
        colorspace_line(i),
    ],
    "tile-size": lambda i, s, r: ["Tile-size:{} {}".format(*i.tile_size)],
    "resolution-number": lambda i, s, r: [f"Resolution-number:{len(i.levels)}"],
    "bits-per-channel": lambda i, s, r: [f"Bits-per-channel:{i.bits_per_sample}"],
    "min-max-sample-values": lambda i, s, r: _min_max(i),
    "resolutions": lambda i, s, r: [
        "Resolutions:" + ",".join(f"{lv.width} {lv.height}" for lv in i.levels)
    ],
    "horizontal-views": lambda i, s, r: [
        "Horizontal-views:" + " ".join(str(a) for a in i.horizontal_views)
    ],
    "vertical-views": lambda i, s, r: [
        "Vertical-views:" + " ".join(str(a) for a in i.vertical_views)
    ],
    "dpi": lambda i, s, r: [] if i.dpi is None else [f"DPI:{i.dpi[0]:f} {i.dpi[1]:f}"],
    "summary-info": lambda i, s, r: _summary(i, s),
    "stack": lambda i, s, r: [],
}


def obj_lines(
    name: str, info: SourceInfo, settings: Settings, rotation: float = 0.0
) -> list[str] | None:
    """Body lines of image object ``name`` (lower case); None if the name is unknown."""
    handler = OBJECTS.get(name)
    if handler is not None:
        return handler(info, settings, rotation)
    if "colorspace" in name:
        return [colorspace_line(info)]
    if name in METADATA_OBJECTS:
        value = metadata_value(info, name, settings)
        return [metadata_line(name, value)] if value else []
    return None
