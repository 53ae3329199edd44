"""Encoders: 8-bit arrays to JPEG, PNG or WebP bytes, returned with their media type."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import simplejpeg


class OutputFormat(enum.Enum):
    """An output image format, with its media type and file extension."""

    JPEG = ("image/jpeg", "jpg")
    PNG = ("image/png", "png")
    WEBP = ("image/webp", "webp")

    @property
    def media_type(self) -> str:
        """MIME type sent as Content-Type."""
        return self.value[0]

    @property
    def extension(self) -> str:
        """File extension used in Content-Disposition names."""
        return self.value[1]


@dataclass(frozen=True)
class Encoded:
    """Encoded image bytes and the media type they are."""

    data: bytes
    media_type: str


def encode_jpeg(
    array: np.ndarray, quality: int, subsampling: str = "420", fastdct: bool = True
) -> Encoded:
    """JPEG with libjpeg-turbo, grey for one channel.

    The defaults are iipsrv's (4:2:0 chroma, fast DCT); VisiOmatic 3's dialect uses 4:4:4 and
    the accurate DCT.
    """
    array = np.ascontiguousarray(array)
    quality = min(100, max(1, int(quality)))
    if array.shape[2] == 1:
        data = simplejpeg.encode_jpeg(array, quality=quality, colorspace="GRAY", fastdct=fastdct)
    else:
        data = simplejpeg.encode_jpeg(
            array, quality=quality, colorspace="RGB", colorsubsampling=subsampling, fastdct=fastdct
        )
    return Encoded(data, OutputFormat.JPEG.media_type)


def encode_png(array: np.ndarray, level: int) -> Encoded:
    """Lossless PNG; ``level`` is the zlib compression level 0–9."""
    import imagecodecs

    if array.shape[2] == 1:
        array = array[:, :, 0]
    data = imagecodecs.png_encode(np.ascontiguousarray(array), level=min(9, max(0, int(level))))
    return Encoded(bytes(data), OutputFormat.PNG.media_type)


def encode_webp(array: np.ndarray, quality: int) -> Encoded:
    """WebP; quality -1 means lossless."""
    import imagecodecs

    array = np.ascontiguousarray(array)
    if array.shape[2] == 1:
        array = np.ascontiguousarray(np.repeat(array, 3, axis=2))
    if quality < 0:
        data = imagecodecs.webp_encode(array, lossless=True)
    else:
        data = imagecodecs.webp_encode(array, level=min(100, int(quality)), lossless=False)
    return Encoded(bytes(data), OutputFormat.WEBP.media_type)


def encode(array: np.ndarray, fmt: OutputFormat, quality: int) -> Encoded:
    """Encode an ``(h, w, 1|3)`` uint8 array in ``fmt`` at ``quality`` (format-specific scale)."""
    if fmt is OutputFormat.PNG:
        return encode_png(array, quality)
    if fmt is OutputFormat.WEBP:
        return encode_webp(array, quality)
    return encode_jpeg(array, quality)
