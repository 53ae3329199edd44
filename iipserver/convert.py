"""``iipserver convert IN.fits OUT.tif``: a FITS image to a tiled pyramidal BigTIFF for iipsrv.

The output is what iipsrv 1.1 reads: one IFD per level, full resolution first, then the
reduced levels (NewSubfileType 1) down to one tile; 256² float32 tiles, contiguous channels,
MinIsBlack; SMinSampleValue/SMaxSampleValue per channel (the default cuts that the FITS
source advertises) and the FITS header, as 80-column cards, in ImageDescription (STIFF's
layout). Reduced levels are the FITS source's own (``sources.pyramid``), so the converted
file and the FITS file serve the same pixels.

Streaming: the input is read in bands of whole rows; the full level is written as the bands
arrive while the reduced levels are computed into a temporary raw file beside the output,
then written from it. Memory stays bounded by a few bands, whatever the image's size. The
output appears under its name only when complete.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np
import tifffile

from iipserver.sources import pyramid
from iipserver.sources.fits import TILE, FitsData, default_cuts
from iipserver.sources.paths import image_file
from iipserver.sources.pyramids import prefetched

#: Bytes of input rows read per step (a multiple of the tile height is used).
BAND_BYTES = 32 << 20
#: ``--compression`` choices → tifffile's compression names (None: uncompressed).
COMPRESSIONS: dict[str, str | None] = {"none": None, "deflate": "zlib", "zstd": "zstd"}


@dataclass(frozen=True)
class Report:
    """What a conversion did."""

    width: int
    height: int
    channels: int
    levels: int
    seconds: float
    output_bytes: int

    @property
    def mpixels_per_second(self) -> float:
        """Full-resolution input pixels (per channel plane) converted per second, in millions."""
        return self.width * self.height * self.channels / 1e6 / max(self.seconds, 1e-9)


class Progress:
    """A one-line progress bar on a terminal (a final line only, elsewhere)."""

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 30) -> None:
        self.total = max(1, total)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.started = time.monotonic()
        self._shown = -1.0
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def advance(self, pixels: int) -> None:
        """Count ``pixels`` more as done."""
        self.done = min(self.total, self.done + pixels)
        now = time.monotonic()
        if self._tty and (now - self._shown >= 0.2 or self.done == self.total):
            self._shown = now
            self.stream.write("\r" + self.line(now))
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        """The bar as text."""
        elapsed = max(1e-9, (now or time.monotonic()) - self.started)
        fraction = self.done / self.total
        filled = round(fraction * self.width)
        rate = self.done / elapsed / 1e6
        eta = (self.total - self.done) / (self.done / elapsed) if self.done else 0.0
        bar = "#" * filled + "-" * (self.width - filled)
        return f"[{bar}] {fraction:4.0%} {rate:7.1f} Mpixel/s  ETA {eta:4.0f} s"

    def finish(self) -> None:
        """End the bar's line."""
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()


def _tiles(band: np.ndarray, channels: int) -> Iterator[np.ndarray]:
    """The tiles of a band of at most ``TILE`` rows, left to right (tifffile pads edges)."""
    for x in range(0, band.shape[1], TILE):
        tile = band[:, x : x + TILE]
        yield tile[:, :, 0] if channels == 1 else tile


def _tags(mins: tuple[float, ...], maxs: tuple[float, ...]) -> list[tuple[Any, ...]]:
    return [
        (340, "d", len(mins), tuple(mins), True),  # SMinSampleValue
        (341, "d", len(maxs), tuple(maxs), True),  # SMaxSampleValue
    ]


def convert(
    source: str,
    output: str,
    compression: str = "none",
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Convert FITS image ``source`` (``file.fits`` or ``file.fits[SEL]``) to ``output``.

    ``progress(done, total)`` is called with pixel counts as the work advances.

    Raises:
        IIPServerError: the input cannot be read as a FITS image.
        OSError: the output cannot be written.
        ValueError: unknown ``compression``.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}")
    started = time.monotonic()
    file, selector = image_file(source)
    data = FitsData(file, selector)
    try:
        width, height, channels = data.width, data.height, data.channels
        sizes = pyramid.level_sizes(width, height, TILE)
        total = sum(w * h for w, h in sizes) * 2 - width * height  # read+write, reduced twice
        done = [0]

        def advance(pixels: int) -> None:
            done[0] += pixels
            if progress is not None:
                progress(min(done[0], total), total)

        mins, maxs = default_cuts(data)
        directory = os.path.dirname(os.path.abspath(output))
        work = tempfile.mkdtemp(prefix=".iipserver-convert-", dir=directory)
        partial = os.path.join(work, "out.tif")
        try:
            _write(data, sizes, partial, work, compression, mins, maxs, advance)
            os.replace(partial, output)
        finally:
            for name in os.listdir(work):
                os.unlink(os.path.join(work, name))
            os.rmdir(work)
    finally:
        data.release()
    return Report(
        width, height, channels, len(sizes), time.monotonic() - started, os.path.getsize(output)
    )


def _write(
    data: FitsData,
    sizes: list[tuple[int, int]],
    path: str,
    work: str,
    compression: str,
    mins: tuple[float, ...],
    maxs: tuple[float, ...],
    advance: Callable[[int], None],
) -> None:
    channels = data.channels
    width, height = sizes[0]
    raw = [os.path.join(work, f"level{k}.raw") for k in range(len(sizes))]
    files = {k: open(raw[k], "wb") for k in range(1, len(sizes))}  # noqa: SIM115
    try:

        def sink(level: int, y: int, rows: np.ndarray) -> None:
            files[level].write(rows.astype("<f4").tobytes())

        stream = pyramid.PyramidStream(sizes, sink, TILE)
        band = max(TILE, (BAND_BYTES // max(1, width * channels * 4)) // TILE * TILE)

        def full_tiles() -> Iterator[np.ndarray]:
            # tifffile stops taking tiles at the page's last one: nothing may follow that yield
            for rows in prefetched(data, width, height, band):
                stream.push(rows)
                advance(rows.shape[0] * width)
                for top in range(0, rows.shape[0], TILE):
                    yield from _tiles(rows[top : top + TILE], channels)
                del rows  # held: this band and the next, being read

        options: dict[str, Any] = dict(
            tile=(TILE, TILE),
            dtype=np.float32,
            photometric="minisblack",
            planarconfig="contig",
            compression=COMPRESSIONS[compression],
            metadata=None,
            software=False,
            maxworkers=os.cpu_count() or 1,  # tiles compressed in parallel
        )
        if compression != "none":
            options["predictor"] = True  # floating-point predictor (3) for float32
        with tifffile.TiffWriter(path, bigtiff=True) as tif:
            shape = (height, width) if channels == 1 else (height, width, channels)
            tif.write(
                full_tiles(),
                shape=shape,
                extratags=_tags(mins, maxs),
                description=data.header or None,
                **options,
            )
            stream.finish()
            for f in files.values():
                f.close()
            for k in range(1, len(sizes)):
                w, h = sizes[k]
                tif.write(
                    _level_tiles(raw[k], w, h, channels, advance),
                    shape=(h, w) if channels == 1 else (h, w, channels),
                    subfiletype=1,
                    **options,
                )
    finally:
        for f in files.values():
            f.close()


def _level_tiles(
    path: str, width: int, height: int, channels: int, advance: Callable[[int], None]
) -> Iterator[np.ndarray]:
    """Tiles of a reduced level from its raw file, a band of ``TILE`` rows at a time."""
    row = width * channels * 4
    with open(path, "rb") as f:
        for y in range(0, height, TILE):
            n = min(TILE, height - y)
            rows = np.frombuffer(f.read(n * row), dtype="<f4").reshape(n, width, channels)
            advance(2 * n * width)
            yield from _tiles(rows, channels)


def run(
    source: str,
    output: str,
    compression: str = "none",
    quiet: bool = False,
    stream: TextIO | None = None,
) -> int:
    """``iipserver convert``: convert with a progress bar and a summary line on ``stream``
    (stderr); returns the exit status."""
    out = stream if stream is not None else sys.stderr
    bar: Progress | None = None

    def show(done: int, total: int) -> None:
        nonlocal bar
        if quiet:
            return
        if bar is None:
            bar = Progress(total, out)
        bar.advance(done - bar.done)

    report = convert(source, output, compression, show)
    if bar is not None:
        bar.finish()
    print(
        f"{output}: {report.width}×{report.height}×{report.channels} float32, "
        f"{report.levels} levels, {report.output_bytes / 1e6:.1f} MB in {report.seconds:.2f} s "
        f"({report.mpixels_per_second:.1f} Mpixel/s)",
        file=out,
    )
    return 0
