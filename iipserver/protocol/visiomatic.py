"""The VisiOmatic 3 dialect (policy §3): INFO, CHAN, MIX, BRT, VAL, BIN, PFL/RGN ``x1,y1:x2,y2``.

A request is in this dialect when it carries any of those parameters. Parameters are collected
(order does not matter), validated with the ranges of VisiOmatic 3's server, and the first of
INFO, PFL, VAL, JTL, RGN present decides the answer. Errors are JSON ``{"detail": [...]}`` with
a 4xx status. Coordinates of VAL and PFL are FITS pixels (1-based, y up); tile rows and RGN
count from the top, as the TIFF stores them (STIFF writes north up).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from iipserver import display, fitsheader
from iipserver.encoders import encode_jpeg
from iipserver.errors import IIPServerError, NotFound, VisiomaticError
from iipserver.pipeline import Pipeline
from iipserver.protocol import responses
from iipserver.protocol.commands import whole
from iipserver.protocol.query import Token, url_decode
from iipserver.protocol.responses import Response
from iipserver.settings import Settings
from iipserver.sources import paths
from iipserver.sources.pool import OpenedImage, SourcePool
from iipserver.view import Display

#: Parameters that only the VisiOmatic 3 client sends.
MARKERS = frozenset({"info", "chan", "mix", "brt", "val", "bin"})
_COORDS = re.compile(r"^([+-]?\d+),([+-]?\d+):([+-]?\d+),([+-]?\d+)$")
_VAL = re.compile(r"^([+-]?\d+),([+-]?\d+)$")
_JTL = re.compile(r"^(\d+),(\d+)$")
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)"
_MINMAX = re.compile(rf"^(\d+):({_NUMBER}),({_NUMBER})$")
_MIX = re.compile(r"^(\d+):([+-]?\d+\.?\d*),([+-]?\d+\.?\d*),([+-]?\d+\.?\d*)$")
COLORMAPS = ("grey", "jet", "cold", "cool", "hot")

#: The display defaults INFO advertises; the client omits a parameter equal to them.
BRIGHTNESS, CONTRAST, COLOR_SATURATION, GAMMA, QUALITY = 0.0, 1.0, 1.5, 2.2, 95
#: Most tiles one RGN snapshot may touch (VisiOmatic's ``max_region_tile_count``).
MAX_REGION_TILES = 1024


def is_visiomatic(tokens: Sequence[Token]) -> bool:
    """True if a request is in the VisiOmatic 3 dialect (policy §3)."""
    for token in tokens:
        key = token.key
        if key in MARKERS or (key in ("pfl", "rgn") and _COORDS.match(token.argument)):
            return True
    return False


def _invalid(name: str, message: str, raw: str, kind: str = "value_error") -> VisiomaticError:
    return VisiomaticError(422, message, loc=name, raw=raw, kind=kind)


def _number(name: str, raw: str, lo: float, hi: float, integer: bool = False) -> float:
    try:
        value = float(int(raw)) if integer else float(raw)
    except ValueError:
        what = "integer" if integer else "number"
        raise _invalid(
            name, f"Input should be a valid {what}", raw, f"{'int' if integer else 'float'}_parsing"
        ) from None
    if not math.isfinite(value) or value < lo:
        raise _invalid(name, f"Input should be greater than or equal to {lo:g}", raw)
    if value > hi:
        raise _invalid(name, f"Input should be less than or equal to {hi:g}", raw)
    return value


@dataclass
class Request:
    """The parameters of one VisiOmatic 3 request."""

    fif: str | None = None
    info: bool = False
    channels: list[int] = field(default_factory=list)
    minmax: list[tuple[int, float, float]] = field(default_factory=list)
    mix: list[tuple[int, float, float, float]] = field(default_factory=list)
    brightness: float = BRIGHTNESS
    contrast: float = CONTRAST
    gamma: float = GAMMA
    quality: int = QUALITY
    invert: bool = False
    colormap: str = "grey"
    tile: tuple[int, int] | None = None
    value: tuple[int, int] | None = None
    profile: tuple[int, int, int, int] | None = None
    region: tuple[int, int, int, int] | None = None
    binning: int = 1

    @classmethod
    def parse(cls, tokens: Sequence[Token]) -> Request:  # noqa: C901 - one branch per parameter
        """Collect and validate the parameters.

        Raises:
            VisiomaticError: 422 naming the parameter, as VisiOmatic 3 answers.
        """
        req = cls()
        for token in tokens:
            key, raw = token.key, token.argument
            name = key.upper()
            if key == "fif":
                req.fif = url_decode(raw)
            elif key == "info":
                req.info = True
            elif key == "chan":
                req.channels.append(int(_number(name, raw, -1e9, 1e9, integer=True)))
            elif key == "minmax":
                m = _MINMAX.match(raw)
                if m is None:
                    raise _invalid(name, "Value error, expected <channel>:<min>,<max>", raw)
                req.minmax.append((whole(m[1]), float(m[2]), float(m[3])))
            elif key == "mix":
                m = _MIX.match(raw)
                if m is None:
                    raise _invalid(name, "Value error, expected <channel>:<r>,<g>,<b>", raw)
                req.mix.append((whole(m[1]), float(m[2]), float(m[3]), float(m[4])))
            elif key == "brt":
                req.brightness = _number(name, raw, -100, 100)
            elif key == "cnt":
                req.contrast = _number(name, raw, 0, 1000)
            elif key == "gam":
                req.gamma = _number(name, raw, 0.2, 5)
            elif key == "qlt":
                req.quality = int(_number(name, raw, 0, 100, integer=True))
            elif key == "inv":
                req.invert = True
            elif key == "cmp":
                if raw not in COLORMAPS:
                    expected = ", ".join(f"'{c}'" for c in COLORMAPS)
                    raise _invalid(name, f"Input should be one of {expected}", raw, "literal_error")
                req.colormap = raw
            elif key == "jtl":
                m = _JTL.match(raw)
                if m is None:
                    raise _invalid(name, "String should match pattern '^(\\d+),(\\d+)$'", raw)
                req.tile = (whole(m[1]), whole(m[2]))
            elif key == "val":
                m = _VAL.match(raw)
                if m is None:
                    raise _invalid(
                        name, "String should match pattern '^([+-]?\\d+),([+-]?\\d+)$'", raw
                    )
                req.value = (whole(m[1]), whole(m[2]))
            elif key in ("pfl", "rgn"):
                m = _COORDS.match(raw)
                if m is None:
                    raise _invalid(name, "String should match pattern 'x1,y1:x2,y2'", raw)
                coords = (whole(m[1]), whole(m[2]), whole(m[3]), whole(m[4]))
                if key == "pfl":
                    req.profile = coords
                else:
                    req.region = coords
            elif key == "bin":
                req.binning = int(_number(name, raw, 1, 65536, integer=True))
        mix_channels = [m[0] for m in req.mix]
        if mix_channels != sorted(mix_channels):
            raise _invalid(
                "MIX", "Value error, MIX channels must increase", ",".join(map(str, mix_channels))
            )
        return req


def _json(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class VisiomaticSession:
    """Answers one request of the VisiOmatic 3 dialect."""

    def __init__(self, settings: Settings, pool: SourcePool, pipeline: Pipeline) -> None:
        self.settings = settings
        self.pool = pool
        self.pipeline = pipeline

    def run(self, tokens: Sequence[Token]) -> Response:
        """Answer the request; every error becomes a VisiomaticError (JSON, 4xx)."""
        try:
            return self._run(Request.parse(tokens))
        except VisiomaticError:
            raise
        except NotFound as exc:
            raise VisiomaticError(404, exc.message, loc="FIF") from exc
        except IIPServerError as exc:
            status = exc.status if 400 <= exc.status < 500 else 500
            if status == 500:
                raise
            raise VisiomaticError(status, exc.message) from exc

    def _run(self, req: Request) -> Response:
        limit = self.settings.max_channels
        if len(req.channels) > limit:
            raise VisiomaticError(400, f"More than MAX_CHANNELS ({limit}) channels", loc="CHAN")
        if len(req.mix) > limit:
            raise VisiomaticError(400, f"More than MAX_CHANNELS ({limit}) channels", loc="MIX")
        if not req.fif:
            raise VisiomaticError(422, "Field required", loc="FIF", kind="missing")
        image = self._open(req.fif)
        if req.info:
            return self._json(self._info(image, req.fif), image)
        if req.profile is not None:
            return self._json(self._profile(image, req), image)
        if req.value is not None:
            return self._json(self._value(image, req), image)
        if req.tile is not None:
            return self._tile(image, req)
        if req.region is not None:
            return self._region(image, req)
        return self._json(None, image)

    def _open(self, fif: str) -> OpenedImage:
        settings = self.settings
        try:
            real = paths.resolve(fif, settings.filesystem_prefix, settings.filesystem_suffix)
            return self.pool.get(real)
        except NotFound:
            raise VisiomaticError(
                404, f"Cannot open {fif}", loc="FIF", kind="value_error.str"
            ) from None

    def _json(self, body: Any, image: OpenedImage) -> Response:
        return responses.data_response(
            self.settings, _json(body), "application/json", image.stamp.mtime
        )

    # --- metadata ------------------------------------------------------------------------

    def _header_cards(self, image: OpenedImage) -> list[fitsheader.Card]:
        info = image.source.info
        text = info.metadata.get("description", "")
        if not fitsheader.looks_like_fits(text):
            text = fitsheader.minimal_header(
                info.width, info.height, info.channels, info.bits_per_sample,
                info.sample_format == "float",
            )  # fmt: skip
        return fitsheader.parse(text)

    def _info(self, image: OpenedImage, fif: str) -> dict[str, Any]:
        info = image.source.info
        stats = self.pipeline.background(image)
        cards = self._header_cards(image)
        raw = fitsheader.header_dict(cards)
        header = fitsheader.display_header(cards, info.width, info.height, info.channels)
        name = os.path.basename(fif)
        obj = header.get("OBJECT", "")
        return {
            "type": "visiomatic",
            "version": "3.0",
            "image_name": name,
            "object_name": obj if isinstance(obj, str) else str(obj),
            "full_size": [info.width, info.height],
            "tile_size": list(info.tile_size),
            "tile_levels": len(info.levels),
            "channels": info.channels,
            "bits_per_channel": info.bits_per_sample,
            "brightness": BRIGHTNESS,
            "contrast": CONTRAST,
            "color_saturation": COLOR_SATURATION,
            "gamma": GAMMA,
            "quality": QUALITY,
            "header": _clean(header),
            "images": [
                {
                    "size": [info.width, info.height, info.channels],
                    "dataslice": [[1, info.width, 1], [1, info.height, 1]],
                    "detslice": [[1, info.width, 1], [1, info.height, 1]],
                    "background_level": [_finite(float(v)) for v in stats.level],
                    "background_mad": [_finite(float(v)) for v in stats.mad],
                    "min_max": [[_finite(float(a)), _finite(float(b))] for a, b in stats.cuts],
                    "header": _clean(raw),
                }
            ],
        }

    # --- pixel values ----------------------------------------------------------------------

    def _channels(self, req: Request, channels: int) -> list[int]:
        return [c - 1 for c in req.channels] if req.channels else list(range(channels))

    def _samples(
        self, image: OpenedImage, xs: np.ndarray, ys: np.ndarray, chans: list[int]
    ) -> list[list[float | None]]:
        """Values at FITS pixels (0-based x, y up) for the given channels; None outside/NaN."""
        info = image.source.info
        full = len(info.levels) - 1
        out: list[list[float | None]] = []
        for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
            row = info.height - 1 - y
            if not (0 <= x < info.width and 0 <= row < info.height):
                out.append([None] * len(chans))
                continue
            pixel = self.pipeline.raw_region(image, full, x, row, 1, 1)[0, 0]
            values: list[float | None] = []
            for c in chans:
                values.append(_finite(float(pixel[c])) if 0 <= c < info.channels else None)
            out.append(values)
        return out

    def _value(self, image: OpenedImage, req: Request) -> dict[str, Any]:
        assert req.value is not None
        chans = self._channels(req, image.source.info.channels)
        x, y = req.value
        values = self._samples(image, np.array([x - 1]), np.array([y - 1]), chans)[0]
        return {"values": values}

    def _profile(self, image: OpenedImage, req: Request) -> dict[str, Any]:
        assert req.profile is not None
        x1, y1, x2, y2 = req.profile
        info = image.source.info
        length = max(abs(x2 - x1), abs(y2 - y1))
        if length > min(4 * (info.width + info.height), self.settings.max_profile_length):
            raise VisiomaticError(422, "Profile too long", loc="PFL")
        chans = self._channels(req, info.channels)
        if any(not 0 <= c < info.channels for c in chans):
            raise VisiomaticError(422, f"CHAN must be between 1 and {info.channels}", loc="CHAN")
        xs, ys = display.line(x1 - 1, y1 - 1, x2 - 1, y2 - 1)
        values = self._samples(image, xs, ys, chans)
        return {
            "profile": [
                {"x": int(x), "y": int(y), "values": v}
                for x, y, v in zip(xs.tolist(), ys.tolist(), values, strict=True)
            ]
        }

    # --- images ----------------------------------------------------------------------------

    def _display(self, image: OpenedImage, req: Request) -> Display:
        info = image.source.info
        stats = self.pipeline.background(image)
        cuts = [list(map(float, c)) for c in stats.cuts]
        channel = req.channels[0] if req.channels else None
        if channel is not None:
            if channel > info.channels:
                channel = 1
            if channel < 1:
                raise VisiomaticError(
                    422, f"CHAN must be between 1 and {info.channels}", loc="CHAN"
                )
            if req.minmax and req.minmax[0][0] == channel:
                cuts[channel - 1] = [req.minmax[0][1], req.minmax[0][2]]
        else:
            for c, lo, hi in req.minmax:
                if 1 <= c <= info.channels:
                    cuts[c - 1] = [lo, hi]
        matrix = display.mix_matrix(info.channels, [m for m in req.mix if m[0] >= 1])
        return Display(
            channel=channel,
            cuts=tuple(tuple(c) for c in cuts),  # type: ignore[misc]
            matrix=tuple(tuple(float(v) for v in row) for row in matrix),
            brightness=req.brightness,
            contrast=req.contrast,
            gamma=req.gamma,
            invert=req.invert,
            colormap=req.colormap if channel is not None else "grey",
        )

    def _encode(self, image: OpenedImage, pixels: np.ndarray, quality: int) -> Response:
        encoded = encode_jpeg(pixels, max(quality, 1), subsampling="444", fastdct=False)
        return responses.image_response(
            self.settings, encoded.data, encoded.media_type, image.stamp.mtime
        )

    def _tile(self, image: OpenedImage, req: Request) -> Response:
        assert req.tile is not None
        levels = len(image.source.info.levels)
        resolution = min(req.tile[0], levels - 1)
        settings = self._display(image, req)
        tile = self.pipeline.raw_tile(image, resolution, req.tile[1])
        pixels = self.pipeline.display(tile, settings)
        if self.pipeline.watermark is not None:
            pixels = self.pipeline.watermark.apply(pixels, (image.path, resolution, req.tile[1]))
        return self._encode(image, pixels, req.quality)

    def _region(self, image: OpenedImage, req: Request) -> Response:
        assert req.region is not None
        info = image.source.info
        level = req.binning.bit_length() - 1
        if level >= len(info.levels):
            raise VisiomaticError(400, "Binning exceeds the number of resolution levels", loc="BIN")
        resolution = len(info.levels) - 1 - level
        lv = info.levels[resolution]
        x1, y1, x2, y2 = req.region
        left, top = max((x1 - 1) >> level, 0), max((y1 - 1) >> level, 0)
        right, bottom = min((x2 - 1) >> level, lv.width), min((y2 - 1) >> level, lv.height)
        if right <= left or bottom <= top:
            raise VisiomaticError(400, "Inconsistent region bounding box coordinates", loc="RGN")
        tiles = ((right - 1) // lv.tile_width - left // lv.tile_width + 1) * (
            (bottom - 1) // lv.tile_height - top // lv.tile_height + 1
        )
        if tiles > MAX_REGION_TILES:
            raise VisiomaticError(
                400,
                f"The requested image size exceeds the server limit of {MAX_REGION_TILES} tiles."
                "Please zoom in or increase image binning",
                loc="RGN",
            )
        raw = self.pipeline.raw_region(image, resolution, left, top, right - left, bottom - top)
        pixels = self.pipeline.display(raw, self._display(image, req))
        pixels = self.pipeline.mark_region(image, pixels, (resolution, left, top))
        return self._encode(image, pixels, req.quality)


def _clean(header: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe header values: non-finite floats become null."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in header.items()
    }
