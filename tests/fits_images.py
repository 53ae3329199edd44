"""Seeded FITS test files: arrays in served orientation, written the way FITS stores them.

Every array here is in *image orientation*, as the server serves it: ``(height, width)`` or
``(height, width, channels)``, row 0 the top of the image. FITS stores rows bottom first and
planes first, so ``to_fits`` flips the rows and moves the channels to the front, and
``from_fits`` undoes it.

- ``sky(width, height, seed, channels)``: a float32 star field (noise + stars), fast at any size.
- ``write_fits(path, image, header, extname=, compression=)``: one image HDU (primary,
  named extension or tile-compressed), no astropy warning on write.
- ``read_hdu(path, hdu)``: astropy's ``hdu.data`` (BSCALE/BZERO applied, BLANK → NaN) in image
  orientation as float32 ``(h, w, c)``: the oracle of what the server must serve.
- ``raw_fits(path, cards, data)``: a hand-made file (any cards, even invalid ones).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

#: Compression types ``write_fits`` accepts, all lossless: floats only with GZIP (written
#: without quantization), integers with any.
COMPRESSIONS = ("GZIP_1", "GZIP_2", "RICE_1")


def sky(width: int, height: int, seed: int = 0, channels: int = 1) -> np.ndarray:
    """A float32 sky: N(100, 5) noise plus point sources, ``(h, w)`` or ``(h, w, c)``.

    Each star is drawn in a small window, so a 1000² field takes milliseconds.
    """
    rng = np.random.default_rng(seed)
    out = rng.normal(100.0, 5.0, size=(height, width, channels))
    r = 8
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    for _ in range(max(4, width * height // 2000)):
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        flux, sigma = rng.uniform(50, 5000), rng.uniform(0.8, 2.5)
        star = flux * np.exp(-(xx**2 + yy**2) / (2 * sigma**2))
        y0, y1, x0, x1 = (
            max(0, cy - r),
            min(height, cy + r + 1),
            max(0, cx - r),
            min(width, cx + r + 1),
        )
        part = star[y0 - cy + r : y1 - cy + r, x0 - cx + r : x1 - cx + r]
        out[y0:y1, x0:x1] += part[:, :, None] * rng.uniform(0.5, 1.5, size=channels)
    out = out.astype(np.float32)
    return out[:, :, 0] if channels == 1 else out


def to_fits(image: np.ndarray) -> np.ndarray:
    """Image orientation ``(h, w)`` / ``(h, w, c)`` → FITS data order ``(h, w)`` /
    ``(c, h, w)``, FITS row 0 (the bottom) first."""
    flipped = np.asarray(image)[::-1]
    if flipped.ndim == 3:
        flipped = np.moveaxis(flipped, 2, 0)
    return np.ascontiguousarray(flipped)


def from_fits(data: np.ndarray) -> np.ndarray:
    """FITS data ``(h, w)``, ``(c, h, w)`` (or with leading length-1 axes) → float32
    ``(h, w, c)`` in image orientation."""
    data = np.asarray(data)
    while data.ndim > 3 and data.shape[0] == 1:
        data = data[0]
    planes = data[None] if data.ndim == 2 else data
    return np.ascontiguousarray(np.moveaxis(planes, 0, 2)[::-1], dtype=np.float32)


def write_fits(
    path: Path | str,
    image: np.ndarray,
    header: Mapping[str, Any] | Iterable[tuple[str, Any]] = (),
    *,
    extname: str | None = None,
    extver: int | None = None,
    compression: str | None = None,
) -> Path:
    """Write ``image`` (image orientation, any dtype) as one image HDU and return ``path``.

    Args:
        path: the file to write (overwritten).
        image: ``(h, w)`` or ``(h, w, c)`` pixels; ``c`` becomes NAXIS3. Integer arrays are
            stored as they are (uint16 gets BZERO = 32768 from astropy).
        header: cards added after the structural ones, in order: ``BSCALE``/``BZERO``/``BLANK``
            given here describe the stored integers (they are not applied on write).
        extname: write an empty primary HDU and the image in an extension of this name.
        extver: EXTVER of that extension.
        compression: a ``COMPRESSIONS`` type: an empty primary HDU and a lossless
            tile-compressed image extension (``extname`` names it).
    """
    data = to_fits(image)
    cards = list(header.items()) if isinstance(header, Mapping) else list(header)
    if compression is not None:
        assert compression in COMPRESSIONS, compression
        kind = data.dtype.kind
        hdu: Any = fits.CompImageHDU(
            data,
            name=extname,
            compression_type=compression,
            quantize_level=0.0 if kind == "f" else 16.0,
        )
    elif extname is not None:
        hdu = fits.ImageHDU(data, name=extname)
    else:
        hdu = fits.PrimaryHDU(data)
    for key, value in cards:
        hdu.header[key] = value
    if extver is not None:
        hdu.header["EXTVER"] = extver
    hdus = [hdu] if isinstance(hdu, fits.PrimaryHDU) else [fits.PrimaryHDU(), hdu]
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return Path(path)


def read_hdu(path: Path | str, hdu: int | str | tuple[str, int] | None = None) -> np.ndarray:
    """astropy's pixels of one HDU as the server must serve them: float32 ``(h, w, c)``, row 0
    the top. ``hdu``: index, EXTNAME, (EXTNAME, EXTVER), or None for the first HDU with 2-D or
    3-D data."""
    with fits.open(path) as hdul:
        if hdu is None:
            hdu = next(i for i, h in enumerate(hdul) if h.header.get("NAXIS", 0) >= 2)
        return from_fits(hdul[hdu].data)


def raw_fits(path: Path | str, cards: Iterable[tuple[str, Any]], data: bytes = b"") -> Path:
    """Write a FITS file by hand: ``cards`` (key, value) + END, padded to 2880 bytes, then
    ``data`` padded with zeros to 2880 bytes (``data=b""``: header only). Nothing is checked,
    so any header a hostile client could upload can be made."""
    text = "".join(fits.Card(key, value).image for key, value in cards) + "END".ljust(80)
    text = text.ljust(-(-len(text) // 2880) * 2880)
    padding = b"\0" * (-len(data) % 2880)
    Path(path).write_bytes(text.encode("ascii") + data + padding)
    return Path(path)


def pyramid_sizes(width: int, height: int, tile: int = 256) -> list[tuple[int, int]]:
    """Expected pyramid sizes, full resolution first: floor halvings until a level fits one
    tile (written here, not taken from the package, so tests check its ``level_sizes``)."""
    sizes = [(width, height)]
    while width > tile or height > tile:
        width, height = width // 2, height // 2
        sizes.append((width, height))
    return sizes
