"""The IIP dialect: run parsed commands left to right against a View and build the response."""

from __future__ import annotations

import dataclasses
import email.utils
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from iipserver.encoders import OutputFormat, encode
from iipserver.errors import (
    BadRequest,
    BannerError,
    ImageNotFound,
    ImageReadError,
    NotImplementedCommand,
    NotModified,
    ProtocolError,
)
from iipserver.pipeline import Pipeline
from iipserver.protocol import formats, iiif, responses
from iipserver.protocol.commands import (
    Colormap,
    ColorTwist,
    Colour,
    Command,
    Contrast,
    Convert,
    DeepZoom,
    Fif,
    Gamma,
    Ignored,
    Iiif,
    Invalid,
    Invert,
    MinMax,
    NotYetSupported,
    Obj,
    Profile,
    Quality,
    RegionCommand,
    Rotate,
    Shade,
    Size,
    Spectra,
    Tile,
    Tiles,
    Unknown,
    Zoomify,
)
from iipserver.protocol.commands import Sequence as SequenceCommand
from iipserver.protocol.responses import Response
from iipserver.settings import Settings
from iipserver.sources import paths
from iipserver.sources.base import SourceInfo
from iipserver.sources.pool import FileStamp, OpenedImage, SourcePool
from iipserver.view import ImageSequence, View
from iipserver.viewport import Region, plan

#: OBJ names that need no image.
STATIC_OBJECTS = frozenset({"iip-server", "iip-opt-comm", "iip-opt-obj"})


def parse_http_date(value: str) -> float | None:
    """Parse an If-Modified-Since value; None when it is not a valid HTTP date."""
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed is None:
        return None
    return parsed.timestamp()


class Session:
    """One IIP request: commands update the view; the first output command answers."""

    def __init__(
        self,
        settings: Settings,
        pool: SourcePool,
        pipeline: Pipeline,
        request: str,
        if_modified_since: str | None = None,
        environ: Mapping[str, Any] | None = None,
        resolved: Mapping[str, str] | None = None,
        stamps: Mapping[str, FileStamp] | None = None,
    ) -> None:
        self.settings = settings
        self.resolved: Mapping[str, str] = resolved or {}
        """Image paths already resolved for this request (requested → real)."""
        self.stamps: Mapping[str, FileStamp] = stamps or {}
        """Stamps of those files taken for this request (real path → stamp)."""
        self.environ: Mapping[str, Any] = environ or {}
        self.pool = pool
        self.pipeline = pipeline
        self.request = request
        self.if_modified_since = if_modified_since
        self.view = View()
        self.errors: list[tuple[str, str]] = []
        self.lines: list[str] = []
        self.protocol_line = False

    def run(self, commands: Sequence[Command]) -> Response:
        """Run ``commands`` in order and return the response.

        Raises:
            ProtocolError: with every IIP error line of the request.
            NotFound, BannerError, BadRequest, NotModified: as the command met them.
        """
        for command in commands:
            try:
                response = self.apply(command)
            except ProtocolError as exc:
                raise ProtocolError.of(self.errors + exc.lines) from None
            if response is not None:
                return response
        if self.errors:
            raise ProtocolError.of(self.errors)
        if not self.lines and not self.protocol_line:
            raise ProtocolError("2 1", self.request)
        body = ("IIP:1.0" if self.protocol_line else "") + "\r\n"
        body += "".join(line + "\r\n" for line in self.lines)
        image = self.view.image
        return responses.obj_response(
            self.settings,
            body.encode("utf-8", "surrogateescape"),
            None if image is None else image.stamp.mtime,
        )

    def apply(self, command: Command) -> Response | None:  # noqa: C901 - one branch per command
        """Apply one command; output commands return their response."""
        view = self.view
        match command:
            case Fif(path):
                self._fif(path)
            case Obj(name):
                self._obj(name)
            case Tile():
                return self._tile(command)
            case Convert(fmt):
                return self._convert(fmt)
            case Profile():
                return self._profile(command)
            case Spectra():
                return self._spectra(command)
            case Tiles():
                return self._tiles(command)
            case Iiif(argument):
                return self._service().iiif(argument)
            case DeepZoom(argument):
                return self._service().deepzoom(argument)
            case Zoomify(argument):
                return self._service().zoomify(argument)
            case Quality(value):
                view.quality = max(1, value)
            case SequenceCommand(x, y):
                self._select_view(x, y)
            case MinMax(channel, lo, hi):
                self._image("minmax")
                if channel is not None and channel >= self.settings.max_channels:
                    raise BadRequest(f"MINMAX: channel beyond MAX_CHANNELS ({channel + 1})")
                if channel is None or channel >= 0:
                    view.set_minmax(channel, lo, hi)
            case Contrast(value, mode):
                if mode == "eq":
                    view.equalise = True
                elif mode == "st":
                    view.stretch, view.contrast = True, 1.0
                else:
                    view.stretch, view.contrast = False, value
            case Gamma(value, log):
                view.gamma, view.log_gamma = value, log
            case Invert():
                view.invert = True
            case Colormap(name):
                view.colormap = name
            case ColorTwist(matrix):
                limit = self.settings.max_channels
                if len(matrix) > limit or any(len(row) > limit for row in matrix):
                    raise BadRequest(f"CTW: more than MAX_CHANNELS ({limit}) rows or columns")
                view.twist = matrix
            case Shade(h_angle, v_angle):
                view.shade = (h_angle, v_angle)
            case Colour(mode):
                view.colour = mode
            case Rotate(angle, flip):
                view.rotation, view.flip = angle, flip
            case Size(axis, value):
                w, h = view.requested
                view.requested = (value, h) if axis == "width" else (w, value)
            case RegionCommand(x, y, w, h):
                if w > 0 and h > 0:
                    view.region = Region.from_fractions(x, y, w, h)
            case Unknown(name):
                self.errors.append(("2 2", name))
            case Invalid(_, error):
                raise error
            case NotYetSupported(name):
                raise NotImplementedCommand(f"{name} is not supported yet")
            case Ignored():
                pass
        return None

    # --- image selection ------------------------------------------------------------------------

    def _image(self, argument: str = "") -> OpenedImage:
        image = self.view.image
        if image is None:
            raise ProtocolError("1 3", argument)
        return image

    def _fif(self, path: str) -> None:
        self.view = View(requested_path=path, quality=self.view.quality)
        settings = self.settings
        try:
            real = self.resolved.get(path) or paths.resolve(
                path, settings.filesystem_prefix, settings.filesystem_suffix
            )
        except ImageNotFound:
            stem, extension = paths.find_sequence(
                path, settings.filesystem_prefix, settings.filename_pattern
            )
            horizontal, vertical = paths.sequence_angles(stem, extension)
            self.view.sequence = ImageSequence(stem, extension, horizontal, vertical)
            real = self.view.sequence.path(0, 90)
        image = self.pool.get(real, self.stamps.get(real))
        self.view.image = image
        if self.if_modified_since:
            since = parse_http_date(self.if_modified_since)
            if since is not None and int(image.stamp.mtime) <= since:
                raise NotModified(image.stamp.mtime)

    def _open_view(self, x: int, y: int) -> OpenedImage:
        sequence = self.view.sequence
        if sequence is None:
            return self._image()
        name = f"{self.view.requested_path}{self.settings.filename_pattern}{x:03d}_{y:03d}"
        try:
            real = paths.resolve(
                sequence.path(x, y)[len(self.settings.filesystem_prefix) :],
                self.settings.filesystem_prefix,
            )
            return self.pool.get(real)
        except (ImageNotFound, ImageReadError):
            raise ImageReadError(f"tiff open failed for:{name}.{sequence.extension}") from None

    def _select_view(self, x: int, y: int) -> None:
        """SDS: remember the angles; the view's file is opened when pixels are read."""
        self.view.angles = (x, y)

    def _current(self) -> OpenedImage:
        """The image pixels come from: the FIF file, or the sequence view SDS selected."""
        self._image()
        return self._open_view(*self.view.angles)

    def _histogram_source(self) -> OpenedImage | None:
        """For sequences iipsrv takes the histogram from the view at horizontal angle 0."""
        if self.view.sequence is None:
            return None
        return self._open_view(0, self.view.angles[1])

    def _info(self, image: OpenedImage) -> SourceInfo:
        """The image's info with this request's MINMAX ranges and sequence angles."""
        info = image.source.info
        view = self.view
        if view.minmax:
            mins, maxs = view.ranges(info)
            info = dataclasses.replace(info, min_values=mins, max_values=maxs)
        if view.sequence is not None:
            info = dataclasses.replace(
                info,
                horizontal_views=view.sequence.horizontal,
                vertical_views=view.sequence.vertical,
            )
        return info

    # --- metadata -------------------------------------------------------------------------------

    def _obj(self, name: str) -> None:
        if name.startswith("iip,"):
            self.protocol_line = True
            return
        image = self.view.image
        if image is None:
            if name in STATIC_OBJECTS:
                self.lines.extend(responses.OBJECTS[name](None, self.settings, 0.0))  # type: ignore[arg-type]
                return
            raise ProtocolError("1 3", name)
        found = responses.obj_lines(name, self._info(image), self.settings, self.view.rotation)
        if found is None:
            self.errors.append(("3 2", name))
        else:
            self.lines.extend(found)

    # --- output commands ------------------------------------------------------------------------

    def _default_quality(self, fmt: OutputFormat) -> int:
        if fmt is OutputFormat.PNG:
            return self.settings.png_quality
        if fmt is OutputFormat.WEBP:
            return self.settings.webp_quality
        return self.settings.jpeg_quality

    def _service(self) -> iiif.Service:
        return iiif.Service(
            self.settings, self.pool, self.pipeline, self.environ, self.view, self._render_tile
        )

    def _render_tile(
        self, image: OpenedImage, resolution: int, index: int, view: View, fmt: OutputFormat
    ) -> Response:
        """One pyramid tile through the tile path and its caches (JTL, IIIF, DeepZoom…)."""
        info = image.source.info
        rendering = view.rendering(info, fmt, self._default_quality(fmt))
        encoded = self.pipeline.tile(image, resolution, index, rendering)
        return responses.image_response(
            self.settings, encoded.data, encoded.media_type, image.stamp.mtime
        )

    def _tile(self, command: Tile) -> Response:
        if command.angles is not None:
            self._select_view(*command.angles)
        image = self._current()
        info = image.source.info
        index = command.index
        if int(self.view.rotation) % 360 == 180 and 0 <= command.resolution < len(info.levels):
            level = info.levels[command.resolution]
            tiles = level.tiles_across * -(-level.height // level.tile_width)  # 1.1 uses tw twice
            if tiles - 1 - index >= 0:
                index = tiles - 1 - index
        rendering = self.view.rendering(info, command.fmt, self._default_quality(command.fmt))
        encoded = self.pipeline.tile(
            image, command.resolution, index, rendering, self._histogram_source()
        )
        return responses.image_response(
            self.settings, encoded.data, encoded.media_type, image.stamp.mtime
        )

    def _convert(self, fmt: OutputFormat) -> Response:
        image = self._current()
        info = image.source.info
        view = self.view
        the_plan = plan(
            (info.width, info.height),
            [(lv.width, lv.height) for lv in info.levels],
            view.region,
            view.requested,
            self.settings.max_cvt,
            self.settings.allow_upscaling,
        )
        rendering = view.rendering(info, fmt, self._default_quality(fmt))
        encoded = self.pipeline.region(image, the_plan, rendering, self._histogram_source())
        name = responses.attachment_name(view.requested_path, fmt.extension)
        return responses.region_response(
            self.settings, encoded.data, encoded.media_type, image.stamp.mtime, name
        )

    def _views(self) -> list[tuple[int, OpenedImage]]:
        """(horizontal angle, image) for every horizontal view at the current vertical angle."""
        sequence = self.view.sequence
        if sequence is None:
            return [(0, self._image())]
        y = self.view.angles[1]
        return [(x, self._open_view(x, y)) for x in sequence.horizontal]

    def _profile(self, command: Profile) -> Response:
        image = self._image()
        info = image.source.info
        r = command.resolution
        if not 0 <= r < len(info.levels):
            raise BannerError("PFL: invalid resolution number")
        level = info.levels[r]
        x1, y1, x2, y2 = command.x1, command.y1, command.x2, command.y2
        if (
            min(x1, y1, x2, y2) < 0
            or x1 >= level.width
            or y1 >= level.height
            or x2 > level.width
            or y2 > level.height
        ):
            raise BannerError("PFL: invalid coordinates")
        if max(x2 - x1, y2 - y1) > self.settings.max_profile_length:
            raise BadRequest("PFL: profile longer than MAX_PROFILE_LENGTH")
        if x2 > x1:
            box = (x1, y1, min(x2, level.width) - x1, 1)
        elif y2 > y1:
            box = (x1, y1, 1, min(y2, level.height) - y1)
        else:
            box = (x1, y1, 1, 1)
        views = [(angle, self.pipeline.raw_region(img, r, *box)) for angle, img in self._views()]
        body = formats.profile_body(views, info.sample_format == "float")
        return responses.data_response(self.settings, body, "application/json", image.stamp.mtime)

    def _spectra(self, command: Spectra) -> Response:
        image = self._image()
        info = image.source.info
        tw, th = info.tile_size
        x, y = command.x, command.y
        if not (0 <= x < tw and 0 <= y < th):
            raise BadRequest("SPECTRA :: Error: x,y coordinates outside of tile boundaries")
        points = []
        for angle, img in self._views():
            tile = self.pipeline.raw_tile(img, command.resolution, command.tile)
            if x >= tile.shape[1] or y >= tile.shape[0]:
                break
            flat = tile.reshape(-1)  # iipsrv indexes samples, not pixels (channels ignored)
            value = flat[y * tw + x] if y * tw + x < flat.size else flat[-1]
            points.append((angle, formats.reflectance(float(value), tile.dtype)))
        body = formats.spectra_body(points)
        return responses.data_response(self.settings, body, "application/xml", image.stamp.mtime)

    def _tiles(self, command: Tiles) -> Response | None:
        image = self._current()
        info = image.source.info
        r = command.resolution
        if not 0 <= r < len(info.levels):
            image.source.read_tile(r, 0)  # raises the 404 for a missing resolution
        level = info.levels[r]
        across = level.tiles_across
        sx, sy = command.start % across, command.start // across
        ex, ey = command.end % across, command.end // across
        if ex < sx:
            sx, ex = ex, sx
        if ey < sy:
            return None
        limit = self.settings.max_til_tiles
        if (ex - sx + 1) * (ey - sy + 1) > limit:
            raise BadRequest(f"TIL: at most {limit} tiles per request (MAX_TIL_TILES)")
        quality = self.view.quality or self.settings.jpeg_quality
        records = []
        for i in range(sx, ex + 1):
            for j in range(sy, ey + 1):
                index = i + j * across
                tile = self.pipeline.raw_tile(image, r, index)
                records.append(
                    formats.til_record(
                        r, index, _til_data(tile, info, quality), info.bits_per_sample
                    )
                )
        body = b"".join(records)
        return responses.data_response(self.settings, body, responses.NETFPX, image.stamp.mtime)


def _til_data(tile: np.ndarray, info: SourceInfo, quality: int) -> bytes:
    """JPEG for 8-bit grey or RGB tiles, otherwise the raw little-endian samples."""
    if tile.dtype == np.uint8 and tile.shape[2] in (1, 3) and info.colorspace != "CIELAB":
        return encode(tile, OutputFormat.JPEG, quality).data
    return np.ascontiguousarray(tile, dtype=tile.dtype.newbyteorder("<")).tobytes()
