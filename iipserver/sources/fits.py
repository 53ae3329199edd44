"""FITS images (astropy, the ``fits`` extra) served directly: no conversion step.

``FitsData`` reads one image HDU as float32 pixels in image orientation (row 0 is the top, the
highest FITS y, as STIFF and VisiOmatic lay FITS out). Uncompressed data is memory-mapped and
scaled here (BSCALE/BZERO, BLANK → NaN), so a tile reads only its own rows; tile-compressed
HDUs (``.fits.fz``) go through astropy's section reader, which decompresses only the tiles a
read touches. ``FitsSource`` serves the full resolution from that reader and the reduced levels
from the on-disk pyramid cache (``pyramids``), computing a tile from its footprint while a
level is not cached yet.

An identifier may select an HDU: ``file.fits[2]`` (HDU index), ``file.fits[SCI]`` (EXTNAME) or
``file.fits[SCI,2]`` (EXTNAME, EXTVER). Without one, the first HDU with 2-D or 3-D image data
is served. A 3-D HDU is a cube: its third axis becomes the channels.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from typing import Any

import numpy as np

from iipserver.errors import (
    IIPServerError,
    ImageNotFound,
    ImageReadError,
    ResolutionNotFound,
    TileNotFound,
    UnsupportedImage,
)
from iipserver.sources import pyramid
from iipserver.sources.base import MAX_DECODE_BYTES, Level, SourceInfo, composite
from iipserver.sources.paths import image_file
from iipserver.sources.pyramids import CacheEntry, PyramidCache

log = logging.getLogger(__name__)

#: First bytes of every FITS file (a primary header's first card).
MAGIC = b"SIMPLE  ="
#: Tile size of the served pyramid (full resolution and reduced levels).
TILE = 256
#: Longest side served, and most channels of a cube.
MAX_SIDE = 2**31 - 1
MAX_CUBE_CHANNELS = 4096
#: A reduced tile is computed from its footprint when that holds at most this many pixels of
#: the finest available level; larger footprints wait for the cached level.
DIRECT_PIXELS = 2048 * 2048
#: Rows read per step when a large footprint is streamed (bytes).
BAND_BYTES = 32 << 20
#: Largest decompressed tile of a tile-compressed HDU.
MAX_TILE_BYTES = MAX_DECODE_BYTES
#: Samples taken for the default cuts (background statistics) of a large image.
CUT_SAMPLES = 1 << 20
_BITPIX = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}
_STRUCTURAL = ("SIMPLE", "BITPIX", "NAXIS", "EXTEND", "XTENSION", "PCOUNT", "GCOUNT", "END")


def _astropy_fits() -> Any:
    try:
        from astropy.io import fits
    except ImportError:  # pragma: no cover - the extra is installed in every test run
        raise UnsupportedImage("FITS needs the fits extra: pip install 'iipserver[fits]'") from None
    return fits


def preload() -> bool:
    """Import astropy now, if installed (a few tenths of a second), so that a server's first
    FITS request does not pay for it; workers forked afterwards share the import."""
    try:
        _astropy_fits()
    except UnsupportedImage:
        return False
    return True


def _header_text(header: Any) -> str:
    """80-column cards, concatenated without END or padding (STIFF's ImageDescription)."""
    text = str(header.tostring(sep="", endcard=False, padding=False))
    return text.encode("ascii", "replace").decode("ascii")


def _matches(hdu: Any, selector: str) -> bool:
    name, _, version = selector.partition(",")
    if str(hdu.name).strip().upper() != name.strip().upper():
        return False
    if version.strip():
        try:
            return int(hdu.header.get("EXTVER", 1)) == int(version)
        except (TypeError, ValueError):
            return False
    return True


def _is_image(hdu: Any, fits: Any) -> bool:
    if not isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)):
        return False
    header = hdu.header
    naxis = int(header.get("NAXIS", 0) or 0)
    return naxis >= 2 and all(int(header.get(f"NAXIS{i}", 0) or 0) > 0 for i in (1, 2))


class FitsData:
    """One image HDU of a FITS file, read as float32 ``(height, width, channels)`` regions.

    Raises (from the constructor):
        ImageNotFound: the selector names no image HDU.
        UnsupportedImage: not a 2-D or 3-D image, or too large.
        ImageReadError: the file cannot be parsed.
    """

    def __init__(self, path: str, selector: str | None = None) -> None:
        fits = _astropy_fits()
        self.path = path
        self._lock = threading.Lock()
        self._map: np.ndarray | None = None
        self._hdul: Any = None
        try:
            hdul = fits.open(path, memmap=False, lazy_load_hdus=True, mode="readonly")
            try:
                hdu, index = self._select(hdul, selector, fits)
                self._setup(hdul, hdu, index, fits)
            except BaseException:
                hdul.close()
                raise
        except IIPServerError:
            raise
        except Exception as exc:  # whatever a hostile file makes astropy raise
            raise ImageReadError(f"unreadable FITS ({exc.__class__.__name__})") from exc

    @staticmethod
    def _select(hdul: Any, selector: str | None, fits: Any) -> tuple[Any, int]:
        if selector is None:
            for index, hdu in enumerate(hdul):
                if _is_image(hdu, fits):
                    return hdu, index
            raise UnsupportedImage("FITS file without image data")
        text = selector.strip()
        if text.isdigit():
            index = int(text)
            if index < len(hdul):
                hdu = hdul[index]
                if _is_image(hdu, fits):
                    return hdu, index
        else:
            for index, hdu in enumerate(hdul):
                if _matches(hdu, text) and _is_image(hdu, fits):
                    return hdu, index
        raise ImageNotFound(f"no image HDU [{selector}]")

    def _setup(self, hdul: Any, hdu: Any, index: int, fits: Any) -> None:
        header = hdu.header
        naxis = int(header["NAXIS"])
        axes = [int(header.get(f"NAXIS{i}", 1) or 1) for i in range(1, naxis + 1)]
        if any(n != 1 for n in axes[3:]):
            raise UnsupportedImage("FITS images of more than 3 axes are not served")
        self.width, self.height = axes[0], axes[1]
        self.channels = axes[2] if naxis >= 3 else 1
        if max(self.width, self.height) > MAX_SIDE or self.channels > MAX_CUBE_CHANNELS:
            raise UnsupportedImage("Image too large")
        self.compressed = isinstance(hdu, fits.CompImageHDU)
        self.header = _header_text(header)
        if index > 0 and header.get("INHERIT") is True:
            own = {card.keyword for card in header.cards}
            primary = hdul[0].header
            inherited = fits.Header(
                [c for c in primary.cards if c.keyword not in own and c.keyword not in _STRUCTURAL]
            )
            self.header += _header_text(inherited)
        self.index = index
        if self.compressed:
            tile = getattr(hdu, "tile_shape", None) or (self.width, self.height)
            if math.prod(int(n) for n in tile) * 8 > MAX_TILE_BYTES:
                raise UnsupportedImage("Tiles too large")
            self._hdul = hdul  # kept open: the section reader needs it
            self._hdu = hdu
            return
        bitpix = int(header["BITPIX"])
        if bitpix not in _BITPIX:
            raise UnsupportedImage("Unsupported BITPIX")
        self._dtype = np.dtype(_BITPIX[bitpix])
        self._offset = int(hdu.fileinfo()["datLoc"])
        needed = self._offset + self.width * self.height * self.channels * self._dtype.itemsize
        if needed > os.path.getsize(self.path):
            raise ImageReadError("FITS data shorter than its header says")
        self._bscale = float(header.get("BSCALE", 1.0))
        self._bzero = float(header.get("BZERO", 0.0))
        blank = header.get("BLANK") if bitpix > 0 else None
        self._blank = int(blank) if isinstance(blank, int) else None
        self._plain = bitpix < 0 and self._bscale == 1.0 and self._bzero == 0.0
        hdul.close()

    def _mapped(self) -> np.ndarray:
        with self._lock:
            if self._map is None:
                self._map = np.memmap(
                    self.path,
                    dtype=self._dtype,
                    mode="r",
                    offset=self._offset,
                    shape=(self.channels, self.height, self.width),
                )
            return self._map

    def _rows(self, fy0: int, fy1: int) -> np.ndarray:
        """FITS rows ``fy0:fy1`` of every plane, read with ``pread`` (bands of a build or a
        conversion: memory stays bounded, no mapped page stays resident)."""
        row = self.width * self._dtype.itemsize
        out = np.empty((self.channels, fy1 - fy0, self.width), dtype=self._dtype)
        with open(self.path, "rb", buffering=0) as f:
            for c in range(self.channels):
                start = self._offset + (c * self.height + fy0) * row
                view = memoryview(out[c]).cast("B")
                got = f.readinto(view) if f.seek(start) == start else 0
                if got != len(view):
                    raise ImageReadError("FITS data shorter than its header says")
        return out

    def advise(self, y: int, height: int) -> None:
        """Ask the kernel to start reading image rows ``y:y+height`` (whole rows) now, so that
        a streaming pass keeps the disk busy while it computes (uncompressed data only)."""
        if self.compressed or not hasattr(os, "posix_fadvise"):
            return
        y0, y1 = max(0, y), min(self.height, y + height)
        if y1 <= y0:
            return
        row = self.width * self._dtype.itemsize
        fy0 = self.height - y1
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            for c in range(self.channels):
                start = self._offset + (c * self.height + fy0) * row
                os.posix_fadvise(fd, start, (y1 - y0) * row, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _scaled(self, raw: np.ndarray) -> np.ndarray:
        """Physical float32 values of raw FITS samples ``(c, h, w)`` flipped to image
        orientation ``(h, w, c)``. Converted plane by plane (rows are the contiguous axis: a
        cast whose innermost axis is the channel runs 4× slower), then interleaved."""
        planes = raw[:, ::-1, :]
        if self._plain:
            values = planes.astype(np.float32)
        else:
            wide = planes.astype(np.float64)
            if self._bscale != 1.0:
                wide *= self._bscale
            if self._bzero != 0.0:
                wide += self._bzero
            if self._blank is not None:
                wide[planes == self._blank] = np.nan
            values = wide.astype(np.float32)
        if values.shape[0] == 1:
            return values.reshape(values.shape[1], values.shape[2], 1)
        return np.ascontiguousarray(np.moveaxis(values, 0, 2))

    def region(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Pixels of a rectangle (image orientation, clipped to the image), float32
        ``(h, w, channels)``.

        Raises:
            ImageReadError: the data cannot be read or decompressed.
        """
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(self.width, x + width), min(self.height, y + height)
        if x1 <= x0 or y1 <= y0:
            return np.zeros((0, 0, self.channels), dtype=np.float32)
        fy0, fy1 = self.height - y1, self.height - y0  # FITS rows, bottom first
        try:
            if self.compressed:
                with self._lock:
                    hdu = self._compressed_hdu()
                    naxis = int(hdu.header["NAXIS"])
                    window: tuple[int | slice, ...] = (slice(fy0, fy1), slice(x0, x1))
                    if naxis >= 3:  # NAXIS4… (length 1) first, then channels, rows, columns
                        window = (0,) * (naxis - 3) + (slice(0, self.channels), *window)
                    raw = np.asarray(hdu.section[window])
                planes = raw.reshape(self.channels, fy1 - fy0, x1 - x0)[:, ::-1, :]
                values = planes.astype(np.float32)
                if self.channels == 1:
                    return values.reshape(fy1 - fy0, x1 - x0, 1)
                return np.ascontiguousarray(np.moveaxis(values, 0, 2))
            if x0 == 0 and x1 == self.width:  # whole rows: one read per plane, no mapping
                return self._scaled(self._rows(fy0, fy1))
            return self._scaled(self._mapped()[:, fy0:fy1, x0:x1])
        except IIPServerError:
            raise
        except Exception as exc:
            raise ImageReadError(f"FITS read failed ({exc.__class__.__name__})") from exc

    def sample(self) -> np.ndarray:
        """Every ``step``-th row from the bottom (FITS row 1), ``step`` ≥ 16 chosen so that at
        most about ``CUT_SAMPLES`` values are read: ``(channels, n)`` float32."""
        step = max(16, math.ceil(self.height * self.width / CUT_SAMPLES))
        rows = []
        for fy in range(0, self.height, step):
            y = self.height - 1 - fy
            rows.append(self.region(0, y, self.width, 1)[0])
        data = np.stack(rows)  # (n, width, channels)
        return np.moveaxis(data, 2, 0).reshape(self.channels, -1)

    def _compressed_hdu(self) -> Any:
        """The tile-compressed HDU, the file reopened if ``close`` closed it (lock held)."""
        if self._hdul is None:
            self._hdul = _astropy_fits().open(
                self.path, memmap=False, lazy_load_hdus=True, mode="readonly"
            )
            self._hdu = self._hdul[self.index]
        return self._hdu

    def close(self) -> None:
        """Close the file (memory map or compressed HDU); it is reopened on the next read."""
        with self._lock:
            self._map = None
            if self._hdul is not None:
                self._hdul.close()
                self._hdul = None

    def release(self) -> None:
        """Close everything (the same as ``close``: nothing stays open)."""
        self.close()


def default_cuts(data: FitsData) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel display cuts: VisiOmatic 3's ``[background − 2·MAD, background + 400·MAD]``
    over ``data.sample()``; what the converter writes as SMin/SMaxSampleValue and what the
    FITS source advertises, so both serve the same pixels."""
    from iipserver import display  # pure numpy statistics shared with the VisiOmatic dialect

    level, mad = display.background(data.sample())
    cuts = display.default_cuts(level, mad)
    mins, maxs = [], []
    for lo, hi in cuts.tolist():
        if not (math.isfinite(lo) and math.isfinite(hi)):
            lo, hi = 0.0, 1.0
        if hi <= lo:
            hi = lo + 1.0
        mins.append(float(np.float32(lo)))
        maxs.append(float(np.float32(hi)))
    return tuple(mins), tuple(maxs)


class FitsSource:
    """A FITS image HDU as a pyramidal source (see the module docstring)."""

    def __init__(self, path: str, pyramids: PyramidCache | None = None) -> None:
        file, selector = image_file(path)
        self.path = path
        self.data = FitsData(file, selector)
        try:
            st = os.stat(file)
            sizes = pyramid.level_sizes(self.data.width, self.data.height, TILE)
            self._sizes = sizes
            self._entry: CacheEntry | None = None
            if pyramids is not None:
                self._entry = pyramids.entry(path, st, sizes, self.data.channels)
            cuts = self._entry.cuts() if self._entry is not None else None
            if cuts is None:
                cuts = default_cuts(self.data)
                if self._entry is not None:
                    self._entry.save_cuts(cuts)
        except BaseException:
            self.data.release()
            raise
        levels = tuple(Level(w, h, TILE, TILE) for w, h in reversed(sizes))
        self._full = len(levels) - 1
        self._build_started = False
        self._build_lock = threading.Lock()
        self.info = SourceInfo(
            levels=levels,
            channels=self.data.channels,
            bits_per_sample=32,
            sample_format="float",
            dtype="float32",
            min_values=cuts[0],
            max_values=cuts[1],
            colorspace="GREYSCALE",
            metadata={"description": self.data.header} if self.data.header else {},
        )

    def background_samples(self) -> np.ndarray:
        """Samples for VisiOmatic 3's background statistics, ``(channels, n)``: every 16th row
        from the bottom, as its server takes them, or every k-th (k > 16) when that would be
        more than about ``CUT_SAMPLES`` values; only those rows are read. The same samples as
        the default cuts, so INFO's cuts and ``Min-Max-sample-values`` agree."""
        return self.data.sample()

    def _check(self, resolution: int, index: int) -> Level:
        if not 0 <= resolution <= self._full:
            raise ResolutionNotFound(f"Asked for non-existent resolution: {resolution}")
        level = self.info.levels[resolution]
        if not 0 <= index < level.tile_count:
            raise TileNotFound(f"Asked for non-existent tile: {index}")
        return level

    def read_tile(self, resolution: int, index: int) -> np.ndarray:
        """Return one tile (see ``ImageSource.read_tile``)."""
        level = self._check(resolution, index)
        box = level.tile_box(index)
        if resolution == self._full:
            return self.data.region(*box)
        entry = self._entry
        if entry is not None:
            tile = entry.read_tile(resolution, index, box)
            if tile is not None:
                return tile
        steps = self._full - resolution
        if entry is None or (box[2] * box[3]) << (2 * steps) <= DIRECT_PIXELS:
            if entry is not None:
                self._start_background_build()
            return self._computed(resolution, box)
        # a large footprint: the levels are built (or their build awaited) before answering,
        # all in the one pass over the file that the smallest of them needs anyway
        entry.build(self.data, self._sizes)
        tile = entry.read_tile(resolution, index, box)
        return tile if tile is not None else self._computed(resolution, box)

    def _computed(self, resolution: int, box: tuple[int, int, int, int]) -> np.ndarray:
        """A tile of a reduced level from its footprint at full resolution: at once when the
        footprint is small, else streamed in bands of rows (memory bounded whatever the
        level; the cache is off or the image too large for it)."""
        x, y, w, h = box
        steps = self._full - resolution
        f = 1 << steps
        fw, fh = w * f, h * f
        if fw * fh <= DIRECT_PIXELS:
            return pyramid.reduce(self.data.region(x * f, y * f, fw, fh), steps)
        out = np.empty((h, w, self.info.channels), dtype=np.float32)

        def sink(level: int, top: int, rows: np.ndarray) -> None:
            if level == steps:
                out[top : top + rows.shape[0]] = rows

        stream = pyramid.PyramidStream([(fw >> k, fh >> k) for k in range(steps + 1)], sink, h)
        band = max(f, (BAND_BYTES // (fw * self.info.channels * 4)) // f * f)
        for top in range(0, fh, band):
            stream.push(self.data.region(x * f, y * f + top, fw, min(band, fh - top)))
        stream.finish()
        return out

    def _start_background_build(self) -> None:
        with self._build_lock:
            if self._build_started or self._entry is None:
                return
            self._build_started = True
        entry = self._entry

        def build() -> None:
            try:
                entry.build(self.data, self._sizes, wait=False)
            except Exception:  # a failed build leaves no level; tiles are still computed
                log.exception("pyramid build failed for %s", self.path)

        threading.Thread(target=build, name="pyramid-build", daemon=True).start()

    def read_region(self, resolution: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Return a rectangle of one level (see ``ImageSource.read_region``)."""
        if not 0 <= resolution <= self._full:
            raise ResolutionNotFound(f"Asked for non-existent resolution: {resolution}")
        if resolution == self._full:
            return self.data.region(x, y, width, height)
        level = self.info.levels[resolution]
        return composite(
            level,
            lambda i: self.read_tile(resolution, i),
            (x, y, width, height),
            self.info.channels,
            "float32",
        )

    def stored_raw(self, resolution: int) -> bool:
        """Uncompressed full-resolution rows and cached levels cost about a copy."""
        if resolution == self._full:
            return not self.data.compressed
        return self._entry is not None and self._entry.has(resolution)

    def stored_jpeg(self, resolution: int, index: int) -> bytes | None:
        """FITS pixels are never JPEG (see ``ImageSource.stored_jpeg``)."""
        return None

    def close(self) -> None:
        """Drop the memory map and cached-level files; they are reopened on the next read."""
        self.data.close()
        if self._entry is not None:
            self._entry.close()
