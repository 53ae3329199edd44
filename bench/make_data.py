"""Seeded benchmark images: tiled pyramidal BigTIFFs in iipsrv 1.1's layout, cached on disk.

    python bench/make_data.py OUTDIR [--size 8192] [--force]

Writes three files into OUTDIR, each a BigTIFF with 256×256 tiles and one IFD per level (full
resolution first, then 2×2-mean halvings until a level fits in one tile, as tests/images.py's
``pyramid_levels`` makes them):

- ``sky.tif``: size×size float32 star field, background 100 ± 5 (gaussian noise), a few thousand
  stars (power-law peak brightness, varied widths) and some elliptical galaxies;
  SMin/SMaxSampleValue tags and a FITS header with a TAN WCS (CD matrix) in ImageDescription,
  as STIFF writes them for the VisiOmatic v2 client;
- ``rgb.tif``: size×size 8-bit RGB with the statistics of a photograph (1/f luminance with
  edges, smoother chroma, lighting gradient, grain), JPEG tiles at quality 90, photometric
  YCbCr with 2×2 chroma subsampling (what tifffile writes for JPEG RGB);
- ``cube.tif``: (size/2)×(3·size/8) 3-band float32 cube (contiguous samples, photometric
  minisblack with two unspecified extra samples) with per-band SMin/SMax and a FITS header
  naming the channels g, r, i. It is deliberately not square.

Debian's iipsrv 1.1 serves all three (checked over FastCGI: OBJ, JTL at every level with
MINMAX/GAM/CTW/CMP, CVT, IIIF info.json and tiles; see bench/README.md).

A ``manifest.json`` next to the files records the generator version, the size and what was
written; when it matches, the files are not generated again. ``tile_urls`` draws seeded random
tile URLs over every level of a file, from its real level sizes.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and bench/http.py would shadow the
# standard library's `http` package: drop the folder before importing anything else.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Any  # noqa: E402

REPO = _HERE.parent
sys.path.insert(0, str(REPO / "tests"))

import numpy as np  # noqa: E402
import tifffile  # noqa: E402
from images import pyramid_levels, smin_smax_tags, write_pyramid  # noqa: E402

#: Bump when the generated content changes: cached files with another version are rewritten.
GENERATOR_VERSION = 1
MANIFEST = "manifest.json"
TILE = 256
ENDPOINT = "/fcgi-bin/iipsrv.fcgi"
#: Stars per pixel: 5000 on an 8192×8192 image.
STAR_DENSITY = 5000 / 8192**2
JPEG_QUALITY = 90
#: World coordinates of the image centre and the pixel scale (0.2 arcsec) of the FITS headers.
CRVAL = (150.1191666667, 2.2058333333)
PIXEL_SCALE = 0.2 / 3600


@dataclass(frozen=True)
class DataFile:
    """One written pyramid: file name, full size, sample layout and every level's size."""

    name: str
    width: int
    height: int
    channels: int
    dtype: str
    #: (width, height) of each level, largest first (the order of the IFDs in the file).
    level_sizes: tuple[tuple[int, int], ...]
    tile: int = TILE

    @property
    def levels(self) -> int:
        """Number of resolutions (IIP ``Resolution-number``)."""
        return len(self.level_sizes)

    def size(self, resolution: int) -> tuple[int, int]:
        """(width, height) at IIP ``resolution`` (0 = smallest)."""
        return self.level_sizes[self.levels - 1 - resolution]

    def grid(self, resolution: int) -> tuple[int, int]:
        """Tiles across and down at IIP ``resolution``."""
        w, h = self.size(resolution)
        return -(-w // self.tile), -(-h // self.tile)

    @classmethod
    def from_json(cls, doc: dict) -> DataFile:
        """Inverse of ``dataclasses.asdict`` after a JSON round trip."""
        sizes = tuple((int(w), int(h)) for w, h in doc["level_sizes"])
        return cls(
            doc["name"], doc["width"], doc["height"], doc["channels"], doc["dtype"], sizes,
            doc.get("tile", TILE),
        )  # fmt: skip


def describe(path: Path) -> DataFile:
    """Read a pyramid's facts back from the TIFF: one top-level IFD per level, largest first."""
    with tifffile.TiffFile(path) as tif:
        pages = [p for p in tif.pages if isinstance(p, tifffile.TiffPage)]
        first = pages[0]
        sizes = tuple((int(p.imagewidth), int(p.imagelength)) for p in pages)
        return DataFile(
            path.name, sizes[0][0], sizes[0][1], int(first.samplesperpixel),
            str(first.dtype), sizes, int(first.tilewidth),
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Content


def _stamps(
    image: np.ndarray,
    rng: np.random.Generator,
    count: int,
    radius: int,
    profile: Callable[[np.ndarray, np.ndarray, int], np.ndarray],
    colours: np.ndarray,
) -> None:
    """Add ``count`` (2r+1)² stamps in one vectorised ``np.add.at`` (image is (h, w, c)).

    ``profile(dx, dy, n)`` returns (n, 2r+1, 2r+1) values from the offsets to each source's
    centre; ``colours`` (n, c) scales them per channel.
    """
    h, w, channels = image.shape
    if count == 0 or w <= 2 * radius + 1 or h <= 2 * radius + 1:
        return
    cx = rng.integers(radius, w - radius - 1, size=count)
    cy = rng.integers(radius, h - radius - 1, size=count)
    off = np.arange(-radius, radius + 1)
    dx = off[None, None, :] - rng.uniform(-0.5, 0.5, size=count)[:, None, None]
    dy = off[None, :, None] - rng.uniform(-0.5, 0.5, size=count)[:, None, None]
    values = profile(dx, dy, count).astype(np.float32)
    rows = np.broadcast_to(cy[:, None, None] + off[None, :, None], values.shape).ravel()
    cols = np.broadcast_to(cx[:, None, None] + off[None, None, :], values.shape).ravel()
    flat = values.ravel()
    for c in range(channels):
        scale = np.repeat(colours[:, c].astype(np.float32), values[0].size)
        np.add.at(image[..., c], (rows, cols), flat * scale)


def star_field(
    width: int,
    height: int,
    *,
    seed: int,
    background: tuple[float, ...] = (100.0,),
    noise: tuple[float, ...] = (5.0,),
) -> np.ndarray:
    """Float32 sky: gaussian noise per channel plus stars and galaxies, (h, w) or (h, w, c).

    Stars have power-law peak values (Pareto, index 1.3, from 4σ up to 6·10⁴) and gaussian
    profiles with widths from 0.7 to 3 pixels in 15×15 stamps; a tenth as many galaxies are
    elliptical exponential profiles in 31×31 stamps. Each source has its own colour across
    channels.
    """
    channels = len(background)
    rng = np.random.default_rng(seed)
    sky = rng.standard_normal(size=(height, width, channels), dtype=np.float32)
    sky *= np.asarray(noise, dtype=np.float32)
    sky += np.asarray(background, dtype=np.float32)
    stars = max(20, round(STAR_DENSITY * width * height))

    def colour(n: int) -> np.ndarray:
        if channels == 1:
            return np.ones((n, 1))
        tint = rng.uniform(-0.8, 0.8, size=(n, 1)) * np.linspace(-1, 1, channels)[None, :]
        return np.exp(tint)

    peak = np.minimum(20.0 * rng.pareto(1.3, size=stars) + 20.0, 6e4)
    sigma = np.clip(rng.lognormal(np.log(1.3), 0.3, size=stars), 0.7, 3.0)

    def star(dx: np.ndarray, dy: np.ndarray, n: int) -> np.ndarray:
        s2 = (2 * sigma**2)[:, None, None]
        return peak[:, None, None] * np.exp(-(dx**2 + dy**2) / s2)

    _stamps(sky, rng, stars, 7, star, colour(stars))

    galaxies = stars // 10
    g_peak = 15.0 * rng.pareto(1.5, size=galaxies) + 10.0
    g_scale = rng.uniform(1.0, 4.0, size=galaxies)
    g_ratio = rng.uniform(0.3, 1.0, size=galaxies)
    g_angle = rng.uniform(0, np.pi, size=galaxies)

    def galaxy(dx: np.ndarray, dy: np.ndarray, n: int) -> np.ndarray:
        cos, sin = np.cos(g_angle)[:, None, None], np.sin(g_angle)[:, None, None]
        u = (dx * cos + dy * sin) / g_scale[:, None, None]
        v = (dy * cos - dx * sin) / (g_scale * g_ratio)[:, None, None]
        return g_peak[:, None, None] * np.exp(-np.sqrt(u**2 + v**2))

    _stamps(sky, rng, galaxies, 15, galaxy, colour(galaxies))
    return sky[..., 0] if channels == 1 else sky


def _spectral_field(
    rng: np.random.Generator, height: int, width: int, slope: float, pair: bool = False
) -> list[np.ndarray]:
    """Unit-variance float32 noise whose amplitude spectrum falls as 1/f**slope.

    One real inverse FFT, or with ``pair`` one complex inverse FFT whose real and imaginary
    parts are two independent fields.
    """
    fy = np.fft.fftfreq(height).astype(np.float32)[:, None]
    if pair:
        fx = np.fft.fftfreq(width).astype(np.float32)[None, :]
    else:
        fx = np.fft.rfftfreq(width).astype(np.float32)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    amp = f ** np.float32(-slope)
    amp[0, 0] = 0.0
    del f
    spec = rng.standard_normal(size=amp.shape, dtype=np.float32) * amp
    spec = spec + 1j * rng.standard_normal(size=amp.shape, dtype=np.float32) * amp
    del amp
    if pair:
        full = np.fft.ifft2(spec.astype(np.complex64))
        fields = [full.real, full.imag]
    else:
        fields = [np.fft.irfft2(spec.astype(np.complex64), s=(height, width))]
    out = []
    for field in fields:
        field = field.astype(np.float32)
        field /= field.std()
        out.append(field)
    return out


def photo_image(width: int, height: int, *, seed: int) -> np.ndarray:
    """8-bit RGB that JPEG-compresses like a photograph: 1/f structure, edges, colour, grain.

    About 3 bits per pixel (25 KB per 256×256 tile) at JPEG quality 90.
    """
    rng = np.random.default_rng(seed)
    structure, texture = _spectral_field(rng, height, width, 1.2, pair=True)
    # tanh turns the 1/f field into regions with edges, over a residual fine texture.
    lum = 0.5 + 0.25 * np.tanh(2.0 * structure) + 0.05 * texture
    del structure, texture
    x = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
    y = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    lum *= 1.0 - 0.25 * (x**2 + y**2) + 0.1 * x  # vignetting and a light gradient
    lum += rng.standard_normal(size=lum.shape, dtype=np.float32) * np.float32(2.0 / 255)
    cb, cr = _spectral_field(rng, height, width, 1.8, pair=True)
    cb *= 0.06
    cr *= 0.06
    cr += 0.04 * y  # warmer at the bottom, cooler at the top
    rgb = np.empty((height, width, 3), dtype=np.uint8)
    for c, (wb, wr) in enumerate(((0.0, 1.4), (-0.34, -0.71), (1.77, 0.0))):
        chan = lum + wb * cb + wr * cr
        chan *= 255
        np.clip(chan, 0, 255, out=chan)
        rgb[..., c] = chan
    return rgb


# --------------------------------------------------------------------------------------------
# FITS header (80-column cards, no '%': iipsrv 1.1 passes ImageDescription through printf)


def _card(key: str, value: bool | int | float | str, comment: str = "") -> str:
    if isinstance(value, bool):
        text = f"{'T' if value else 'F':>20}"
    elif isinstance(value, int):
        text = f"{value:>20d}"
    elif isinstance(value, float):
        text = f"{value:>20.12G}"
        if "." not in text and "E" not in text:
            text = f"{value:>19.12G}."
    else:
        text = f"{chr(39) + value.ljust(8) + chr(39):<20}"
    card = f"{key:<8}= {text}" + (f" / {comment}" if comment else "")
    return card[:80].ljust(80)


def fits_header(width: int, height: int, labels: tuple[str, ...] = ()) -> str:
    """A STIFF-like FITS header (TAN projection, CD matrix) padded to 2880-byte blocks."""
    cards = [
        _card("SIMPLE", True, "conforms to FITS standard"),
        _card("BITPIX", -32, "array data type"),
        _card("NAXIS", 3 if labels else 2, "number of array dimensions"),
        _card("NAXIS1", width),
        _card("NAXIS2", height),
    ]
    if labels:
        cards.append(_card("NAXIS3", len(labels)))
    cards += [
        _card("EQUINOX", 2000.0, "Mean equinox"),
        _card("RADESYS", "ICRS", "Astrometric system"),
        _card("CTYPE1", "RA---TAN", "WCS projection type for this axis"),
        _card("CTYPE2", "DEC--TAN", "WCS projection type for this axis"),
        _card("CUNIT1", "deg", "Axis unit"),
        _card("CUNIT2", "deg", "Axis unit"),
        _card("CRVAL1", CRVAL[0], "World coordinate on this axis"),
        _card("CRVAL2", CRVAL[1], "World coordinate on this axis"),
        _card("CRPIX1", width / 2 + 0.5, "Reference pixel on this axis"),
        _card("CRPIX2", height / 2 + 0.5, "Reference pixel on this axis"),
        _card("CD1_1", -PIXEL_SCALE, "Linear projection matrix"),
        _card("CD1_2", 0.0, "Linear projection matrix"),
        _card("CD2_1", 0.0, "Linear projection matrix"),
        _card("CD2_2", PIXEL_SCALE, "Linear projection matrix"),
    ]
    cards += [_card(f"CHAN{i + 1:04d}", label, "Channel label") for i, label in enumerate(labels)]
    cards += [
        _card("OBJECT", "BENCHFIELD", "Object name"),
        _card("EXPTIME", 300.0, "Exposure time [s]"),
        "COMMENT Synthetic field written by iipserver's bench/make_data.py".ljust(80),
    ]
    text = "".join(cards) + "END".ljust(80)
    return text.ljust(-(-len(text) // 2880) * 2880)


# --------------------------------------------------------------------------------------------
# Writing and caching


def _cuts(image: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel display cuts for SMin/SMax: 0.1 and 99.95 percentiles of a 1/16 sample."""
    sample = image[::4, ::4].reshape(-1, 1 if image.ndim == 2 else image.shape[2])
    lo = np.percentile(sample, 0.1, axis=0)
    hi = np.percentile(sample, 99.95, axis=0)
    return [round(float(v), 3) for v in lo], [round(float(v), 3) for v in hi]


def _write(path: Path, levels: list[np.ndarray], **kwargs: Any) -> DataFile:
    """Write through a temporary name, so that a crash never leaves a plausible file."""
    tmp = path.with_name(path.name + ".part")
    write_pyramid(tmp, levels, bigtiff=True, **kwargs)
    os.replace(tmp, path)
    return describe(path)


def _write_sky(path: Path, size: int) -> DataFile:
    sky = star_field(size, size, seed=7)
    lo, hi = _cuts(sky)
    return _write(
        path, pyramid_levels(sky, TILE), photometric="minisblack",
        extratags=smin_smax_tags(lo, hi), description=fits_header(size, size),
    )  # fmt: skip


def _write_rgb(path: Path, size: int) -> DataFile:
    rgb = photo_image(size, size, seed=11)
    return _write(
        path, pyramid_levels(rgb, TILE), photometric="rgb", compression="jpeg",
        compressionargs={"level": JPEG_QUALITY},
    )  # fmt: skip


def _write_cube(path: Path, size: int) -> DataFile:
    width, height = max(1, size // 2), max(1, 3 * size // 8)
    cube = star_field(
        width, height, seed=23, background=(80.0, 100.0, 140.0), noise=(4.0, 5.0, 7.0)
    )
    lo, hi = _cuts(cube)
    return _write(
        path, pyramid_levels(cube, TILE), photometric="minisblack", planarconfig="contig",
        extratags=smin_smax_tags(lo, hi), description=fits_header(width, height, ("g", "r", "i")),
    )  # fmt: skip


WRITERS: dict[str, Callable[[Path, int], DataFile]] = {
    "sky.tif": _write_sky,
    "rgb.tif": _write_rgb,
    "cube.tif": _write_cube,
}


def _cached(root: Path, size: int) -> dict[str, DataFile] | None:
    """The manifest's files if it matches ``size`` and every file is there, unchanged in size."""
    try:
        doc = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if doc.get("generator") != GENERATOR_VERSION or doc.get("size") != size:
        return None
    files = doc.get("files", {})
    if set(files) != set(WRITERS):
        return None
    for name, entry in files.items():
        try:
            if (root / name).stat().st_size != entry["bytes"]:
                return None
        except OSError:
            return None
    return {name: DataFile.from_json(entry["file"]) for name, entry in files.items()}


def make_data(
    root: Path, size: int = 8192, *, force: bool = False, verbose: bool = False
) -> dict[str, DataFile]:
    """Write sky.tif, rgb.tif and cube.tif into ``root`` unless the manifest says they are there.

    Args:
        root: output folder (created if missing).
        size: side of sky.tif and rgb.tif in pixels (cube.tif is size/2 × 3·size/8); any
            size from 64 up works, 256 or less gives single-level files.
        force: regenerate even when the cache matches.
        verbose: print per-file timings to stderr.

    Returns:
        The written (or cached) files by name.
    """
    if size < 64:
        raise ValueError(f"size must be at least 64, not {size}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if not force:
        cached = _cached(root, size)
        if cached is not None:
            if verbose:
                print(f"{root}: cached (size {size})", file=sys.stderr)
            return cached
    (root / MANIFEST).unlink(missing_ok=True)
    out: dict[str, DataFile] = {}
    entries = {}
    start = time.perf_counter()
    for name, writer in WRITERS.items():
        t0 = time.perf_counter()
        out[name] = writer(root / name, size)
        nbytes = (root / name).stat().st_size
        entries[name] = {"bytes": nbytes, "file": asdict(out[name])}
        if verbose:
            f = out[name]
            print(
                f"{name}: {f.width}×{f.height}×{f.channels} {f.dtype}, {f.levels} levels, "
                f"{nbytes / 1e6:.0f} MB in {time.perf_counter() - t0:.1f} s",
                file=sys.stderr,
            )
    doc = {"generator": GENERATOR_VERSION, "size": size, "files": entries}
    (root / MANIFEST).write_text(json.dumps(doc, indent=2) + "\n")
    if verbose:
        print(f"total {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return out


def tile_urls(
    endpoint: str, template: str, data_file: DataFile, count: int, seed: int
) -> list[str]:
    """``count`` seeded random tile URLs, uniform over every tile of every level.

    ``template`` is a query with ``{r}`` (IIP resolution, 0 = smallest) and ``{i}`` (tile
    index, row-major from the top left: x + tiles_across·y), e.g.
    ``"FIF=sky.tif&GAM=0.4545&JTL={r},{i}"``. Non-square levels are counted exactly.
    """
    counts = [math.prod(data_file.grid(r)) for r in range(data_file.levels)]
    starts = np.cumsum([0, *counts])
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, int(starts[-1]), size=count)
    levels = np.searchsorted(starts, picks, side="right") - 1
    return [
        f"{endpoint}?" + template.format(r=int(r), i=int(k - starts[r]))
        for r, k in zip(levels, picks, strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--size", type=int, default=8192, help="side of sky.tif and rgb.tif")
    parser.add_argument("--force", action="store_true", help="regenerate even if cached")
    args = parser.parse_args()
    make_data(args.outdir, args.size, force=args.force, verbose=True)


if __name__ == "__main__":
    main()
