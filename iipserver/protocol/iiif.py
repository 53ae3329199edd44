"""IIIF Image API 3.0 and 2.1 (level 2), DeepZoom and Zoomify, over the IIP tile and CVT paths.

Requests arrive as ``IIIF=<id>/…`` (query style, or path style ``/iiif/<id>/…`` through
``URI_MAP``), ``DeepZoom=<path>.dzi|<path>_files/L/x_y.jpg`` and
``Zoomify=<path>/ImageProperties.xml|<path>/TileGroupN/z-x-y.jpg``; arguments are URL-decoded
once and identifiers confined like ``FIF``. Regions that are exactly one pyramid tile go through
the tile path and its caches, everything else through the CVT region path.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from iipserver.encoders import OutputFormat
from iipserver.errors import BadRequest, NotImplementedCommand, TileNotFound
from iipserver.pipeline import Pipeline
from iipserver.protocol import responses
from iipserver.protocol.responses import Response
from iipserver.settings import Settings
from iipserver.sources import paths
from iipserver.sources.base import SourceInfo
from iipserver.sources.pool import OpenedImage, SourcePool
from iipserver.view import View
from iipserver.viewport import Plan, c_round, plan
from iipserver.viewport import Region as RegionFractions

CONTEXTS = {
    2: "http://iiif.io/api/image/2/context.json",
    3: "http://iiif.io/api/image/3/context.json",
}
FORMATS = {"jpg": OutputFormat.JPEG, "png": OutputFormat.PNG, "webp": OutputFormat.WEBP}
#: Formats of the IIIF specification this server does not produce (501, not 400).
KNOWN_FORMATS = frozenset({"tif", "gif", "jp2", "pdf", "avif", "heic"})
QUALITIES = {
    "default": None,
    "color": None,
    "native": None,
    "gray": "grey",
    "grey": "grey",
    "bitonal": "binary",
}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_PIXELS = re.compile(r"^(\d+),(\d+),(\d+),(\d+)$")
_PERCENT = re.compile(rf"^pct:({_NUMBER}),({_NUMBER}),({_NUMBER}),({_NUMBER})$")
_ROTATION = re.compile(r"^(!?)(\d+(?:\.\d*)?|\.\d+)$")


@dataclass(frozen=True)
class Box:
    """A region of the full-resolution image, in pixels."""

    x: int
    y: int
    w: int
    h: int
    fractions: tuple[float, float, float, float] | None = None
    """The request's own fractions for ``pct:`` regions (iipsrv plans with them)."""


#: Integers of a request are saturated here: no arithmetic on (or printing of) huge numbers.
_SATURATED = 10**15


def _int(text: str) -> int:
    """``int(text)``, saturated at ±10**15 (Python refuses to convert 4300+ digits).

    Raises:
        ValueError: ``text`` is not an integer.
    """
    digits = text.strip().lstrip("+-").lstrip("0")
    if len(digits) <= 15:
        return int(text)
    if not digits.isdecimal():
        raise ValueError(text)
    return -_SATURATED if text.strip().startswith("-") else _SATURATED


def _round(value: float) -> int:
    return math.floor(value + 0.5)


def _f32(value: float) -> float:
    return float(np.float32(value))


def _side(given: int, cut_given: int, cut_other: int, aspect: float) -> int:
    """The open side of an output: from the region's size at the chosen level (iipsrv), kept
    within the two integers around ``given · aspect`` (IIIF)."""
    value = c_round(_f32(_f32(given) / _f32(cut_given)) * _f32(cut_other))
    exact = given * aspect
    if not math.floor(exact) <= value <= math.ceil(exact):
        value = _round(exact)
    return max(1, value)


def parse_region(text: str, width: int, height: int) -> Box:
    """IIIF region → pixels, cropped to the image.

    Raises:
        BadRequest: bad syntax, zero size, or a region entirely outside the image.
    """
    if text in ("full", "max"):
        return Box(0, 0, width, height)
    if text == "square":
        side = min(width, height)
        return Box((width - side) // 2, (height - side) // 2, side, side)
    m = _PIXELS.match(text)
    fractions = None
    if m:
        x, y, w, h = (_int(v) for v in m.groups())
    else:
        p = _PERCENT.match(text)
        if p is None:
            raise BadRequest(f"IIIF: incorrect region format: {text}")
        fx, fy, fw, fh = (float(v) for v in p.groups())
        if fx >= 100 or fy >= 100:  # x >= width: no huge (or infinite) pixel numbers
            raise BadRequest(f"IIIF: region outside the image or empty: {text}")
        fw, fh = min(fw, 1e6), min(fh, 1e6)  # cropped to the image below in any case
        fractions = (fx / 100, fy / 100, fw / 100, fh / 100)
        x, y = _round(fx * width / 100), _round(fy * height / 100)
        w, h = _round(fw * width / 100), _round(fh * height / 100)
        if fw > 0 and w == 0:
            w = 1
        if fh > 0 and h == 0:
            h = 1
    if w <= 0 or h <= 0 or x >= width or y >= height:
        raise BadRequest(f"IIIF: region outside the image or empty: {text}")
    return Box(x, y, min(w, width - x), min(h, height - y), fractions)


def _requested_size(text: str, rw: int, rh: int) -> tuple[int, int]:
    """``w,`` ``,h`` ``w,h`` ``!w,h`` ``pct:n`` → (w, h); raises ValueError on bad syntax."""
    confined = text.startswith("!")
    body = text[1:] if confined else text
    if body.startswith("pct:"):
        pct = float(body[4:])
        if confined or not math.isfinite(pct) or pct <= 0 or pct > 1e9:
            raise ValueError(body)
        return _round(rw * pct / 100), _round(rh * pct / 100)
    left, comma, right = body.partition(",")
    if not comma or (not left and not right):
        raise ValueError(body)
    if confined:
        bw, bh = _int(left), _int(right)
        if bw <= 0 or bh <= 0:
            raise ValueError(body)
        scale = min(bw / rw, bh / rh)
        return _round(rw * scale), _round(rh * scale)
    if left and right:
        return _int(left), _int(right)
    if left:
        return _int(left), _round(rh * _int(left) / rw)
    return _round(rw * _int(right) / rh), _int(right)


def parse_size(
    text: str, region: Box, version: int, limits: tuple[int, int], upscaling: bool
) -> tuple[int, int]:
    """IIIF size → output (width, height).

    Raises:
        BadRequest: bad syntax, zero size, upscaling not asked for (v3) or not allowed, or a
            size beyond ``maxWidth``/``maxHeight``.
    """
    up = text.startswith("^")
    if up:
        if version < 3:
            raise BadRequest(f"IIIF: invalid size: {text}")
        text = text[1:]
    rw, rh = region.w, region.h
    max_w, max_h = limits
    if text == "max" or (text == "full" and version < 3):
        scale = min(max_w / rw, max_h / rh) if up else min(1.0, max_w / rw, max_h / rh)
        return max(1, _round(rw * scale)), max(1, _round(rh * scale))
    try:
        w, h = _requested_size(text, rw, rh)
    except ValueError:
        raise BadRequest(f"IIIF: invalid size: {text}") from None
    if w <= 0 or h <= 0:
        raise BadRequest(f"IIIF: invalid size: {text} (zero width or height)")
    if (w > rw or h > rh) and version >= 3 and not up:
        raise BadRequest("IIIF: upscaling should be prefixed with ^")
    if (w > rw or h > rh) and not upscaling:
        raise BadRequest("IIIF: upscaling is not allowed on this server")
    if w > max_w or h > max_h:
        raise BadRequest(f"IIIF: size {w}x{h} exceeds the maximum {max_w}x{max_h}")
    return w, h


def parse_rotation(text: str) -> tuple[float, int]:
    """IIIF rotation → (degrees, flip): multiples of 90 only; ``!`` mirrors first."""
    m = _ROTATION.match(text)
    if m is None:
        raise BadRequest(f"IIIF: invalid rotation: {text}")
    angle = float(m.group(2))
    if angle > 360:
        raise BadRequest(f"IIIF: invalid rotation: {text}")
    if angle % 90:
        raise NotImplementedCommand("IIIF: rotations other than multiples of 90 are not supported")
    return angle % 360, 1 if m.group(1) else 0


def parse_quality_format(text: str) -> tuple[str | None, OutputFormat]:
    """``quality.format`` → (COL mode, output format)."""
    quality, dot, fmt = text.rpartition(".")
    if not dot or not quality:
        raise BadRequest(f"IIIF: invalid quality or format: {text}")
    if quality not in QUALITIES:
        raise BadRequest(f"IIIF: unsupported quality parameter: {quality}")
    fmt = fmt.lower()
    if fmt not in FORMATS:
        if fmt in KNOWN_FORMATS:
            raise NotImplementedCommand(f"IIIF: unsupported output format: {fmt}")
        raise BadRequest(f"IIIF: invalid format: {fmt}")
    return QUALITIES[quality], FORMATS[fmt]


def _version(settings: Settings, environ: Mapping[str, Any]) -> int:
    accept = str(environ.get("HTTP_ACCEPT", ""))
    for version, context in CONTEXTS.items():
        if context in accept:
            return version
    return settings.iiif_version


def _base_id(settings: Settings, environ: Mapping[str, Any], identifier: str) -> str:
    """The image's IIIF id: BASE_URL + identifier, else the request's own URL without the
    parameters (scheme, host and port from the request or X-Forwarded-* headers)."""
    if environ.get("HTTP_X_IIIF_ID"):
        return str(environ["HTTP_X_IIIF_ID"])
    if settings.base_url:
        return settings.base_url.rstrip("/") + "/" + identifier
    proto = str(environ.get("HTTP_X_FORWARDED_PROTO", "")).split(",")[0].strip()
    if not proto:
        https = str(environ.get("HTTPS", "")).lower() in ("on", "1", "true")
        proto = "https" if https else str(environ.get("wsgi.url_scheme", "http"))
    host = str(environ.get("HTTP_X_FORWARDED_HOST", "")).split(",")[0].strip()
    host = host or str(environ.get("HTTP_HOST", "")) or str(environ.get("SERVER_NAME", "localhost"))
    uri = str(environ.get("REQUEST_URI", ""))
    if not uri:
        uri = str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", ""))
        if environ.get("QUERY_STRING"):
            uri += "?" + str(environ["QUERY_STRING"])
    path, _, query = uri.partition("?")
    if query and re.search(r"(^|&)iiif=", query, re.IGNORECASE):
        return f"{proto}://{host}{path}?IIIF={identifier}"
    marker = path.find("/iiif/")
    base = path[: marker + len("/iiif/")] if marker >= 0 else path.rsplit("/", 1)[0] + "/"
    return f"{proto}://{host}{base}{_quote_id(identifier)}"


def _quote_id(identifier: str) -> str:
    from urllib.parse import quote

    return quote(identifier, safe="")


class Service:
    """Answers IIIF, DeepZoom and Zoomify requests for one IIP request."""

    def __init__(
        self,
        settings: Settings,
        pool: SourcePool,
        pipeline: Pipeline,
        environ: Mapping[str, Any],
        view: View,
        render: Callable[[OpenedImage, int, int, View, OutputFormat], Response],
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.pipeline = pipeline
        self.environ = environ
        self.view = view
        self.render_tile = render

    def _open(self, identifier: str) -> OpenedImage:
        settings = self.settings
        real = paths.resolve(identifier, settings.filesystem_prefix, settings.filesystem_suffix)
        return self.pool.get(real)

    def _limits(self) -> tuple[int, int]:
        m = self.settings.max_cvt
        return (2**31, 2**31) if m < 0 else (m, m)

    # --- IIIF ------------------------------------------------------------------------------

    def iiif(self, argument: str) -> Response:
        """Answer ``IIIF=<argument>`` (already URL-decoded)."""
        argument = argument.split("?", 1)[0]
        if "/" not in argument.strip("/"):
            identifier = argument.strip("/")
            self._open(identifier)
            location = _base_id(self.settings, self.environ, identifier) + "/info.json"
            return responses.redirect_response(self.settings, location)
        if argument.endswith("/info.json"):
            return self._info(argument[: -len("/info.json")])
        parts = argument.split("/")
        if len(parts) < 5:
            raise BadRequest(
                "IIIF: Query has too few parameters. IIIF syntax is "
                "{identifier}/{region}/{size}/{rotation}/{quality}{.format}"
            )
        identifier = "/".join(parts[:-4])
        region_text, size_text, rotation_text, quality_text = parts[-4:]
        image = self._open(identifier)
        info = image.source.info
        version = _version(self.settings, self.environ)
        region = parse_region(region_text, info.width, info.height)
        size = parse_size(size_text, region, version, self._limits(), self.settings.allow_upscaling)
        plan = self._plan(info, region, size, size_text.lstrip("^"))
        out = (plan.out_width, plan.out_height)
        angle, flip = parse_rotation(rotation_text)
        colour, fmt = parse_quality_format(quality_text)
        view = self.view
        view.image = image
        view.requested_path = identifier
        view.rotation, view.flip, view.colour = angle, flip, colour
        tile = self._aligned_tile(info, region, out)
        if tile is not None:
            response = self.render_tile(image, tile[0], tile[1], view, fmt)
        else:
            response = self._region(image, info, plan, fmt)
        response.headers.append(
            ("Link", f'<http://iiif.io/api/image/{version}/level2.json>;rel="profile"')
        )
        return response

    @staticmethod
    def _aligned_tile(
        info: SourceInfo, region: Box, out: tuple[int, int]
    ) -> tuple[int, int] | None:
        """(resolution, tile index) when the region is exactly one tile of a level at its size."""
        n = len(info.levels)
        for r, level in enumerate(info.levels):
            scale = 2 ** (n - 1 - r)
            tw, th = level.tile_width * scale, level.tile_height * scale
            if region.x % tw or region.y % th:
                continue
            tx, ty = region.x // tw, region.y // th
            if tx >= level.tiles_across or ty >= level.tiles_down:
                continue
            index = ty * level.tiles_across + tx
            _, _, w, h = level.tile_box(index)
            full_w = min(tw, info.width - region.x)
            full_h = min(th, info.height - region.y)
            if (region.w, region.h) == (full_w, full_h) and out == (w, h):
                return r, index
        return None

    def _plan(self, info: SourceInfo, region: Box, size: tuple[int, int], text: str) -> Plan:
        """The level, the region there and the output size, as iipsrv 1.1 maps IIIF to CVT.

        The level and the region's pixels at that level come from 1.1's CVT algorithm
        (``viewport.plan``); the side a request leaves open is computed from the region's real
        size at that level (so ``full/250,`` of a 1000×750 image is the 250×187 level, not a
        250×188 resize) when that is one of the two integers around the exact aspect ratio.
        The side a request gives is always kept, as IIIF requires.
        """
        w, h = size
        fx, fy, fw, fh = region.fractions or (
            region.x / info.width,
            region.y / info.height,
            region.w / info.width,
            region.h / info.height,
        )
        if text.startswith("!"):
            w, h = (_int(v) for v in text[1:].split(","))
            requested = (w, h)
        elif text in ("max", "full") or (
            text.count(",") == 1 and text[0] != "," and text[-1] != ","
        ):
            requested = (w, h)
        elif text.startswith(","):
            requested = (0, h)
        else:  # "w," and pct:n
            requested = (w, 0)
        base = plan(
            (info.width, info.height),
            [(lv.width, lv.height) for lv in info.levels],
            RegionFractions(_f32(fx), _f32(fy), _f32(fw), _f32(fh)),
            requested,
            -1,
            True,
        )
        cut_w, cut_h = base.width, base.height
        if requested == (w, 0) or (text.startswith("!") and (w / cut_w) / (h / cut_h) < 1.001):
            h = _side(w, cut_w, cut_h, region.h / region.w)
        elif requested == (0, h) or (text.startswith("!") and (w / cut_w) / (h / cut_h) > 1.001):
            w = _side(h, cut_h, cut_w, region.w / region.h)
        return Plan(base.resolution, base.x, base.y, cut_w, cut_h, w, h)

    def _region(
        self, image: OpenedImage, info: SourceInfo, plan: Plan, fmt: OutputFormat
    ) -> Response:
        """Render a planned region through the CVT path."""
        quality = self.view.quality
        default = {
            OutputFormat.PNG: self.settings.png_quality,
            OutputFormat.WEBP: self.settings.webp_quality,
        }
        rendering = self.view.rendering(
            info, fmt, default.get(fmt, self.settings.jpeg_quality) if quality is None else quality
        )
        encoded = self.pipeline.region(image, plan, rendering)
        return responses.image_response(
            self.settings, encoded.data, encoded.media_type, image.stamp.mtime
        )

    def _info(self, identifier: str) -> Response:
        image = self._open(identifier)
        info = image.source.info
        version = _version(self.settings, self.environ)
        service_id = _base_id(self.settings, self.environ, identifier)
        sizes = [{"width": lv.width, "height": lv.height} for lv in info.levels[:-1]]
        if not sizes:
            sizes = [{"width": info.width, "height": info.height}]
        tw, th = info.tile_size
        tiles = [
            {"width": tw, "height": th, "scaleFactors": [2**i for i in range(len(info.levels))]}
        ]
        max_w, max_h = self._limits()
        limits = {} if self.settings.max_cvt < 0 else {"maxWidth": max_w, "maxHeight": max_h}
        qualities = (["color"] if info.channels >= 3 else []) + ["gray", "bitonal"]
        features = [
            "mirroring",
            "regionByPct",
            "regionSquare",
            "rotationBy90s",
            "sizeByConfinedWh",
            "sizeByH",
            "sizeByPct",
            "sizeByW",
            "sizeByWh",
        ]
        if self.settings.allow_upscaling:
            features.append("sizeUpscaling")
        body: dict[str, Any]
        if version >= 3:
            body = {
                "@context": CONTEXTS[3],
                "id": service_id,
                "type": "ImageService3",
                "protocol": "http://iiif.io/api/image",
                "profile": "level2",
                "width": info.width,
                "height": info.height,
                **limits,
                "sizes": sizes,
                "tiles": tiles,
                "extraFormats": ["webp"],
                "extraQualities": qualities,
                "extraFeatures": features,
            }
            if self.settings.copyright:
                body["rights"] = self.settings.copyright
            media = f'application/ld+json;profile="{CONTEXTS[3]}"'
        else:
            supports = [
                *features,
                "baseUriRedirect",
                "canonicalLinkHeader",
                "cors",
                "jsonldMediaType",
                "profileLinkHeader",
                "regionByPx",
                "sizeByDistortedWh",
                "sizeByForcedWh",
            ]
            if self.settings.allow_upscaling:
                supports.append("sizeAboveFull")
            profile = {
                "formats": ["jpg", "png", "webp"],
                "qualities": ["default", "color", "gray", "bitonal"],
                "supports": sorted(set(supports)),
                **limits,
            }
            body = {
                "@context": CONTEXTS[2],
                "@id": service_id,
                "protocol": "http://iiif.io/api/image",
                "width": info.width,
                "height": info.height,
                "sizes": sizes,
                "tiles": tiles,
                "profile": ["http://iiif.io/api/image/2/level2.json", profile],
            }
            if self.settings.copyright:
                body["license"] = self.settings.copyright
            accept = str(self.environ.get("HTTP_ACCEPT", ""))
            media = "application/ld+json" if "application/ld+json" in accept else "application/json"
        data = json.dumps(body, indent=2, ensure_ascii=False).encode()
        response = responses.data_response(self.settings, data, media, image.stamp.mtime)
        response.headers.append(
            ("Link", f'<http://iiif.io/api/image/{version}/level2.json>;rel="profile"')
        )
        return response

    # --- DeepZoom and Zoomify ----------------------------------------------------------------

    def deepzoom(self, argument: str) -> Response:
        """``<path>.dzi`` descriptor, or ``<path>_files/<L>/<x>_<y>.<ext>`` tile."""
        if argument.endswith(".dzi"):
            image = self._open(argument[: -len(".dzi")])
            info = image.source.info
            tw, _ = info.tile_size
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>\r\n'
                '<Image xmlns="http://schemas.microsoft.com/deepzoom/2008"\r\n'
                f'TileSize="{tw}" Overlap="0" Format="jpg"><Size Width="{info.width}" '
                f'Height="{info.height}"/></Image>'
            ).encode()
            return responses.data_response(
                self.settings, body, "application/xml", image.stamp.mtime
            )
        m = re.match(r"^(.*)_files/(\d+)/(\d+)_(\d+)\.[A-Za-z]+$", argument)
        if m is None:
            raise BadRequest("DeepZoom: expected <image>.dzi or <image>_files/<level>/<x>_<y>.jpg")
        image = self._open(m.group(1))
        info = image.source.info
        n = len(info.levels)
        depth = (
            math.ceil(math.log2(max(info.width, info.height)))
            if max(info.width, info.height) > 1
            else 0
        )
        r = min(n - 1, max(0, _int(m.group(2)) - (depth - n) - 1))
        return self._grid_tile(image, info, r, _int(m.group(3)), _int(m.group(4)))

    def zoomify(self, argument: str) -> Response:
        """``<path>/ImageProperties.xml`` or ``<path>/TileGroup<g>/<z>-<x>-<y>.jpg``."""
        if argument.endswith("/ImageProperties.xml"):
            image = self._open(argument[: -len("/ImageProperties.xml")])
            info = image.source.info
            full = info.levels[-1]
            body = (
                f'<IMAGE_PROPERTIES WIDTH="{info.width}" HEIGHT="{info.height}" '
                f'NUMTILES="{full.tile_count}" NUMIMAGES="1" VERSION="1.8" '
                f'TILESIZE="{full.tile_width}" />'
            ).encode()
            return responses.data_response(
                self.settings, body, "application/xml", image.stamp.mtime
            )
        m = re.match(r"^(.*)/TileGroup\d+/(\d+)-(\d+)-(\d+)\.[A-Za-z]+$", argument)
        if m is None:
            raise BadRequest(
                "Zoomify: expected <image>/ImageProperties.xml "
                "or <image>/TileGroup<g>/<z>-<x>-<y>.jpg"
            )
        image = self._open(m.group(1))
        info = image.source.info
        tw = info.tile_size[0]
        small = sum(1 for lv in info.levels if lv.width < tw and lv.height < tw)
        r = _int(m.group(2)) + max(0, small - 1)
        return self._grid_tile(image, info, r, _int(m.group(3)), _int(m.group(4)))

    def _grid_tile(self, image: OpenedImage, info: SourceInfo, r: int, x: int, y: int) -> Response:
        if not 0 <= r < len(info.levels):
            image.source.read_tile(r, 0)  # the source's own 404 for a missing resolution
        level = info.levels[r]
        if x >= level.tiles_across or y >= level.tiles_down:
            raise TileNotFound(f"Asked for non-existent tile: {y * level.tiles_across + x}")
        self.view.image = image
        return self.render_tile(image, r, y * level.tiles_across + x, self.view, OutputFormat.JPEG)
