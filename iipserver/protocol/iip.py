"""The IIP dialect: run parsed commands left to right against a View and build the response."""

from __future__ import annotations

import dataclasses
import email.utils
from collections.abc import Sequence

from iipserver.errors import NotImplementedCommand, NotModified, ProtocolError
from iipserver.pipeline import Pipeline
from iipserver.protocol import responses
from iipserver.protocol.commands import (
    Colormap,
    ColorTwist,
    Colour,
    Command,
    Contrast,
    Fif,
    Gamma,
    Ignored,
    Invalid,
    Invert,
    MinMax,
    NotYetSupported,
    Obj,
    Quality,
    Rotate,
    Shade,
    Tile,
    Unknown,
)
from iipserver.protocol.commands import (
    Sequence as SequenceCommand,
)
from iipserver.protocol.responses import Response
from iipserver.settings import Settings
from iipserver.sources import paths
from iipserver.sources.pool import SourcePool
from iipserver.view import View

#: Output commands that need an image (error ``1 3`` without one, never a crash).
OUTPUT_COMMANDS = frozenset({"CVT", "TIL", "PFL", "SPECTRA"})

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
    ) -> None:
        self.settings = settings
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
            case Quality(value):
                view.quality = max(1, value)
            case SequenceCommand(x, y):
                view.sequence = (x, y)
            case MinMax(channel, lo, hi):
                if view.image is None:
                    raise ProtocolError("1 3", "minmax")
                if channel is None or channel >= 0:
                    view.set_minmax(channel, lo, hi)
            case Contrast(value, mode):
                if mode is not None:
                    raise NotImplementedCommand(f"CNT={mode} is not supported yet")
                view.contrast = value
            case Gamma(value, log):
                view.gamma, view.log_gamma = value, log
            case Invert():
                view.invert = True
            case Colormap(name):
                view.colormap = name
            case Colour(mode):
                if mode == "binary":
                    raise NotImplementedCommand("COL=binary is not supported yet")
                view.colour = mode
            case ColorTwist(matrix):
                view.twist = matrix
            case Shade(h_angle, v_angle):
                view.shade = (h_angle, v_angle)
            case Rotate(angle, flip):
                view.rotation, view.flip = angle, flip
            case Unknown(name):
                self.errors.append(("2 2", name))
            case Invalid(_, error):
                raise error
            case NotYetSupported(name):
                if view.image is None and name in OUTPUT_COMMANDS:
                    raise ProtocolError("1 3", "")
                raise NotImplementedCommand(f"{name} is not supported yet")
            case Ignored():
                pass
        return None

    def _fif(self, path: str) -> None:
        self.view = View(requested_path=path, quality=self.view.quality)
        real = paths.resolve(path, self.settings.filesystem_prefix, self.settings.filesystem_suffix)
        image = self.pool.get(real)
        self.view.image = image
        if self.if_modified_since:
            since = parse_http_date(self.if_modified_since)
            if since is not None and int(image.stamp.mtime) <= since:
                raise NotModified(image.stamp.mtime)

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
        info = image.source.info
        if self.view.minmax:  # MINMAX holds for the rest of the request, OBJ included
            mins, maxs = self.view.ranges(info)
            info = dataclasses.replace(info, min_values=mins, max_values=maxs)
        found = responses.obj_lines(name, info, self.settings, self.view.rotation)
        if found is None:
            self.errors.append(("3 2", name))
        else:
            self.lines.extend(found)

    def _tile(self, command: Tile) -> Response:
        image = self.view.image
        if image is None:
            raise ProtocolError("1 3", "")
        info = image.source.info
        index = command.index
        if int(self.view.rotation) % 360 == 180 and 0 <= command.resolution < len(info.levels):
            index = info.levels[command.resolution].tile_count - 1 - index
            index = index if index >= 0 else command.index
        rendering = self.view.rendering(info, command.fmt, self._default_quality(command))
        encoded = self.pipeline.tile(image, command.resolution, index, rendering)
        return responses.image_response(
            self.settings, encoded.data, encoded.media_type, image.stamp.mtime
        )

    def _default_quality(self, command: Tile) -> int:
        fmt = command.fmt.name
        if fmt == "PNG":
            return self.settings.png_quality
        if fmt == "WEBP":
            return self.settings.webp_quality
        return self.settings.jpeg_quality
