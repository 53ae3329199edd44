"""Per-request view state: what the modifier commands set, frozen into a Rendering for output."""

from __future__ import annotations

from dataclasses import dataclass, field

from iipserver.encoders import OutputFormat
from iipserver.sources.base import SourceInfo
from iipserver.sources.pool import OpenedImage
from iipserver.viewport import Region

#: Colour-map names that change pixels (any other CMP name means "no colour map").
COLORMAPS = frozenset({"hot", "cold", "jet", "red", "green", "blue"})


@dataclass(frozen=True)
class Rendering:
    """Everything that turns source pixels into output bytes; hashable, so a cache key."""

    mins: tuple[float, ...]
    maxs: tuple[float, ...]
    fmt: OutputFormat = OutputFormat.JPEG
    quality: int = 75
    quality_set: bool = False
    """QLT was given (a stored JPEG tile is only sent as is at the default quality)."""
    contrast: float = 1.0
    equalise: bool = False
    stretch: bool = False
    gamma: float = 1.0
    log_gamma: bool = False
    invert: bool = False
    colormap: str | None = None
    colour: str | None = None
    rotation: float = 0.0
    flip: int = 0
    twist: tuple[tuple[float, ...], ...] | None = None
    shade: tuple[int, int] | None = None

    def needs_float(self, info: SourceInfo) -> bool:
        """Tell whether tiles go through the float pipeline (spec §9.3 step 4, iipsrv 1.1)."""
        return (
            info.sample_format == "float"
            or info.bits_per_sample > 8
            or info.dtype != "uint8"
            or self.contrast != 1.0
            or self.stretch
            or self.gamma != 1.0
            or self.log_gamma
            or self.invert
            or self.colormap is not None
            or self.twist is not None
            or self.shade is not None
        )

    def plain(self, info: SourceInfo) -> bool:
        """Tell whether the output is the stored 8-bit pixels unchanged, as a JPEG at the
        default quality: then a stored JPEG tile can be sent as is (spec §9.4)."""
        return (
            self.fmt is OutputFormat.JPEG
            and not self.quality_set
            and not self.needs_float(info)
            and self.colour is None
            and not self.equalise
            and self.rotation % 360 == 0
            and not self.flip
            and info.colorspace in ("sRGB", "GREYSCALE")
        )


@dataclass(frozen=True)
class Display:
    """VisiOmatic 3 display settings of one request (policy §3); hashable."""

    channel: int | None
    """1-based channel for mono mode; None for colour mode."""
    cuts: tuple[tuple[float, float], ...]
    matrix: tuple[tuple[float, ...], ...]
    brightness: float
    contrast: float
    gamma: float
    invert: bool
    colormap: str


@dataclass(frozen=True)
class ImageSequence:
    """An image sequence: files ``<stem><x:03d>_<y:03d>.<extension>`` and their angles."""

    stem: str
    extension: str
    horizontal: tuple[int, ...]
    vertical: tuple[int, ...]

    def path(self, x: int, y: int) -> str:
        """File of view (x, y)."""
        return f"{self.stem}{x:03d}_{y:03d}.{self.extension}"


@dataclass
class View:
    """Mutable state accumulated while a request's commands run, left to right."""

    image: OpenedImage | None = None
    requested_path: str = ""
    quality: int | None = None
    contrast: float = 1.0
    equalise: bool = False
    stretch: bool = False
    gamma: float = 1.0
    log_gamma: bool = False
    invert: bool = False
    colormap: str | None = None
    colour: str | None = None
    rotation: float = 0.0
    flip: int = 0
    twist: tuple[tuple[float, ...], ...] | None = None
    shade: tuple[int, int] | None = None
    minmax: dict[int | None, tuple[float, float]] = field(default_factory=dict)
    requested: tuple[int, int] = (0, 0)
    region: Region = field(default_factory=Region)
    sequence: ImageSequence | None = None
    angles: tuple[int, int] = (0, 90)

    def set_minmax(self, channel: int | None, lo: float, hi: float) -> None:
        """Override the range of ``channel`` (0-based) or, with None, of every channel."""
        if channel is None:
            self.minmax = {None: (lo, hi)}
        else:
            self.minmax[channel] = (lo, hi)

    def ranges(self, info: SourceInfo) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Effective per-channel (mins, maxs) after MINMAX overrides."""
        mins, maxs = list(info.min_values), list(info.max_values)
        for channel, (lo, hi) in self.minmax.items():
            targets = range(info.channels) if channel is None else [channel]
            for c in targets:
                if 0 <= c < info.channels:
                    mins[c], maxs[c] = lo, hi
        return tuple(mins), tuple(maxs)

    def rendering(self, info: SourceInfo, fmt: OutputFormat, default_quality: int) -> Rendering:
        """Freeze the view for one output command."""
        mins, maxs = self.ranges(info)
        return Rendering(
            mins=mins,
            maxs=maxs,
            fmt=fmt,
            quality=default_quality if self.quality is None else self.quality,
            quality_set=self.quality is not None,
            contrast=self.contrast,
            equalise=self.equalise,
            stretch=self.stretch,
            gamma=self.gamma,
            log_gamma=self.log_gamma,
            invert=self.invert,
            colormap=self.colormap if self.colormap in COLORMAPS else None,
            colour=self.colour,
            rotation=self.rotation,
            flip=self.flip,
            twist=self.twist,
            shade=self.shade,
        )
