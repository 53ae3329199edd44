"""Image sources: choose a reader for a file through a registry of magic-byte detectors."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from iipserver.errors import ImageNotFound, ImageReadError, UnsupportedImage
from iipserver.sources.base import ImageSource, Level, SourceInfo
from iipserver.sources.fits import MAGIC as FITS_MAGIC
from iipserver.sources.fits import FitsSource
from iipserver.sources.paths import image_file
from iipserver.sources.pyramids import PyramidCache
from iipserver.sources.tiff import TiffSource
from iipserver.sources.zarr import ZarrSource, is_zarr

__all__ = ["SOURCES", "ImageSource", "Level", "SourceInfo", "detect", "open_source"]

#: Leading bytes → source factory. TIFF, BigTIFF (both byte orders) and the old "I I" variant.
SOURCES: dict[bytes, Callable[[str], ImageSource]] = {
    b"II*\x00": TiffSource,
    b"MM\x00*": TiffSource,
    b"II+\x00": TiffSource,
    b"MM\x00+": TiffSource,
    b"I I": TiffSource,
    FITS_MAGIC: FitsSource,
}


def detect(path: str) -> Callable[[str], ImageSource]:
    """Return the source factory for ``path`` (a file or a zarr directory).

    Raises:
        ImageReadError: the file is too short to identify.
        UnsupportedImage: no registered source reads this format.
    """
    if os.path.isdir(path):
        if is_zarr(path):
            return ZarrSource
        raise UnsupportedImage("Unsupported image type")
    try:  # non-blocking: a FIFO swapped in after the pool's check must not hang the worker
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ImageReadError("Unable to open file") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageReadError("Unable to open file")
        head = os.pread(fd, 10, 0)
    except OSError as exc:
        raise ImageReadError("Unable to open file") from exc
    finally:
        os.close(fd)
    if len(head) < 10:
        raise ImageReadError("Unable to read initial byte sequence from file")
    for magic, factory in SOURCES.items():
        if head.startswith(magic):
            return factory
    raise UnsupportedImage("Unsupported image type")


def open_source(path: str, pyramids: PyramidCache | None = None) -> ImageSource:
    """Open ``path`` with the source its format calls for; FITS sources keep their reduced
    levels in ``pyramids``. ``file.fits[SEL]`` selects an HDU of a FITS file.

    Raises:
        ImageNotFound: an HDU selector on a file that is not FITS.
    """
    file, selector = image_file(path)
    factory = detect(file)
    if factory is FitsSource:
        return FitsSource(path, pyramids)
    if selector is not None:
        raise ImageNotFound("HDU selection applies to FITS files only")
    return factory(path)
