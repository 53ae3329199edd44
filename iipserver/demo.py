"""Demo image set for ``iipserver serve``: seeded synthetic pyramids written with tifffile."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

logger = logging.getLogger(__name__)

#: Bump when the generated files change, so that cached copies are regenerated.
DEMO_VERSION = "2"
_MARKER = ".iipserver-demo"

TILE = 256
STARS = "stars-float32.tif"
RGB = "rgb-jpeg.tif"
CUBE = "cube-3band-float32.tif"
STARS_FITS = "stars-float32.fits"
FILES = (STARS, RGB, CUBE, STARS_FITS)


def cache_dir(environ: dict[str, str] | None = None) -> Path:
    """The demo set's home: ``$XDG_CACHE_HOME/iipserver/demo`` or ``~/.cache/iipserver/demo``."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "iipserver" / "demo"


# -- pixels ---------------------------------------------------------------------------------


def halve(level: np.ndarray) -> np.ndarray:
    """2×2 mean with floor halving (odd last row/column dropped), in the input dtype."""
    h, w = level.shape[0] // 2, level.shape[1] // 2
    a = level[: 2 * h, : 2 * w].astype(np.float32)
    mean = (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]) * 0.25
    if np.issubdtype(level.dtype, np.integer):
        return np.clip(np.rint(mean), 0, np.iinfo(level.dtype).max).astype(level.dtype)
    return mean.astype(level.dtype)


def pyramid(full: np.ndarray, tile: int = TILE) -> list[np.ndarray]:
    """The full level, then floor-halvings until a level fits in one tile."""
    levels = [full]
    while levels[-1].shape[0] > tile or levels[-1].shape[1] > tile:
        levels.append(halve(levels[-1]))
    return levels


def _add_stars(
    sky: np.ndarray, rng: np.random.Generator, count: int, colours: np.ndarray | None = None
) -> None:
    """Add gaussian point sources in place, each drawn in a small stamp (not the whole image)."""
    height, width = sky.shape[:2]
    # Power-law fluxes: many faint stars, a few bright ones.
    fluxes = 30.0 * (1.0 - rng.random(count)) ** (-1.0 / 1.3)
    fluxes = np.minimum(fluxes, 2.0e4)
    for i in range(count):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        sigma = rng.uniform(1.0, 2.2)
        r = int(np.ceil(4 * sigma + 2 * np.log10(fluxes[i])))
        x0, x1 = max(0, int(cx) - r), min(width, int(cx) + r + 1)
        y0, y1 = max(0, int(cy) - r), min(height, int(cy) + r + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        stamp = fluxes[i] * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
        if colours is None:
            sky[y0:y1, x0:x1] += stamp.astype(np.float32)
        else:
            sky[y0:y1, x0:x1, :] += (stamp[:, :, None] * colours[i]).astype(np.float32)


def star_field(width: int = 2048, height: int = 2048, seed: int = 2024) -> np.ndarray:
    """A float32 sky: gaussian noise around 100 plus ~1500 stars, shape (height, width)."""
    rng = np.random.default_rng(seed)
    sky = rng.normal(100.0, 4.0, size=(height, width)).astype(np.float32)
    _add_stars(sky, rng, count=width * height // 2800)
    return sky


def colour_image(width: int = 2048, height: int = 1536, seed: int = 7) -> np.ndarray:
    """An 8-bit RGB test picture: smooth colour fields, soft blobs and a coordinate grid."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    rgb = np.empty((height, width, 3), dtype=np.float32)
    rgb[..., 0] = 0.5 + 0.5 * np.sin(6.0 * x + 2.0 * y)
    rgb[..., 1] = 0.5 + 0.5 * np.sin(5.0 * y - 3.0 * x + 1.0)
    rgb[..., 2] = 0.5 + 0.5 * np.cos(4.0 * (x + y))
    rgb *= 150.0
    for _ in range(40):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(20, 160)
        colour = rng.uniform(0, 110, size=3).astype(np.float32)
        r = int(3 * radius)
        x0, x1 = max(0, int(cx) - r), min(width, int(cx) + r)
        y0, y1 = max(0, int(cy) - r), min(height, int(cy) + r)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * radius**2)).astype(np.float32)
        rgb[y0:y1, x0:x1] += blob[:, :, None] * colour
    rgb[::128, :, :] = 255.0  # grid every 128 pixels: tile seams are easy to check
    rgb[:, ::128, :] = 255.0
    return np.clip(rgb, 0, 255).astype(np.uint8)


def cube(width: int = 1024, height: int = 1024, seed: int = 99) -> np.ndarray:
    """A 3-band float32 cube (height, width, 3): shared stars with band-dependent colours."""
    rng = np.random.default_rng(seed)
    sky = rng.normal(50.0, 3.0, size=(height, width, 3)).astype(np.float32)
    count = width * height // 2500
    colours = rng.uniform(0.3, 1.5, size=(count, 3))
    _add_stars(sky, rng, count, colours)
    # A faint diffuse "nebula", strongest in the second band.
    yy, xx = np.ogrid[0:height, 0:width]
    u = (xx - 0.6 * width) / (0.2 * width)
    v = (yy - 0.4 * height) / (0.15 * height)
    nebula = np.exp(-(u**2 + v**2))
    sky += (nebula[:, :, None] * np.array([20.0, 60.0, 35.0])).astype(np.float32)
    return sky


# -- FITS-style header ----------------------------------------------------------------------


def _card(keyword: str, value: Any, comment: str = "") -> str:
    """One 80-character FITS card: fixed-format value, right-justified in columns 11–30."""
    if isinstance(value, bool):
        text = f"{'T' if value else 'F':>20}"
    elif isinstance(value, int):
        text = f"{value:>20d}"
    elif isinstance(value, float):
        text = f"{value:>20.12G}"
        if "." not in text and "E" not in text:
            text = f"{value:>20.1f}"
    else:
        quoted = "'" + f"{value:<8}" + "'"
        text = f"{quoted:<20}"
    card = f"{keyword:<8}= {text}"
    if comment:
        card += f" / {comment}"
    if len(card) > 80:
        raise ValueError(f"FITS card too long: {card!r}")
    return f"{card:<80}"


def fits_header(width: int, height: int, ra: float, dec: float, pixel_arcsec: float) -> str:
    """A minimal FITS header with a TAN WCS, as STIFF writes it: 80-column cards, no separator."""
    scale = pixel_arcsec / 3600.0
    cards = [
        _card("SIMPLE", True, "conforms to FITS standard"),
        _card("BITPIX", -32, "IEEE single precision floating point"),
        _card("NAXIS", 2, "number of data axes"),
        _card("NAXIS1", width, "length of data axis 1"),
        _card("NAXIS2", height, "length of data axis 2"),
        _card("CTYPE1", "RA---TAN", "WCS projection type for this axis"),
        _card("CTYPE2", "DEC--TAN", "WCS projection type for this axis"),
        _card("CRPIX1", (width + 1) / 2, "reference pixel on this axis"),
        _card("CRPIX2", (height + 1) / 2, "reference pixel on this axis"),
        _card("CRVAL1", ra, "world coordinate on this axis (deg)"),
        _card("CRVAL2", dec, "world coordinate on this axis (deg)"),
        _card("CD1_1", -scale, "linear projection matrix"),
        _card("CD1_2", 0.0, "linear projection matrix"),
        _card("CD2_1", 0.0, "linear projection matrix"),
        _card("CD2_2", scale, "linear projection matrix"),
        f"{'END':<80}",
    ]
    return "".join(cards)


# -- writing --------------------------------------------------------------------------------


def smin_smax_tags(mins: Sequence[float], maxs: Sequence[float]) -> list[tuple[Any, ...]]:
    """Extra tags SMinSampleValue (340) and SMaxSampleValue (341), DOUBLE, one per sample."""
    return [
        (340, "d", len(mins), tuple(float(v) for v in mins), True),
        (341, "d", len(maxs), tuple(float(v) for v in maxs), True),
    ]


def write_pyramid(
    path: Path,
    levels: Sequence[np.ndarray],
    *,
    extratags: Sequence[tuple[Any, ...]] = (),
    description: str | None = None,
    **options: Any,
) -> None:
    """Write ``levels`` (largest first) as tiled top-level IFDs, reduced ones with subfiletype 1."""
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate(levels):
            extra: dict[str, Any] = {"subfiletype": 1} if i else {"extratags": list(extratags)}
            if i == 0 and description is not None:
                extra["description"] = description
            tif.write(
                np.ascontiguousarray(level),
                tile=(TILE, TILE),
                metadata=None,
                software=False,
                **options,
                **extra,
            )


def display_range(data: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel display cuts as STIFF writes them into SMin/SMaxSampleValue: from just
    below the sky (median - 2 sigma) to well above it (median + 200 sigma), sigma from the MAD."""
    planes = data.reshape(-1, 1 if data.ndim == 2 else data.shape[2])
    mins, maxs = [], []
    for c in range(planes.shape[1]):
        values = planes[:, c]
        med = float(np.median(values))
        sigma = 1.4826 * float(np.median(np.abs(values - med))) or 1.0
        mins.append(max(float(values.min()), med - 2 * sigma))
        maxs.append(min(float(values.max()), med + 200 * sigma))
    return mins, maxs


def _write_stars(path: Path) -> None:
    sky = star_field()
    height, width = sky.shape
    header = fits_header(width, height, ra=150.1163, dec=2.2058, pixel_arcsec=0.25)
    write_pyramid(
        path,
        pyramid(sky),
        photometric="minisblack",
        extratags=smin_smax_tags(*display_range(sky)),
        description=header,
    )


def _write_stars_fits(path: Path) -> None:
    """The star field as a plain FITS file (served directly, no conversion): header blocks
    and big-endian data, each padded to 2880 bytes; FITS row 1 is the image's bottom row."""
    sky = star_field()
    height, width = sky.shape
    cards = fits_header(width, height, ra=150.1163, dec=2.2058, pixel_arcsec=0.25)
    header = cards.encode("ascii")
    data = np.ascontiguousarray(sky[::-1], dtype=">f4").tobytes()
    with open(path, "wb") as f:
        f.write(header + b" " * (-len(header) % 2880))
        f.write(data + b"\0" * (-len(data) % 2880))


def _write_rgb(path: Path) -> None:
    write_pyramid(path, pyramid(colour_image()), photometric="rgb", compression="jpeg")


def _write_cube(path: Path) -> None:
    data = cube()
    mins, maxs = display_range(data)
    write_pyramid(
        path,
        pyramid(data),
        photometric="minisblack",
        planarconfig="contig",
        extratags=smin_smax_tags(mins, maxs),
    )


def generate(directory: Path) -> Path:
    """Write the demo set into ``directory`` (created if needed); return it."""
    directory.mkdir(parents=True, exist_ok=True)
    _write_stars(directory / STARS)
    _write_rgb(directory / RGB)
    _write_cube(directory / CUBE)
    _write_stars_fits(directory / STARS_FITS)
    (directory / _MARKER).write_text(DEMO_VERSION + "\n", encoding="ascii")
    return directory


def is_complete(directory: Path) -> bool:
    """True if ``directory`` holds a demo set of the current version."""
    try:
        version = (directory / _MARKER).read_text(encoding="ascii").strip()
    except OSError:
        return False
    return version == DEMO_VERSION and all((directory / name).is_file() for name in FILES)


def ensure(directory: Path | None = None) -> Path:
    """Return the demo directory, generating it first if missing or out of date.

    Generation happens in a sibling temporary directory that is then renamed into place, so
    an interrupted run or two servers starting at once never leave a half-written set.
    """
    target = cache_dir() if directory is None else directory
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.warning("generating the demo images in %s", target)
    scratch = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        generate(scratch)
        if target.exists() and not is_complete(target):
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(scratch, target)
        except OSError:
            if not is_complete(target):  # not a concurrent generator winning the race
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
