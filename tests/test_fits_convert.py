"""``iipserver convert``: FITS → tiled pyramidal BigTIFF, checked against the FITS it came from.

* Structure (read back with tifffile): BigTIFF, one IFD per level, full resolution first and
  reduced levels (NewSubfileType 1) halving with floor until a level fits one tile; 256² float32
  tiles, MinIsBlack, contiguous channels; SMin/SMaxSampleValue (DOUBLE, one per channel) = the
  FITS source's ``default_cuts``; ImageDescription = the FITS header (80-column cards, no END).
  Pixels exactly: full resolution = the FITS image with TIFF row 0 = the top (highest FITS y),
  reduced levels = ``pyramid.reduce`` of it; for every compression (none, deflate, zstd with the
  floating-point predictor). Inputs: float32 with NaNs, int16 with BSCALE/BZERO/BLANK, a 3-plane
  cube, an extension chosen by ``[SCI]`` / ``[2]`` (with INHERIT), a tile-compressed ``.fits.fz``.
* The command (``python -m iipserver convert``): status 0 and one summary line on stderr; a
  progress bar only on a terminal; errors in one line, status 1, no traceback, nothing left
  behind (no OUT, no hidden temporary directory). The progress callback; OUT replaced
  atomically, an existing OUT untouched by a failed conversion.
* Memory: converting an 8192² float32 FITS (256 MB) in a child process keeps its peak RSS
  (VmHWM, read by the child itself) bounded, and no higher than for half the image.
* Same pixels: iipserver serving the FITS file and its conversion answers tiles, OBJ and
  VisiOmatic 3 INFO identically.
* iipsrv 1.1 serving the conversions agrees with iipserver serving the FITS file (``reference``).

FITS files are written here (astropy headers, seeded numpy data); images are a few hundred
pixels, with odd sizes so that floor halving and edge tiles are exercised.
"""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
from astropy.io import fits
from conftest import ImageSet, _reference_process
from fits_images import pyramid_sizes
from images import star_field
from reference import ServerProcess, decode
from wsgi_client import call

from iipserver.app import IIPApp
from iipserver.convert import convert
from iipserver.settings import Settings
from iipserver.sources import pyramid
from iipserver.sources.fits import FitsData, default_cuts

REPO = Path(__file__).resolve().parent.parent
TILE = 256
COMPRESSIONS = ("none", "deflate", "zstd")
#: TIFF Compression tag per ``--compression`` (8: Adobe deflate, 50000: zstd).
COMPRESSION_TAGS = {"none": 1, "deflate": 8, "zstd": 50000}
TEMP_PREFIX = ".iipserver-convert-"
SUMMARY = re.compile(
    r"(?P<out>.+): (?P<w>\d+)×(?P<h>\d+)×(?P<c>\d+) float32, (?P<levels>\d+) levels, "
    r"(?P<mb>\d+\.\d) MB in (?P<s>\d+\.\d\d) s \((?P<rate>\d+\.\d) Mpixel/s\)"
)

# ----------------------------------------------------------------------------------------
# FITS files written for the tests


def _fits_bytes(header: fits.Header, data: np.ndarray) -> bytes:
    """A header and big-endian data, each padded to whole 2880-byte blocks."""
    raw = data.tobytes()
    return header.tostring().encode("ascii") + raw + b"\0" * (-len(raw) % 2880)


def _header(bitpix: int, shape: tuple[int, ...], cards: dict[str, object]) -> fits.Header:
    """A primary header for data of ``shape`` (FITS order: planes, rows, columns)."""
    header = fits.Header()
    header["SIMPLE"] = True
    header["BITPIX"] = bitpix
    header["NAXIS"] = len(shape)
    for axis, n in enumerate(reversed(shape), start=1):
        header[f"NAXIS{axis}"] = n
    for key, value in cards.items():
        header[key] = value
    return header


def _to_fits_order(image: np.ndarray) -> np.ndarray:
    """Image orientation ``(h, w[, c])``, row 0 at the top → FITS ``([c,] y, x)``, y up."""
    flipped = image[::-1]
    return np.ascontiguousarray(np.moveaxis(flipped, 2, 0) if flipped.ndim == 3 else flipped)


def _header_text(header: fits.Header) -> str:
    return header.tostring(sep="", endcard=False, padding=False)


@dataclass
class Case:
    """One FITS input: what to convert, and what the conversion must hold."""

    name: str
    source: str  # file name in the FITS directory, with an HDU selector if any
    image: np.ndarray  # expected float32 pixels (h, w, c), row 0 at the top
    header: str  # expected ImageDescription

    @property
    def selector(self) -> str | None:
        """The HDU selector of ``source`` (``SCI`` for ``mef.fits[SCI]``), if any."""
        return self.source.partition("[")[2].rstrip("]") or None

    @property
    def channels(self) -> int:
        return self.image.shape[2]


def _float_nan(root: Path) -> Case:
    """901×701 float32 star field with NaNs: a block, a lone pixel, whole 2×2 blocks."""
    image = star_field(901, 701, seed=101)
    image[40:47, 50:61] = np.nan  # partial and whole 2×2 blocks at every level
    image[300, 301] = np.nan
    image[600:604, 800:804] = np.nan
    header = _header(-32, (701, 901), {"OBJECT": "NANFIELD", "EXPTIME": 30.0})
    header.add_comment("written by tests/test_fits_convert.py")
    (root / "float.fits").write_bytes(_fits_bytes(header, _to_fits_order(image).astype(">f4")))
    return Case("float", "float.fits", image[:, :, None], _header_text(header))


#: int16 scaling: physical = BZERO + BSCALE × stored, BLANK → NaN (BSCALE not a power of 2).
BSCALE, BZERO, BLANK = 0.17, 100.0, -32768


def _int16_scaled(root: Path) -> Case:
    """613×389 int16 with BSCALE/BZERO and BLANK pixels."""
    sky = star_field(613, 389, seed=102).astype(np.float64)
    stored = np.clip(np.round((sky - BZERO) / BSCALE), -32767, 32767).astype(np.int16)
    stored[10:15, 20:33] = BLANK
    stored[200, 100] = BLANK
    physical = stored.astype(np.float64) * BSCALE + BZERO
    physical[stored == BLANK] = np.nan
    header = _header(
        16, stored.shape, {"BSCALE": BSCALE, "BZERO": BZERO, "BLANK": BLANK, "BUNIT": "ADU"}
    )
    (root / "int16.fits").write_bytes(_fits_bytes(header, _to_fits_order(stored).astype(">i2")))
    return Case(
        "int16", "int16.fits", physical.astype(np.float32)[:, :, None], _header_text(header)
    )


def _cube(root: Path) -> Case:
    """A 520×300×3 float32 cube (NAXIS3 = 3 → three channels)."""
    image = star_field(520, 300, seed=103, channels=3)
    image[100:103, 200:205, 1] = np.nan
    data = _to_fits_order(image)
    header = _header(-32, data.shape, {"OBJECT": "CUBE", "CHAN0001": "g"})
    (root / "cube.fits").write_bytes(_fits_bytes(header, data.astype(">f4")))
    return Case("cube", "cube.fits", image, _header_text(header))


def _extensions(root: Path) -> tuple[Case, Case]:
    """Primary HDU without data, then SCI (INHERIT = T) and ERR image extensions."""
    sci = star_field(400, 300, seed=104)
    err = np.sqrt(np.abs(sci)).astype(np.float32)
    primary = fits.PrimaryHDU()
    primary.header["OBSERVER"] = "Test Observer"
    sci_hdu = fits.ImageHDU(_to_fits_order(sci), name="SCI")
    sci_hdu.header["INHERIT"] = True
    err_hdu = fits.ImageHDU(_to_fits_order(err), name="ERR")
    fits.HDUList([primary, sci_hdu, err_hdu]).writeto(root / "mef.fits")
    with fits.open(root / "mef.fits") as hdul:
        inherited = hdul[0].header.cards["OBSERVER"].image
        sci_text = _header_text(hdul[1].header) + inherited
        err_text = _header_text(hdul[2].header)
    return (
        Case("sci", "mef.fits[SCI]", sci[:, :, None], sci_text),
        Case("err", "mef.fits[2]", err[:, :, None], err_text),
    )


def _compressed(root: Path) -> Case:
    """A RICE tile-compressed 700×500 float32 image (.fits.fz); the expected pixels are
    astropy's decompression of it (float data is quantised)."""
    sky = star_field(700, 500, seed=105)
    sky[100:110, 50:60] = np.nan
    hdu = fits.CompImageHDU(_to_fits_order(sky), compression_type="RICE_1", dither_seed=7)
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(root / "tiles.fits.fz")
    with fits.open(root / "tiles.fits.fz") as hdul:
        stored = np.asarray(hdul[1].data, dtype=np.float32)
        text = _header_text(hdul[1].header)
    return Case("fz", "tiles.fits.fz", stored[::-1][:, :, None].copy(), text)


@dataclass
class FitsSet:
    """The FITS directory, its cases, and conversions made on demand (memoised)."""

    root: Path
    cases: dict[str, Case]

    def __post_init__(self) -> None:
        self._done: dict[tuple[str, str], Path] = {}

    def tif(self, name: str, compression: str = "none") -> Path:
        """``<name>-<compression>.tif`` converted from case ``name`` (once)."""
        key = (name, compression)
        if key not in self._done:
            out = self.root / f"{name}-{compression}.tif"
            convert(str(self.root / self.cases[name].source), str(out), compression)
            self._done[key] = out
        return self._done[key]


@pytest.fixture(scope="module")
def fitsset(tmp_path_factory: pytest.TempPathFactory) -> FitsSet:
    root = tmp_path_factory.mktemp("fits-convert")
    cases = [_float_nan(root), _int16_scaled(root), _cube(root), *_extensions(root)]
    cases.append(_compressed(root))
    return FitsSet(root, {case.name: case for case in cases})


CASES = ("float", "int16", "cube", "sci", "err", "fz")

# ----------------------------------------------------------------------------------------
# Helpers


def _description(page: tifffile.TiffPage) -> str:
    """ImageDescription as stored (tifffile's ``description`` strips trailing blanks)."""
    tag = page.tags["ImageDescription"]
    fh = page.parent.filehandle
    fh.seek(tag.valueoffset)
    return fh.read(tag.count).rstrip(b"\0").decode("ascii")


def _channels_last(array: np.ndarray) -> np.ndarray:
    return array[:, :, None] if array.ndim == 2 else array


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iipserver", "convert", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
    )


# ----------------------------------------------------------------------------------------
# 1. Structure and pixels of the output


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("name", CASES)
def test_output_structure_and_pixels(fitsset: FitsSet, name: str, compression: str) -> None:
    case = fitsset.cases[name]
    out = fitsset.tif(name, compression)
    height, width, channels = case.image.shape
    expected_sizes = pyramid_sizes(width, height)
    data = FitsData(str(fitsset.root / case.source.partition("[")[0]), case.selector)
    try:
        mins, maxs = default_cuts(data)
    finally:
        data.release()
    with tifffile.TiffFile(out) as tif:
        assert tif.is_bigtiff
        pages = list(tif.pages)
        assert [(p.imagewidth, p.imagelength) for p in pages] == expected_sizes
        for k, page in enumerate(pages):
            assert (page.tilewidth, page.tilelength) == (TILE, TILE), k
            assert page.dtype == np.float32 and page.samplesperpixel == channels, k
            assert page.photometric == tifffile.PHOTOMETRIC.MINISBLACK, k
            assert page.planarconfig == tifffile.PLANARCONFIG.CONTIG, k
            assert page.compression == COMPRESSION_TAGS[compression], k
            assert page.predictor == (1 if compression == "none" else 3), k
            assert page.subfiletype == (0 if k == 0 else 1), k
        first = pages[0]
        for code, values in ((340, mins), (341, maxs)):
            tag = first.tags[code]
            assert (tag.dtype, tag.count) == (12, channels)  # DOUBLE, one per channel
            assert tuple(np.atleast_1d(tag.value).tolist()) == values
        assert all(lo < hi for lo, hi in zip(mins, maxs, strict=True))
        assert _description(first) == case.header
        full = _channels_last(first.asarray())
        assert np.array_equal(full, case.image, equal_nan=True), "full resolution"
        for k, page in enumerate(pages[1:], start=1):
            level = _channels_last(page.asarray())
            oracle = pyramid.reduce(case.image, k)
            assert level.shape == oracle.shape, k
            assert np.array_equal(level, oracle, equal_nan=True), f"level {k}"


def test_reduced_level_is_the_mean_of_finite_values(fitsset: FitsSet) -> None:
    """Level 1 of the NaN image against a direct NaN-aware 2×2 mean (the oracle of the
    structure test, ``pyramid.reduce``, checked independently)."""
    case = fitsset.cases["float"]
    with tifffile.TiffFile(fitsset.tif("float")) as tif:
        level1 = tif.pages[1].asarray()
    h, w = case.image.shape[0] // 2, case.image.shape[1] // 2
    blocks = case.image[: 2 * h, : 2 * w, 0].astype(np.float64).reshape(h, 2, w, 2)
    finite = np.isfinite(blocks)
    counts = finite.sum(axis=(1, 3))
    sums = np.where(finite, blocks, 0.0).sum(axis=(1, 3))
    expected = np.full((h, w), np.nan)
    np.divide(sums, counts, out=expected, where=counts > 0)
    assert np.isnan(expected).any() and (counts == 2).any()  # the test image covers both
    np.testing.assert_array_equal(np.isnan(level1), np.isnan(expected))
    np.testing.assert_allclose(level1, expected, rtol=1e-6, equal_nan=True)


def test_report_describes_the_output(fitsset: FitsSet, tmp_path: Path) -> None:
    case = fitsset.cases["cube"]
    out = tmp_path / "cube.tif"
    report = convert(str(fitsset.root / case.source), str(out), "deflate")
    height, width, channels = case.image.shape
    assert (report.width, report.height, report.channels) == (width, height, channels)
    assert report.levels == len(pyramid_sizes(width, height))
    assert report.output_bytes == out.stat().st_size
    assert report.seconds > 0
    assert report.mpixels_per_second == pytest.approx(
        width * height * channels / 1e6 / report.seconds
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cube.tif"]


def test_unknown_compression_is_refused(fitsset: FitsSet, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="compression"):
        convert(str(fitsset.root / "float.fits"), str(tmp_path / "x.tif"), "lzw")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------
# 2. Progress, atomic output, the command line


@pytest.mark.parametrize("name", ["float", "sci"])
def test_progress_is_monotonic_and_ends_at_total(fitsset: FitsSet, tmp_path: Path, name: str):
    calls: list[tuple[int, int]] = []
    convert(
        str(fitsset.root / fitsset.cases[name].source),
        str(tmp_path / "out.tif"),
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls, "progress was never called"
    totals = {total for _, total in calls}
    assert len(totals) == 1 and totals.pop() > 0
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[0] >= 0
    assert calls[-1][0] == calls[-1][1], f"progress ended at {calls[-1]}"


def test_progress_reaches_total_for_a_single_level(tmp_path: Path) -> None:
    """One 200×100 level (no reduced level at all)."""
    header = _header(-32, (100, 200), {})
    data = np.arange(20000, dtype=">f4").reshape(100, 200)
    (tmp_path / "small.fits").write_bytes(_fits_bytes(header, data))
    calls: list[tuple[int, int]] = []
    report = convert(
        str(tmp_path / "small.fits"),
        str(tmp_path / "small.tif"),
        progress=lambda *a: calls.append(a),
    )
    assert report.levels == 1
    assert calls and calls[-1][0] == calls[-1][1], calls
    assert np.array_equal(tifffile.imread(tmp_path / "small.tif"), data[::-1].astype(np.float32))


def test_output_appears_only_when_complete(fitsset: FitsSet, tmp_path: Path) -> None:
    out = tmp_path / "out.tif"
    out.write_bytes(b"previous contents")
    seen: list[tuple[bytes, list[str]]] = []

    def progress(done: int, total: int) -> None:
        seen.append((out.read_bytes(), _leftovers(tmp_path)))

    convert(str(fitsset.root / fitsset.cases["int16"].source), str(out), progress=progress)
    assert seen
    assert all(old == b"previous contents" for old, _ in seen), "OUT changed before the end"
    assert all(len(work) == 1 for _, work in seen), "no hidden work directory beside OUT"
    assert _leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tif"]
    with tifffile.TiffFile(out) as tif:
        assert tif.is_bigtiff and len(tif.pages) == 3


def test_failed_conversion_leaves_nothing_and_keeps_old_output(fitsset: FitsSet, tmp_path: Path):
    out = tmp_path / "out.tif"
    out.write_bytes(b"previous contents")

    def progress(done: int, total: int) -> None:
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        convert(str(fitsset.root / fitsset.cases["float"].source), str(out), progress=progress)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tif"]
    assert out.read_bytes() == b"previous contents"


def _check_summary(line: str, out: Path, case: Case) -> None:
    m = SUMMARY.fullmatch(line)
    assert m, f"summary line {line!r}"
    height, width, channels = case.image.shape
    assert m["out"] == str(out)
    assert (int(m["w"]), int(m["h"]), int(m["c"])) == (width, height, channels)
    assert int(m["levels"]) == len(pyramid_sizes(width, height))
    assert float(m["mb"]) == pytest.approx(out.stat().st_size / 1e6, abs=0.051)
    assert float(m["rate"]) >= 0


@pytest.mark.parametrize("name", ["float", "sci"])
def test_cli_converts_with_one_summary_line(fitsset: FitsSet, tmp_path: Path, name: str):
    case = fitsset.cases[name]
    out = tmp_path / "out.tif"
    done = _cli(str(fitsset.root / case.source), str(out), "--compression", "zstd", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "\r" not in done.stderr, "a progress bar on a non-terminal"
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    _check_summary(lines[0], out, case)
    with tifffile.TiffFile(out) as tif:
        assert tif.pages[0].compression == COMPRESSION_TAGS["zstd"]
        assert np.array_equal(_channels_last(tif.pages[0].asarray()), case.image, equal_nan=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tif"]


def _run_on_terminal(args: list[str], cwd: Path) -> tuple[int, str]:
    """Run ``iipserver convert`` with stderr on a pseudo-terminal; (status, what it showed)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "iipserver", "convert", *args],
            cwd=cwd,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=slave,
        )
    finally:
        os.close(slave)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
    return proc.wait(timeout=120), b"".join(chunks).decode("utf-8")


@pytest.mark.parametrize("quiet", [False, True], ids=["bar", "quiet"])
def test_cli_progress_bar_on_a_terminal(fitsset: FitsSet, tmp_path: Path, quiet: bool) -> None:
    case = fitsset.cases["float"]
    out = tmp_path / "out.tif"
    args = [str(fitsset.root / case.source), str(out)] + (["--quiet"] if quiet else [])
    status, shown = _run_on_terminal(args, tmp_path)
    assert status == 0, shown
    text = shown.replace("\r\n", "\n")  # the terminal's newline translation
    bars = re.findall(r"\r\[([#-]{30})\] +(\d+)%", text)
    if quiet:
        assert bars == [], shown
    else:
        assert bars, f"no progress bar drawn: {shown!r}"
        assert bars[-1] == ("#" * 30, "100"), bars[-1]
    lines = [line for line in text.split("\n") if line and not line.startswith("\r")]
    assert len(lines) == 1, shown
    _check_summary(lines[0], out, case)


def _missing(d: Path) -> str:
    return str(d / "missing.fits")


def _text(d: Path) -> str:
    (d / "text.fits").write_text("not a FITS file\n")
    return str(d / "text.fits")


def _tiff(d: Path) -> str:
    tifffile.imwrite(d / "image.fits", np.zeros((8, 8), np.uint8))
    return str(d / "image.fits")


def _table_only(d: Path) -> str:
    table = fits.BinTableHDU.from_columns([fits.Column("a", "J", array=np.arange(3))])
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(d / "table.fits")
    return str(d / "table.fits")


def _no_such_extension(d: Path) -> str:
    (d / "one.fits").write_bytes(_fits_bytes(_header(-32, (4, 4), {}), np.zeros((4, 4), ">f4")))
    return str(d / "one.fits") + "[SCI]"


def _truncated(d: Path) -> str:
    """A header for 400×400 pixels followed by one 2880-byte block of data."""
    header = _header(-32, (400, 400), {})
    (d / "short.fits").write_bytes(_fits_bytes(header, np.zeros((4, 4), ">f4")))
    return str(d / "short.fits")


ERROR_INPUTS: dict[str, Callable[[Path], str]] = {
    "missing": _missing,
    "not-fits": _text,
    "tiff": _tiff,
    "table-only": _table_only,
    "no-such-extension": _no_such_extension,
    "truncated": _truncated,
}


@pytest.mark.parametrize("kind", list(ERROR_INPUTS))
def test_cli_error_is_one_line_and_leaves_nothing(tmp_path: Path, kind: str) -> None:
    source = ERROR_INPUTS[kind](tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out.tif"
    done = _cli(source, str(out), cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"iipserver: cannot convert {source}: "), lines
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_unwritable_output_is_a_conversion_error(fitsset: FitsSet, tmp_path: Path) -> None:
    """OUT in a directory that does not exist: the same one-line conversion error."""
    source = str(fitsset.root / fitsset.cases["sci"].source)
    done = _cli(source, str(tmp_path / "nowhere" / "out.tif"), cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"iipserver: cannot convert {source}: "), lines
    assert TEMP_PREFIX not in done.stderr, "the message shows the converter's temporary path"
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_unknown_compression(fitsset: FitsSet, tmp_path: Path) -> None:
    done = _cli(
        str(fitsset.root / "float.fits"),
        str(tmp_path / "o.tif"),
        "--compression",
        "lzw",
        cwd=tmp_path,
    )
    assert done.returncode == 2 and "invalid choice" in done.stderr
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------
# 3. Bounded memory

_MEMORY_CHILD = r"""
import sys

def vm_hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM")

import numpy, tifffile, astropy.io.fits  # everything a conversion imports, before the baseline
import iipserver.display
from iipserver import convert

base = vm_hwm()
convert.convert(sys.argv[1], sys.argv[2])
print(base, vm_hwm())
"""


def _big_fits(path: Path, width: int, height: int) -> int:
    """A float32 ``width × height`` FITS written in row bands (the test itself stays light)."""
    rng = np.random.default_rng(99)
    with open(path, "wb") as f:
        f.write(_header(-32, (height, width), {}).tostring().encode("ascii"))
        for _ in range(0, height, 512):
            f.write(rng.normal(100.0, 5.0, size=(512, width)).astype(">f4").tobytes())
        f.write(b"\0" * (-f.tell() % 2880))
    return width * height * 4


def _peak_above_baseline(source: Path, out: Path) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, str(source), str(out)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    base, peak = (int(v) for v in done.stdout.split())
    return peak - base


def test_memory_is_bounded_by_bands_not_by_the_image(tmp_path: Path) -> None:
    """Peak RSS (VmHWM) of the converting process above what its imports take (~55 MiB):
    measured 155 MiB for 4096×8192 (128 MiB of pixels) and 156 MiB for 8192² (256 MiB), i.e.
    about five 32 MiB bands (BAND_BYTES) whatever the image. Holding the 8192² image, or
    mapping it whole, would add at least 256 MiB, and twice as much as for half of it."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc/self/status (VmHWM)")
    mib = 1 << 20
    half, full = tmp_path / "half.fits", tmp_path / "full.fits"
    try:
        _big_fits(half, 4096, 8192)
        grown_half = _peak_above_baseline(half, tmp_path / "half.tif")
        for path in (half, tmp_path / "half.tif"):
            path.unlink()
        image_bytes = _big_fits(full, 8192, 8192)
        grown_full = _peak_above_baseline(full, tmp_path / "full.tif")
        with tifffile.TiffFile(tmp_path / "full.tif") as tif:
            assert [p.imagewidth for p in tif.pages] == [8192, 4096, 2048, 1024, 512, 256]
        assert _leftovers(tmp_path) == []
    finally:
        for path in tmp_path.iterdir():  # pytest keeps the last runs' directories
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    assert grown_full < 200 * mib < image_bytes, f"{grown_full / mib:.0f} MiB above baseline"
    assert grown_full - grown_half < 48 * mib, (
        f"peak grew from {grown_half / mib:.0f} MiB to {grown_full / mib:.0f} MiB with the image"
    )


# ----------------------------------------------------------------------------------------
# 4. The FITS file and its conversion, served by iipserver


@pytest.fixture(scope="module")
def app(fitsset: FitsSet, tmp_path_factory: pytest.TempPathFactory) -> IIPApp:
    cache = tmp_path_factory.mktemp("pyramid-cache")
    return IIPApp(
        Settings.from_environ(
            {"FILESYSTEM_PREFIX": f"{fitsset.root}/", "PYRAMID_CACHE_DIR": str(cache)}
        )
    )


def _tiles(case: Case) -> Iterator[tuple[int, int]]:
    """(resolution, tile index) of every tile, IIP numbering (0 = smallest level)."""
    height, width = case.image.shape[:2]
    sizes = pyramid_sizes(width, height)
    for r, (w, h) in enumerate(reversed(sizes)):
        for i in range(-(-w // TILE) * -(-h // TILE)):
            yield r, i


OBJ = "OBJ=Max-size&OBJ=Resolution-number&OBJ=Tile-size&OBJ=Min-Max-sample-values"
OBJ_MORE = OBJ + "&OBJ=Bits-per-channel&OBJ=colorspace&OBJ=subject"
#: Views compared tile by tile: default cuts; MINMAX + gamma (+ a colour map); for cubes, a
#: channel matrix.
VIEWS = {"plain": "", "minmax-gam-jet": "&MINMAX=1:90,500&GAM=0.5&CMP=jet"}
DIFF_VIEWS = {"plain": "", "minmax-gam": "&MINMAX=1:90,500&GAM=0.5"}


@pytest.mark.parametrize("name", CASES)
def test_fits_and_conversion_serve_the_same(fitsset: FitsSet, app: IIPApp, name: str) -> None:
    case = fitsset.cases[name]
    tif = fitsset.tif(name).name
    a, b = call(app, f"FIF={case.source}&{OBJ_MORE}"), call(app, f"FIF={tif}&{OBJ_MORE}")
    assert (a.status, b.status) == (200, 200)
    assert a.body == b.body
    height, width = case.image.shape[:2]
    assert f"Max-size:{width} {height}\r\n".encode() in a.body
    views = dict(VIEWS)
    if case.channels == 3:
        views["ctw"] = "&CTW=0,0,1;0,1,0;1,0,0"
    count = 0
    for view, extra in views.items():
        for r, i in _tiles(case):
            a = call(app, f"FIF={case.source}{extra}&JTL={r},{i}")
            b = call(app, f"FIF={tif}{extra}&JTL={r},{i}")
            assert (a.status, b.status) == (200, 200), (view, r, i, a.body[:200], b.body[:200])
            assert a.body.startswith(b"\xff\xd8")
            assert a.body == b.body, f"{view}: tile {r},{i} differs"
            count += 1
    assert count == len(views) * len(list(_tiles(case)))


@pytest.mark.parametrize("name", ["float", "cube", "sci"])
def test_visiomatic_info_is_the_same(fitsset: FitsSet, app: IIPApp, name: str) -> None:
    case = fitsset.cases[name]
    tif = fitsset.tif(name).name
    a = call(app, f"FIF={case.source}&INFO", path="/api")
    b = call(app, f"FIF={tif}&INFO", path="/api")
    assert (a.status, b.status) == (200, 200), (a.body[:300], b.body[:300])
    ia, ib = json.loads(a.body), json.loads(b.body)
    height, width, channels = case.image.shape
    assert ia["full_size"] == [width, height]
    assert ia["tile_levels"] == len(pyramid_sizes(width, height))
    assert ia["channels"] == channels
    assert (ia.pop("image_name"), ib.pop("image_name")) == (case.source, tif)
    assert ia == ib


# ----------------------------------------------------------------------------------------
# 5. iipsrv 1.1 serving the conversions


#: Decoded JPEG tiles, iipsrv 1.1 on the converted TIFF vs iipserver on the FITS file. Both
#: normalise with the same SMin/SMax and the same float32 pixels; measured: identical
#: (max 0) on every tile here, plain and with MINMAX+GAM. The float → 8-bit step may still
#: round one level apart (float vs double), which JPEG spreads over an 8×8 block, more on
#: star peaks: the limits are those of test_differential (max 8, mean < 1.0); a wrong
#: orientation, level, range or channel order moves the mean by tens of levels.
TOL_MAX, TOL_MEAN = 8, 1.0


@pytest.fixture(scope="module")
def iipsrv(fitsset: FitsSet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """iipsrv 1.1 with FILESYSTEM_PREFIX = the FITS directory (where the conversions are)."""
    server = _reference_process(ImageSet(fitsset.root, {}), tmp_path_factory.mktemp("iipsrv-fits"))
    server.start()
    yield server
    server.stop()


def _numbers(body: bytes, name: str) -> list[float]:
    m = re.search(rb"\r\n" + name.encode() + rb"[:/][^\r\n]*", body)
    assert m, f"{name} missing from {body!r}"
    return [float(v) for v in m.group(0).split(b":", 1)[1].split()]


def _subject(body: bytes) -> bytes:
    """The text of an ``OBJ=subject`` reply (``subject/<length>:<text>``)."""
    m = re.search(rb"\r\nsubject/(\d+):", body)
    assert m, body[:300]
    return body[m.end() : m.end() + int(m.group(1))]


@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("name", CASES)
def test_iipsrv_on_the_conversion_agrees_with_iipserver_on_the_fits(
    fitsset: FitsSet, app: IIPApp, iipsrv: ServerProcess, name: str, compression: str
) -> None:
    case = fitsset.cases[name]
    tif = fitsset.tif(name, compression).name
    ours = call(app, f"FIF={case.source}&{OBJ}&OBJ=subject")
    ref = iipsrv.get(f"FIF={tif}&{OBJ}&OBJ=subject")
    assert (ref.status, ours.status) == (200, 200), ref.body[:300]
    for obj in ("Max-size", "Resolution-number", "Tile-size"):
        assert _numbers(ref.body, obj) == _numbers(ours.body, obj), obj
    assert _numbers(ref.body, "Min-Max-sample-values") == pytest.approx(
        _numbers(ours.body, "Min-Max-sample-values"), rel=1e-6
    )
    assert _subject(ref.body) == _subject(ours.body) == case.header.encode()
    problems = []
    for view, extra in DIFF_VIEWS.items():
        for r, i in _tiles(case):
            theirs = iipsrv.get(f"FIF={tif}{extra}&JTL={r},{i}")
            mine = call(app, f"FIF={case.source}{extra}&JTL={r},{i}")
            assert (theirs.status, mine.status) == (200, 200), (view, r, i, theirs.body[:200])
            x, y = decode(theirs.body), decode(mine.body)
            assert x.shape == y.shape, (view, r, i)
            diff = np.abs(x.astype(np.int16) - y.astype(np.int16))
            if diff.max() > TOL_MAX or diff.mean() >= TOL_MEAN:
                problems.append(f"{view} {r},{i}: max {diff.max()}, mean {diff.mean():.3f}")
    assert not problems, problems
