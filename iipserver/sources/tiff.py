"""Tiled pyramidal TIFF and BigTIFF through tifffile: single tiles read by file offset."""

from __future__ import annotations

import io
import logging
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

import numpy as np
import tifffile

from iipserver.errors import (
    IIPServerError,
    ImageReadError,
    ResolutionNotFound,
    TileNotFound,
    UnsupportedImage,
)
from iipserver.sources.base import MAX_DECODE_BYTES, Level, SourceInfo, composite

log = logging.getLogger(__name__)

#: Virtual tile size for levels stored in strips rather than tiles.
STRIP_TILE = 256

_METADATA_TAGS = {
    "ImageDescription": "description",
    "Artist": "artist",
    "Copyright": "copyright",
    "DateTime": "datetime",
    "Software": "software",
    "DocumentName": "document_name",
    "PageName": "page_name",
    "Make": "make",
    "Model": "model",
    "XMLPacket": "xmp",
    "StoNits": "scale",
}

_DEFAULT_MAX = {8: 255.0, 12: 4095.0, 16: 65535.0, 32: 4294967295.0}

_SOI, _EOI, _SOS, _APP14 = b"\xff\xd8", b"\xff\xd9", 0xDA, 0xEE
#: Start-of-frame markers (baseline, extended, progressive, lossless; not DHT, JPG, DAC).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}

#: Largest decoded tile or strip, and largest stored one, a read may allocate.
MAX_SEGMENT_BYTES = MAX_DECODE_BYTES
#: JPEG-in-TIFF; every other codec tifffile decodes into a buffer of the segment's size,
#: except the image codecs (JPEG 2000, PNG, WebP, JPEG XL…) whose output size only their own
#: header states: those are refused.
_JPEG = 7
#: Bits per sample the pipeline serves, by SampleFormat (1 uint, 2 int, 3 float).
_BITS = {1: {1, 2, 4, 8, 12, 16, 32}, 2: {8, 16, 32}, 3: {16, 32, 64}}


def _says_rgb(stream: bytes) -> bool:
    """True if a decoder will read the stream's three components as RGB rather than YCbCr:
    an APP14 "Adobe" marker, or components identified as 'R', 'G', 'B' (libjpeg's rules)."""
    pos = 2
    while pos + 4 <= len(stream) and stream[pos] == 0xFF:
        marker = stream[pos + 1]
        if marker == _SOS:
            break
        if marker == _APP14 and stream[pos + 4 : pos + 9] == b"Adobe":
            return True
        if marker in (0xC0, 0xC1, 0xC2) and stream[pos + 9 : pos + 10] == b"\x03":
            ids = stream[pos + 10 : pos + 19 : 3]
            return ids == b"RGB"
        pos += 2 + int.from_bytes(stream[pos + 2 : pos + 4], "big")
    return False


def _jpeg_size(stream: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG stream's start-of-frame marker; None if it has none."""
    pos = 2
    while pos + 9 <= len(stream) and stream[pos] == 0xFF:
        marker = stream[pos + 1]
        if marker == _SOS:
            break
        if marker in _SOF:
            height = int.from_bytes(stream[pos + 5 : pos + 7], "big")
            return int.from_bytes(stream[pos + 7 : pos + 9], "big"), height
        pos += 2 + int.from_bytes(stream[pos + 2 : pos + 4], "big")
    return None


def _segment_shape(page: tifffile.TiffPage) -> tuple[int, int, int, int]:
    """(segment count, width, rows, samples) of a page's tiles or strips."""
    width, height = int(page.imagewidth), int(page.imagelength)
    spp = int(page.samplesperpixel)
    planes, samples = (spp, 1) if int(page.planarconfig) == 2 else (1, spp)
    if page.is_tiled:
        seg_w, seg_h = int(page.tilewidth), int(page.tilelength)
        if seg_w < 1 or seg_h < 1:
            raise ImageReadError("invalid tile size")
        count = -(-width // seg_w) * -(-height // seg_h)
    else:
        seg_w, seg_h = width, max(1, min(int(page.rowsperstrip), height))
        count = -(-height // seg_h)
    return count * planes, seg_w, seg_h, samples


def _check_page(page: tifffile.TiffPage, file_size: int) -> None:
    """Refuse a page that cannot be read safely: absurd or inconsistent geometry, a pixel
    layout or codec the server does not serve, tiles larger than ``MAX_SEGMENT_BYTES``, or
    tile data outside the file.

    Raises:
        ImageReadError: the page's tags contradict each other or the file.
        UnsupportedImage: a valid layout this server does not read.
    """
    bps = page.bitspersample
    if not isinstance(bps, int):
        raise UnsupportedImage("Unsupported bits per sample")
    width, height = int(page.imagewidth), int(page.imagelength)
    if width < 1 or height < 1 or int(page.samplesperpixel) < 1 or int(page.imagedepth) != 1:
        raise ImageReadError("invalid image dimensions")
    if page.dtype is None or bps not in _BITS.get(int(page.sampleformat), set()):
        raise UnsupportedImage("Unsupported bits per sample")
    if int(page.planarconfig) not in (1, 2):
        raise UnsupportedImage("Unsupported planar configuration")
    compression = int(page.compression)
    if compression != 1 and (
        compression not in tifffile.TIFF.DECOMPRESSORS
        or (compression in tifffile.TIFF.IMAGE_COMPRESSIONS and compression != _JPEG)
    ):
        raise UnsupportedImage("Unsupported compression")
    count, seg_w, seg_h, samples = _segment_shape(page)
    if seg_w * seg_h * samples * np.dtype(page.dtype).itemsize > MAX_SEGMENT_BYTES:
        raise UnsupportedImage("Tiles too large")
    offsets = np.asarray(page.dataoffsets, dtype=np.uint64)
    counts = np.asarray(page.databytecounts, dtype=np.uint64)
    if offsets.shape != (count,) or counts.shape != (count,):
        raise ImageReadError("tile table does not match the image size")
    stored = counts > 0
    if np.any(counts > MAX_SEGMENT_BYTES) or np.any(
        offsets[stored] + counts[stored] > np.uint64(file_size)
    ):
        raise ImageReadError("tile data lies outside the file")


def _plain_dtype(page: tifffile.TiffPage, byteorder: str) -> np.dtype | None:
    """The file's dtype for tiles stored raw (no compression, no predictor, whole bytes)."""
    if not page.is_tiled or int(page.compression) != 1 or int(page.predictor) != 1:
        return None
    if int(page.bitspersample) % 8 or int(page.fillorder) != 1 or page.dtype is None:
        return None
    return np.dtype(page.dtype).newbyteorder(">" if byteorder == ">" else "<")


def _jpeg_passable(page: tifffile.TiffPage) -> bool:
    """True if the page's tiles are JPEG streams a browser decodes to the stored pixels."""
    return (
        page.is_tiled
        and int(page.compression) == 7
        and int(page.bitspersample) == 8
        and int(page.sampleformat) == 1
        and (
            (int(page.samplesperpixel) == 1 and int(page.photometric) == 1)
            or (int(page.samplesperpixel) == 3 and int(page.photometric) in (2, 6))
        )
        and (int(page.planarconfig) == 1 or int(page.samplesperpixel) == 1)
    )


def _is_mask(page: tifffile.TiffPage) -> bool:
    return bool(int(page.subfiletype) & 4)


def _same_layout(page: tifffile.TiffPage, base: tifffile.TiffPage) -> bool:
    return (
        page.samplesperpixel == base.samplesperpixel
        and page.bitspersample == base.bitspersample
        and page.sampleformat == base.sampleformat
        and page.imagedepth == 1
        and not _is_mask(page)
        and page.imagewidth < base.imagewidth
        and page.imagelength <= base.imagelength
    )


def _pyramid_pages(tif: tifffile.TiffFile) -> list[tifffile.TiffPage]:
    """Return the pages that are real pyramid levels, largest first.

    Levels are either SubIFDs of the first page or successive top-level IFDs. Thumbnails (untiled
    reduced pages), masks and pages of another pixel layout are not levels.
    """
    first = tif.pages.first
    size = int(tif.filehandle.size)
    _check_page(first, size)
    levels: list[tifffile.TiffPage] = [first]
    candidates: list[Any] = []
    if first.subifds:
        # TiffPage(…, index) reads at the current file position: seek to each SubIFD first.
        for i, offset in enumerate(first.subifds):
            tif.filehandle.seek(offset)
            candidates.append(tifffile.TiffPage(tif, index=(0, i)))
    else:
        candidates = list(tif.pages[1:])
    for page in candidates:
        if not isinstance(page, tifffile.TiffPage):
            page = page.aspage()
        previous = levels[-1]
        if _same_layout(page, previous) and (page.is_tiled or not first.is_tiled):
            try:
                _check_page(page, size)
            except IIPServerError:
                continue  # a damaged reduced level is not a level
            levels.append(page)
    return levels


def _tag(page: tifffile.TiffPage, name: str) -> Any:
    tag = page.tags.get(name)
    return None if tag is None else tag.value


def _ascii_tag(page: tifffile.TiffPage, name: str) -> str | None:
    """An ASCII tag exactly as libtiff returns it (up to the first NUL, trailing spaces kept;
    tifffile strips them, which would change FITS headers padded to 2880 bytes)."""
    tag = page.tags.get(name)
    if tag is None:
        return None
    if int(tag.dtype) != 2 or tag.count <= page.parent.tiff.tagoffsetthreshold:
        return _text(tag.value)
    handle = page.parent.filehandle
    handle.seek(tag.valueoffset)
    raw = handle.read(tag.count).split(b"\x00", 1)[0]
    return raw.decode("utf-8", "replace")


def _per_channel(value: Any, channels: int) -> list[float] | None:
    if value is None:
        return None
    values = [float(v) for v in np.atleast_1d(np.asarray(value, dtype=np.float64)).ravel()]
    if not values:
        return None
    if len(values) < channels:
        values = values + [values[-1]] * (channels - len(values))
    return values[:channels]


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _dpi(page: tifffile.TiffPage) -> tuple[float, float] | None:
    xres, yres = _tag(page, "XResolution"), _tag(page, "YResolution")
    if not xres or not yres:
        return None
    unit = int(_tag(page, "ResolutionUnit") or 2)
    if unit == 1:  # no absolute unit: not a physical resolution
        return None
    scale = 100.0 if unit == 3 else 1 / 0.0254

    def value(r: Any) -> float:
        return float(r[0]) / float(r[1]) if isinstance(r, tuple) else float(r)

    return value(xres) * scale, value(yres) * scale


def _open_fd(path: str) -> int:
    """Open ``path`` for reading without blocking (a FIFO swapped in must not hang the
    worker) and make sure it is a regular file.

    Raises:
        ImageReadError: the file cannot be opened.
        UnsupportedImage: it is not a regular file.
    """
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ImageReadError("Unable to open file") from exc
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        regular = False
    if not regular:
        os.close(fd)
        raise UnsupportedImage("Unsupported image type")
    return fd


def _open_regular(path: str) -> BinaryIO:
    """``_open_fd`` as a buffered binary file (named after ``path``, as tifffile wants)."""
    raw = io.FileIO(_open_fd(path), "rb")
    raw.name = path
    return io.BufferedReader(raw)


class TiffSource:
    """A pyramidal TIFF/BigTIFF file.

    Resolution ``r`` is IIP-numbered (0 = smallest). Tiles are read with one ``pread`` of the
    stored tile and decoded by tifffile's codec for that page; arrays are ``(h, w, channels)``.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._users = 0
        self._close_pending = False
        try:
            with _open_regular(path) as handle, tifffile.TiffFile(handle) as tif:
                pages = _pyramid_pages(tif)
                for page in pages:  # build each decode closure while the file is open
                    _ = page.decode
                self._pages = pages[::-1]  # IIP order: smallest first
                # per level: stored JPEG tables, or None when its tiles cannot be sent as is
                self._passable: list[bytes | None] = [
                    (page.jpegtables or b"") if _jpeg_passable(page) else None
                    for page in self._pages
                ]
                self._rgb_jpeg = [int(page.photometric) == 2 for page in self._pages]
                # per level: the stored dtype of plain uncompressed tiles (read without a codec)
                self._plain: list[np.dtype | None] = [
                    _plain_dtype(page, tif.byteorder) for page in self._pages
                ]
                self.info = self._read_info(pages)
        except IIPServerError:
            raise
        except Exception as exc:  # whatever a hostile file makes tifffile raise
            raise ImageReadError(f"unreadable TIFF ({exc.__class__.__name__})") from exc

    def _read_info(self, pages: list[tifffile.TiffPage]) -> SourceInfo:
        first = pages[0]
        photometric = int(first.photometric)
        bps = int(first.bitspersample)
        spp = int(first.samplesperpixel)
        fmt = {1: "uint", 2: "int", 3: "float"}.get(int(first.sampleformat), "uint")
        self._palette: np.ndarray | None = None
        channels, dtype = spp, np.dtype(first.dtype)
        if photometric == 3 and first.colormap is not None:  # palette → RGB
            self._palette = (np.asarray(first.colormap).T >> 8).astype(np.uint8)
            channels, dtype, bps = 3, np.dtype(np.uint8), 8
        elif bps == 1:
            dtype = np.dtype(np.uint8)
        if photometric == 8:
            colorspace = "CIELAB"
        elif photometric == 1:
            colorspace = "BINARY" if bps == 1 else "GREYSCALE"
        else:
            colorspace = "sRGB"
        levels = []
        for page in pages[::-1]:
            if page.is_tiled:
                levels.append(
                    Level(page.imagewidth, page.imagelength, page.tilewidth, page.tilelength)
                )
            else:
                levels.append(Level(page.imagewidth, page.imagelength, STRIP_TILE, STRIP_TILE))
        mins = _per_channel(_tag(first, "SMinSampleValue"), channels)
        maxs = _per_channel(_tag(first, "SMaxSampleValue"), channels)
        metadata = {}
        for tag, key in _METADATA_TAGS.items():
            text = _ascii_tag(first, tag)
            if text:
                metadata[key] = text
        info = SourceInfo(
            levels=tuple(levels),
            channels=channels,
            bits_per_sample=int(first.bitspersample),
            sample_format=fmt,
            dtype=dtype.name,
            min_values=(),
            max_values=(),
            colorspace=colorspace,
            metadata=metadata,
            dpi=_dpi(first),
        )
        self.info = info
        if fmt == "float" and (maxs is None or not any(maxs)):
            lo, hi = self._computed_range()
            mins = mins if mins is not None else lo
            maxs = hi
        mins = mins if mins is not None else [0.0] * channels
        if maxs is None or not any(maxs):
            maxs = [_DEFAULT_MAX.get(bps if bps > 8 else 8, 255.0)] * channels
        return SourceInfo(**{**info.__dict__, "min_values": tuple(mins), "max_values": tuple(maxs)})

    def _computed_range(self) -> tuple[list[float], list[float]]:
        """Per-channel finite min/max of the smallest level (policy §2); of its first tile
        only when the whole level would take more than ``MAX_SEGMENT_BYTES``."""
        level = self.info.levels[0]
        itemsize = np.dtype(self.info.dtype).itemsize * self.info.channels
        if level.width * level.height * itemsize > MAX_SEGMENT_BYTES:
            data = self.read_tile(0, 0).astype(np.float64)
        else:
            data = self.read_region(0, 0, 0, level.width, level.height).astype(np.float64)
        flat = data.reshape(-1, data.shape[-1])
        lo, hi = [], []
        for c in range(flat.shape[1]):
            finite = flat[:, c][np.isfinite(flat[:, c])]
            lo.append(float(finite.min()) if finite.size else 0.0)
            hi.append(float(finite.max()) if finite.size else 1.0)
        return lo, hi

    @contextmanager
    def _file(self) -> Iterator[int]:
        with self._lock:
            if self._fd is None:
                try:
                    self._fd = _open_fd(self.path)
                except IIPServerError as exc:
                    raise ImageReadError("image file could not be reopened") from exc
            self._users += 1
            fd = self._fd
        try:
            yield fd
        finally:
            with self._lock:
                self._users -= 1
                if self._close_pending and self._users == 0:
                    self._close_locked()

    def _close_locked(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._close_pending = False

    def close(self) -> None:
        """Close the file handle now, or after the reads in progress finish."""
        with self._lock:
            if self._users:
                self._close_pending = True
            else:
                self._close_locked()

    def _page(self, resolution: int) -> tifffile.TiffPage:
        if not 0 <= resolution < len(self._pages):
            if resolution == len(self._pages):  # iipsrv 1.1's texts, kept for compatibility
                raise ResolutionNotFound("TIFFSetDirectory failed")
            raise ResolutionNotFound(f"TPTImage :: Asked for non-existent resolution: {resolution}")
        return self._pages[resolution]

    def read_tile(self, resolution: int, index: int) -> np.ndarray:
        """Return one tile (see ``ImageSource.read_tile``)."""
        page = self._page(resolution)
        level = self.info.levels[resolution]
        if not 0 <= index < level.tile_count:
            raise TileNotFound(f"Asked for non-existent tile: {index}")
        x, y, w, h = level.tile_box(index)
        if not page.is_tiled:
            return self.read_region(resolution, x, y, w, h)
        planes = int(page.samplesperpixel) if int(page.planarconfig) == 2 else 1
        per_plane = level.tile_count
        parts = []
        with self._file() as fd:
            for plane in range(planes):
                parts.append(
                    self._decode(fd, page, plane * per_plane + index, h, w, self._plain[resolution])
                )
        tile = parts[0] if planes == 1 else np.concatenate(parts, axis=2)
        return self._finish(tile)

    def stored_raw(self, resolution: int) -> bool:
        """See ``ImageSource.stored_raw``."""
        return 0 <= resolution < len(self._plain) and self._plain[resolution] is not None

    def stored_jpeg(self, resolution: int, index: int) -> bytes | None:
        """Return a full-size stored JPEG tile as one stream (see ``ImageSource.stored_jpeg``):
        the page's JPEGTables (without their EOI) spliced before the tile (without its SOI)."""
        page = self._page(resolution)
        tables = self._passable[resolution]
        if tables is None or self._palette is not None:
            return None
        level = self.info.levels[resolution]
        if not 0 <= index < level.tile_count:
            raise TileNotFound(f"Asked for non-existent tile: {index}")
        _, _, w, h = level.tile_box(index)
        if w != level.tile_width or h != level.tile_height:
            return None  # an edge tile is stored padded: decode and crop it
        offset = int(page.dataoffsets[index])
        count = int(page.databytecounts[index])
        if not count:
            return None
        with self._file() as fd:
            data = os.pread(fd, count, offset)
        if len(data) != count or data[:2] != _SOI or _jpeg_size(data) != (w, h):
            return None  # let the decoding path report the damage
        if tables:
            if tables[:2] != _SOI or tables[-2:] != _EOI:
                return None
            data = tables[:-2] + data[2:]
        if self._rgb_jpeg[resolution] and not _says_rgb(data):
            return None  # RGB components a browser would take for YCbCr
        return data

    def _decode(
        self,
        fd: int,
        page: tifffile.TiffPage,
        segment: int,
        h: int,
        w: int,
        plain: np.dtype | None = None,
    ) -> np.ndarray:
        offset = int(page.dataoffsets[segment])
        count = int(page.databytecounts[segment])
        samples = 1 if int(page.planarconfig) == 2 else int(page.samplesperpixel)
        try:
            data = os.pread(fd, count, offset) if count else None
            if count and len(data or b"") != count:
                raise ImageReadError("tile data is truncated")
            if data and int(page.compression) == _JPEG:
                _, seg_w, seg_h, _ = _segment_shape(page)
                size = _jpeg_size(data)
                if size is not None and (size[0] > seg_w or size[1] > seg_h):
                    raise ImageReadError("JPEG tile larger than the tile size")
            if (
                plain is not None
                and data
                and len(data)
                >= plain.itemsize
                * samples
                * (tile_size := int(page.tilelength) * int(page.tilewidth))
            ):  # raw samples: no codec, no copy
                array = np.frombuffer(data, plain, samples * tile_size)
                array = array.reshape(int(page.tilelength), int(page.tilewidth), samples)[:h, :w]
                return array if plain.isnative else array.astype(plain.newbyteorder("="))
            decoded, _, _ = page.decode(data, segment, jpegtables=page.jpegtables)
        except ImageReadError:
            raise
        except Exception as exc:  # any codec failure is a bad file, not a server fault
            raise ImageReadError(f"tile could not be decoded ({exc.__class__.__name__})") from exc
        if decoded is None:  # empty tile: zeros
            return np.zeros((h, w, samples), dtype=page.dtype)
        decoded = np.asarray(decoded)
        return decoded.reshape(decoded.shape[-3:])[:h, :w]

    def _finish(self, tile: np.ndarray) -> np.ndarray:
        if self._palette is not None:
            return self._palette[tile[..., 0]]
        if self.info.bits_per_sample == 1:
            return np.where(tile.astype(bool), np.uint8(255), np.uint8(0))
        return tile

    def read_region(self, resolution: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Return a rectangle of one level (see ``ImageSource.read_region``)."""
        page = self._page(resolution)
        level = self.info.levels[resolution]
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(level.width, x + width), min(level.height, y + height)
        if x1 <= x0 or y1 <= y0:
            return np.zeros((0, 0, self.info.channels), dtype=self.info.dtype)
        if page.is_tiled:
            return composite(
                level,
                lambda index: self.read_tile(resolution, index),
                (x0, y0, x1 - x0, y1 - y0),
                self.info.channels,
                self.info.dtype,
            )
        return self._finish(self._read_strips(page, x0, y0, x1, y1))

    def _read_strips(
        self, page: tifffile.TiffPage, x0: int, y0: int, x1: int, y1: int
    ) -> np.ndarray:
        """Rows ``y0:y1``, columns ``x0:x1`` of an untiled page, strip by strip."""
        count, width, rows, _ = _segment_shape(page)
        planes = int(page.samplesperpixel) if int(page.planarconfig) == 2 else 1
        per_plane = count // planes
        height = int(page.imagelength)
        bands = []
        with self._file() as fd:
            for strip in range(y0 // rows, (y1 - 1) // rows + 1):
                top = strip * rows
                h = min(rows, height - top)
                parts = [
                    self._decode(fd, page, plane * per_plane + strip, h, width)
                    for plane in range(planes)
                ]
                band = parts[0] if planes == 1 else np.concatenate(parts, axis=2)
                bands.append(band[max(0, y0 - top) : y1 - top, x0:x1])
        return bands[0] if len(bands) == 1 else np.concatenate(bands, axis=0)
