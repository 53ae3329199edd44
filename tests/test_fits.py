"""FITS served directly: HDU kinds and selection, pixels at every level, protocol answers,
hostile files, and the on-disk cache of reduced levels.

The oracle for pixels is astropy (``hdu.data``, in image orientation: row 0 is the FITS top
row) and ``pyramid.reduce`` for the reduced levels; protocol answers are compared with a TIFF
"twin" holding the same float32 levels and cuts, which must give the same bytes.
"""

from __future__ import annotations

import glob
import json
import os
import re
import threading
import time
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import zarr
from astropy.io import fits
from fits_images import raw_fits, read_hdu, sky, to_fits, write_fits
from images import smin_smax_tags, write_pyramid
from wsgi_client import call

from iipserver.app import IIPApp
from iipserver.settings import Settings
from iipserver.sources import fits as fits_source
from iipserver.sources import open_source
from iipserver.sources.fits import FitsData, FitsSource, default_cuts
from iipserver.sources.paths import split_selector
from iipserver.sources.pyramid import PyramidStream, level_sizes, reduce
from iipserver.sources.pyramids import PyramidCache

TILE = 256
#: A 1100×900 image has 4 levels: 1100×900, 550×450, 275×225, 137×112.
BIG = (1100, 900)
#: Astropy's warnings about malformed files (VerifyWarning is one): production logs them and
#: goes on, so the hostile-file tests see what production does.
ASTROPY_WARNINGS = "ignore::astropy.utils.exceptions.AstropyUserWarning"


# ---- helpers ---------------------------------------------------------------------------------


def make_app(root: Path, cache: Path | None = None, **env: str) -> IIPApp:
    settings = {"FILESYSTEM_PREFIX": f"{root}/", **env}
    if cache is not None:
        settings["PYRAMID_CACHE_DIR"] = str(cache)
    return IIPApp(Settings.from_environ(settings))


def cuts_of(path: Path | str, selector: str | None = None) -> tuple[tuple[float, ...], ...]:
    data = FitsData(str(path), selector)
    try:
        return default_cuts(data)
    finally:
        data.release()


def expected_levels(image: np.ndarray) -> list[np.ndarray]:
    """Reduced levels of a (h, w, c) image, IIP order (smallest first)."""
    sizes = level_sizes(image.shape[1], image.shape[0], TILE)
    return [reduce(image, k) for k in reversed(range(len(sizes)))]


def check_source(source, image: np.ndarray) -> None:
    """Every tile of every level of ``source`` equals ``reduce`` of the (h, w, c) oracle."""
    levels = expected_levels(image)
    assert len(source.info.levels) == len(levels)
    for r, expected in enumerate(levels):
        level = source.info.levels[r]
        assert (level.width, level.height) == (expected.shape[1], expected.shape[0])
        for index in range(level.tile_count):
            x, y, w, h = level.tile_box(index)
            tile = source.read_tile(r, index)
            assert tile.dtype == np.float32
            assert tile.shape == (h, w, image.shape[2])
            np.testing.assert_array_equal(
                tile, expected[y : y + h, x : x + w], err_msg=f"level {r} tile {index}"
            )


def tiff_twin(fits_path: Path, tiff_path: Path, hdu=None) -> Path:
    """A float32 TIFF pyramid with the pixels the FITS must serve at every level and its
    default cuts as SMin/SMaxSampleValue: the IIP pipeline must answer both alike."""
    image = read_hdu(fits_path, hdu)
    levels = expected_levels(image)[::-1]
    channels = image.shape[2]
    if channels == 1:
        levels = [level[:, :, 0] for level in levels]
    lo, hi = cuts_of(fits_path, None if hdu is None else str(hdu))
    return write_pyramid(
        tiff_path,
        levels,
        extratags=smin_smax_tags(lo, hi),
        photometric="minisblack",
        planarconfig="contig" if channels > 1 else None,
    )


def tile_queries(source) -> list[str]:
    return [
        f"JTL={r},{i}"
        for r, level in enumerate(source.info.levels)
        for i in range(level.tile_count)
    ]


def entries(cache: Path) -> list[str]:
    """Entry directories of a pyramid cache."""
    if not cache.exists():
        return []
    return sorted(p.name for p in cache.iterdir() if p.is_dir())


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def join_builds(timeout: float = 20.0) -> None:
    """Wait for every background pyramid build of this process to end."""
    for thread in threading.enumerate():
        if thread.name == "pyramid-build":
            thread.join(timeout)
            assert not thread.is_alive(), "background build still running"


def wait_built(cache: Path, count: int = 1) -> None:
    """Wait until ``count`` entries of ``cache`` have their levels (a background build)."""
    wait_for(lambda: len(glob.glob(f"{cache}/*/meta.json")) >= count)


def build(cache: PyramidCache, path: Path | str) -> str:
    """Build the levels of image ``path`` (``file.fits[SEL]`` allowed) into ``cache``
    synchronously, as a worker would; return the entry directory."""
    file, selector = split_selector(str(path))
    data = FitsData(file, selector)
    try:
        sizes = level_sizes(data.width, data.height, TILE)
        entry = cache.entry(str(path), os.stat(file), sizes, data.channels)
        assert entry is not None
        assert entry.build(data, sizes)
        return entry.path
    finally:
        data.release()


def banner(app: IIPApp) -> bytes:
    reply = call(app, "")
    assert reply.status == 400
    return reply.body


# ---- the files -------------------------------------------------------------------------------


def _int16_raw(h: int, w: int, seed: int) -> np.ndarray:
    raw = np.random.default_rng(seed).integers(-30000, 30000, size=(h, w)).astype(np.int16)
    raw[5, 7] = raw[100, 3] = raw[h - 1, w - 1] = -32768  # BLANK
    return raw


def _write_mef(path: Path, images: list[tuple[str, int | None, np.ndarray]]) -> None:
    hdus = [fits.PrimaryHDU()]
    for name, ver, image in images:
        hdus.append(fits.ImageHDU(to_fits(image), name=name, ver=ver))
    fits.HDUList(hdus).writeto(path)


#: name → (identifier, oracle (file, hdu) for read_hdu, channels)
KINDS = {
    "float32": ("f32.fits", ("f32.fits", None), 1),
    "float64": ("f64.fits", ("f64.fits", None), 1),
    "int16-bscale-bzero-blank": ("i16.fits", ("i16.fits", None), 1),
    "uint16-bzero": ("u16.fits", ("u16.fits", None), 1),
    "uint8": ("u8.fits", ("u8.fits", None), 1),
    "int32": ("i32.fits", ("i32.fits", None), 1),
    "int64": ("i64.fits", ("i64.fits", None), 1),
    "mef-default": ("mef.fits", ("mef.fits", 1), 1),
    "mef-extname": ("mef.fits[SCI]", ("mef.fits", 1), 1),
    "mef-index": ("mef.fits[2]", ("mef.fits", 2), 1),
    "mef-extname-extver": ("mef.fits[SCI,2]", ("mef.fits", 2), 1),
    "mef-lowercase-spaces": ("mef.fits[ sci , 2 ]", ("mef.fits", 2), 1),
    "mef-extver-default-1": ("mef.fits[WHT,1]", ("mef.fits", 3), 1),
    "mef-primary-by-name": ("prim.fits[PRIMARY]", ("prim.fits", 0), 1),
    "cube": ("cube.fits", ("cube.fits", None), 3),
    "naxis4-degenerate": ("n4.fits", ("n4.fits", None), 2),
    "gzip2-float": ("gz.fits.fz", ("gz.fits.fz", 1), 1),
    "gzip2-float-by-name": ("gz.fits.fz[SCI]", ("gz.fits.fz", 1), 1),
    "rice-int16-bscale-blank": ("rice.fits.fz", ("rice.fits.fz", 1), 1),
    "gzip2-cube": ("gzcube.fits.fz", ("gzcube.fits.fz", 1), 3),
    "gzip2-naxis4-degenerate": ("gzn4.fits.fz", ("gzn4.fits.fz", 1), 1),
}


@pytest.fixture(scope="module")
def kinds_dir(tmp_path_factory) -> Path:
    """Every HDU kind served, small (a few hundred pixels, 2 or 3 levels, odd sizes)."""
    root = tmp_path_factory.mktemp("fits-kinds")
    img = sky(521, 267, seed=1)
    img[10:14, 20:30] = np.nan
    write_fits(root / "f32.fits", img, {"OBJECT": "M31"})
    write_fits(root / "f64.fits", sky(300, 201, seed=2).astype(np.float64) * 1.000001)
    write_fits(
        root / "i16.fits",
        _int16_raw(201, 300, 3),
        [("BSCALE", 0.25), ("BZERO", 1000.5), ("BLANK", -32768)],
    )
    u16 = np.random.default_rng(4).integers(0, 65536, size=(200, 300)).astype(np.uint16)
    write_fits(root / "u16.fits", u16)
    write_fits(root / "u8.fits", (np.arange(300 * 200).reshape(200, 300) % 251).astype(np.uint8))
    ints = np.random.default_rng(5).integers(-(2**24), 2**24, (200, 300))
    write_fits(root / "i32.fits", ints.astype(np.int32))
    write_fits(root / "i64.fits", ints[::-1].astype(np.int64))
    _write_mef(
        root / "mef.fits",
        [
            ("SCI", 1, sky(300, 200, 6)),
            ("SCI", 2, sky(300, 200, 7)),
            ("WHT", None, sky(300, 200, 8)),
        ],
    )
    fits.HDUList(
        [fits.PrimaryHDU(to_fits(sky(300, 200, 9))), fits.ImageHDU(to_fits(sky(300, 200, 10)))]
    ).writeto(root / "prim.fits")
    write_fits(root / "cube.fits", sky(300, 270, seed=11, channels=3))
    fits.PrimaryHDU(to_fits(sky(290, 200, seed=12, channels=2))[None]).writeto(root / "n4.fits")
    gz = sky(300, 263, seed=13)
    gz[50:60, 40:44] = np.nan
    write_fits(root / "gz.fits.fz", gz, compression="GZIP_2", extname="SCI")
    write_fits(
        root / "rice.fits.fz",
        _int16_raw(260, 300, 14),
        [("BSCALE", 0.5), ("BZERO", -20.0), ("BLANK", -32768)],
        compression="RICE_1",
    )
    write_fits(root / "gzcube.fits.fz", sky(300, 200, seed=15, channels=3), compression="GZIP_2")
    fits.HDUList(
        [
            fits.PrimaryHDU(),
            fits.CompImageHDU(
                to_fits(sky(300, 200, seed=16))[None, None],
                compression_type="GZIP_2",
                quantize_level=0.0,
            ),
        ]
    ).writeto(root / "gzn4.fits.fz")
    write_pyramid(root / "plain.tif", [np.zeros((20, 30), np.uint8)])  # not FITS
    return root


# ---- HDU kinds: pixels at every level --------------------------------------------------------


@pytest.mark.parametrize("cached", [False, True], ids=["computed", "cached"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_hdu_kind_serves_astropys_pixels_at_every_level(kinds_dir, tmp_path, kind, cached):
    identifier, (file, hdu), channels = KINDS[kind]
    image = read_hdu(kinds_dir / file, hdu)
    assert image.shape[2] == channels
    path = f"{kinds_dir}/{identifier}"
    cache = None
    if cached:  # levels built first: reduced tiles come from the cache's files
        cache = PyramidCache(str(tmp_path), 1 << 30)
        build(cache, path)
    source = open_source(path, cache)
    try:
        assert source.stored_raw(0) is cached
        info = source.info
        assert (info.dtype, info.bits_per_sample, info.sample_format) == ("float32", 32, "float")
        assert (info.width, info.height, info.channels) == (
            image.shape[1],
            image.shape[0],
            channels,
        )
        assert {(lv.tile_width, lv.tile_height) for lv in info.levels} == {(TILE, TILE)}
        check_source(source, image)
    finally:
        source.close()


def test_oracles_are_what_was_written(kinds_dir):
    """The helpers' oracle is astropy's scaling: check it against the raw numbers once."""
    raw = _int16_raw(201, 300, 3)
    expected = np.where(raw == -32768, np.nan, raw * 0.25 + 1000.5).astype(np.float32)
    np.testing.assert_array_equal(read_hdu(kinds_dir / "i16.fits")[:, :, 0], expected)
    with fits.open(kinds_dir / "i16.fits", do_not_scale_image_data=True) as hdul:
        np.testing.assert_array_equal(hdul[0].data, raw[::-1])  # stored bottom row first
    u16 = read_hdu(kinds_dir / "u16.fits")
    assert u16.max() > 32768  # BZERO = 32768 really used
    assert fits.getheader(kinds_dir / "u16.fits")["BZERO"] == 32768


def test_uncompressed_data_is_read_in_place_and_compressed_is_not(kinds_dir):
    for name, raw in [("f32.fits", True), ("i16.fits", True), ("gz.fits.fz", False)]:
        source = open_source(f"{kinds_dir}/{name}")
        try:
            full = len(source.info.levels) - 1
            assert source.stored_raw(full) is raw
            assert source.stored_raw(0) is False  # no cache: reduced levels are computed
            assert source.stored_jpeg(full, 0) is None
        finally:
            source.close()


def test_region_rows_and_columns_agree_with_astropy(kinds_dir):
    """Whole-row reads (pread) and partial-row reads (memory map) give the same pixels."""
    image = read_hdu(kinds_dir / "cube.fits")
    data = FitsData(str(kinds_dir / "cube.fits"))
    try:
        for x, y, w, h in [(0, 0, 300, 270), (0, 17, 300, 5), (13, 17, 200, 101), (299, 269, 1, 1)]:
            np.testing.assert_array_equal(data.region(x, y, w, h), image[y : y + h, x : x + w])
        assert data.region(-5, -5, 10, 10).shape == (5, 5, 3)  # clipped to the image
        assert data.region(400, 0, 10, 10).shape == (0, 0, 3)
    finally:
        data.release()


def test_inherit_appends_the_primary_cards_to_the_extension_header(tmp_path):
    primary = fits.PrimaryHDU()
    primary.header["OBSERVER"] = "Hubble"
    inheriting = fits.ImageHDU(to_fits(sky(40, 30, 1)), name="SCI")
    inheriting.header["INHERIT"] = True
    plain = fits.ImageHDU(to_fits(sky(40, 30, 2)), name="ERR")
    fits.HDUList([primary, inheriting, plain]).writeto(tmp_path / "inh.fits")
    app = make_app(tmp_path, PYRAMID_CACHE_MB="0")
    sci = call(app, "FIF=inh.fits[SCI]&OBJ=subject").body.decode()
    err = call(app, "FIF=inh.fits[ERR]&OBJ=subject").body.decode()
    assert "OBSERVER= 'Hubble  '" in sci and "EXTNAME = 'SCI     '" in sci
    assert "OBSERVER" not in err and "EXTNAME = 'ERR     '" in err
    assert sci.count("SIMPLE  =") == 0 and sci.count("XTENSION=") == 1  # structure not inherited


# ---- reduced levels: the definition ------------------------------------------------------------


def _nan_pattern() -> np.ndarray:
    """520×8: three levels (520×8, 260×4, 130×2) with hand-computable blocks at the left."""
    img = np.ones((8, 520), dtype=np.float32)
    img[0:2, 0:2] = [[np.nan, 2.0], [4.0, np.nan]]  # L1[0, 0] = 3
    img[0:2, 2:4] = np.nan  # L1[0, 1] = NaN
    img[2:4, 0:4] = 10.0  # L1[1, 0] = L1[1, 1] = 10
    img[0:4, 4:8] = np.nan
    img[3, 7] = 0.5  # a faint source alone in its 4×4 block
    img[4:8, 0:4] = np.nan  # an empty 4×4 block
    return img


@pytest.mark.parametrize("cached", [False, True])
def test_reduced_levels_mean_finite_values_and_keep_faint_sources(tmp_path, cached):
    write_fits(tmp_path / "nan.fits", _nan_pattern())
    cache = PyramidCache(str(tmp_path / "cache"), 1 << 30)
    if cached:
        build(cache, tmp_path / "nan.fits")
    source = FitsSource(str(tmp_path / "nan.fits"), cache if cached else None)
    try:
        assert [(lv.width, lv.height) for lv in source.info.levels] == [
            (130, 2),
            (260, 4),
            (520, 8),
        ]
        assert source.stored_raw(1) is cached
        half = source.read_tile(1, 0)[:, :, 0]
        assert half[0, 0] == 3.0 and np.isnan(half[0, 1]) and half[1, 0] == half[1, 1] == 10.0
        assert np.isnan(half[0:2, 2:4]).sum() == 3 and half[1, 3] == 0.5
        assert np.isnan(half[2:4, 0:2]).all() and half[2, 2] == 1.0
        quarter = source.read_tile(0, 0)[:, :, 0]
        # iterated: the mean of the finite half-level means (3, 10, 10), not of 16 pixels
        assert quarter[0, 0] == np.float32(23.0) / np.float32(3.0)
        assert quarter[0, 1] == 0.5  # the faint source survives two halvings
        assert np.isnan(quarter[1, 0]) and quarter[1, 1] == 1.0
        assert np.isnan(quarter).sum() == 1
    finally:
        source.close()


@pytest.mark.parametrize(
    ("width", "height", "channels", "tile", "band", "push"),
    [
        (301, 203, 1, 16, 16, 203),
        (301, 203, 1, 16, 7, 1),
        (301, 203, 2, 16, 50, 13),
        (64, 515, 1, 16, 3, 64),
        (515, 64, 3, 8, 1, 5),
        (1, 2, 1, 1, 1, 1),
        (17, 17, 1, 4, 256, 6),
    ],
)
def test_pyramid_stream_equals_reduce(width, height, channels, tile, band, push):
    rng = np.random.default_rng(width * height + band)
    full = rng.normal(0, 10, size=(height, width, channels)).astype(np.float32)
    full[rng.random(full.shape) < 0.1] = np.nan
    full[8:16, 8:16] = np.nan
    full[0, 0] = np.inf
    sizes = level_sizes(width, height, tile)
    got: dict[int, list[tuple[int, np.ndarray]]] = {k: [] for k in range(1, len(sizes))}
    stream = PyramidStream(sizes, lambda k, y, rows: got[k].append((y, rows.copy())), band)
    for y in range(0, height, push):
        stream.push(full[y : y + push])
    stream.finish()
    for k in range(1, len(sizes)):
        w, h = sizes[k]
        bands = got[k]
        assert [y for y, _ in bands] == list(range(0, h, band)), f"level {k}"
        assert all(rows.shape[0] == band for _, rows in bands[:-1])
        assert all(rows.dtype == np.float32 for _, rows in bands)
        joined = np.concatenate([rows for _, rows in bands])
        assert joined.shape == (h, w, channels)
        np.testing.assert_array_equal(joined, reduce(full, k), err_msg=f"level {k}")


# ---- protocol --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proto(tmp_path_factory):
    """(root, app, TIFF-twin app): a big float image, a cube and a CDELT/PC header."""
    root = tmp_path_factory.mktemp("fits-proto")
    twins = tmp_path_factory.mktemp("fits-twins")
    header = [
        ("OBJECT", "NGC 1234"),
        ("CTYPE1", "RA---TAN"),
        ("CTYPE2", "DEC--TAN"),
        ("CRPIX1", 550.5),
        ("CRPIX2", 450.5),
        ("CRVAL1", 150.1),
        ("CRVAL2", 2.2),
        ("CDELT1", -5.6e-05),
        ("CDELT2", 5.6e-05),
        ("PC1_1", 0.8660254037844387),
        ("PC1_2", -0.5),
        ("PC2_1", 0.5),
        ("PC2_2", 0.8660254037844387),
    ]
    big = sky(*BIG, seed=21)
    big[300:340, 500:560] = np.nan
    write_fits(root / "big.fits", big, header)
    write_fits(root / "cube.fits", sky(600, 300, seed=22, channels=3), [("OBJECT", "CUBE")])
    write_fits(root / "gz.fits.fz", sky(520, 300, seed=23), compression="GZIP_2", extname="SCI")
    tiff_twin(root / "big.fits", twins / "big.tif")
    tiff_twin(root / "cube.fits", twins / "cube.tif")
    tiff_twin(root / "gz.fits.fz", twins / "gz.tif", hdu="SCI")
    cache = tmp_path_factory.mktemp("fits-proto-cache")
    app = make_app(root, cache)
    twin = make_app(twins)
    yield root, app, twin
    join_builds()  # background builds end inside this module


def test_obj_answers(proto):
    root, app, _ = proto
    (lo,), (hi,) = cuts_of(root / "big.fits")
    assert lo == float(np.float32(lo)) and hi == float(np.float32(hi)) and 90 < lo < 100 < hi
    r = call(
        app,
        "FIF=big.fits&OBJ=IIP,1.0&OBJ=Max-size&OBJ=Resolution-number&OBJ=Tile-size"
        "&OBJ=Bits-per-channel&OBJ=Min-Max-sample-values&OBJ=Resolutions",
    )
    assert r.status == 200
    assert (
        r.body
        == (
            "IIP:1.0\r\nMax-size:1100 900\r\nResolution-number:4\r\nTile-size:256 256\r\n"
            f"Bits-per-channel:32\r\nMin-Max-sample-values: {lo:.9g}  {hi:.9g}\r\n"
            "Resolutions:137 112,275 225,550 450,1100 900\r\n"
        ).encode()
    )
    mins, maxs = cuts_of(root / "cube.fits")
    pairs = "  ".join(f"{a:.9g}  {b:.9g}" for a, b in zip(mins, maxs, strict=True))
    r = call(app, "FIF=cube.fits&OBJ=Max-size&OBJ=Min-Max-sample-values")
    assert r.body == f"\r\nMax-size:600 300\r\nMin-Max-sample-values: {pairs}\r\n".encode()


def test_subject_is_the_whole_fits_header_with_a_cd_matrix(proto):
    """The HDU's header as 80-column cards, no END, then the CD matrix VisiOmatic 2 needs
    (CDi_j = CDELTi · PCi_j) when the header has none."""
    root, app, _ = proto
    r = call(app, "FIF=big.fits&OBJ=subject")
    assert r.status == 200
    match = re.fullmatch(rb"\r\nsubject/(\d+):(.*)\r\n", r.body, re.DOTALL)
    assert match is not None
    text = match.group(2).decode("ascii")
    assert int(match.group(1)) == len(text) and len(text) % 80 == 0
    stored = fits.getheader(root / "big.fits").tostring(sep="", endcard=False, padding=False)
    assert text.startswith(stored)
    cards = [text[i : i + 80] for i in range(0, len(text), 80)]
    assert "OBJECT  = 'NGC 1234'" in [card[:20] for card in cards]
    assert not any(card.rstrip() == "END" for card in cards)
    added = {c.keyword: c.value for c in map(fits.Card.fromstring, cards[len(stored) // 80 :])}
    cos, sin = 0.8660254037844387, 0.5
    assert added == pytest.approx(
        {
            "CD1_1": -5.6e-05 * cos,
            "CD1_2": -5.6e-05 * -sin,
            "CD2_1": 5.6e-05 * sin,
            "CD2_2": 5.6e-05 * cos,
        },
        rel=1e-12,
    )
    r = call(app, "FIF=gz.fits.fz[SCI]&OBJ=subject")
    assert b"EXTNAME = 'SCI     '" in r.body and b"NAXIS1  =                  520" in r.body


def test_tiles_equal_the_tiff_twin_at_every_level(proto):
    """Same float32 pixels and cuts as a TIFF pyramid → the same JPEG bytes, every tile."""
    _, app, twin = proto
    for name in ("big", "cube"):
        source = open_source(f"{proto[0]}/{name}.fits")
        queries = tile_queries(source)
        source.close()
        for query in queries:
            ours = call(app, f"FIF={name}.fits&{query}")
            theirs = call(twin, f"FIF={name}.tif&{query}")
            assert (ours.status, ours.header("Content-Type")) == (200, "image/jpeg")
            assert ours.body == theirs.body, f"{name} {query}"
    for query in ("JTL=0,0", "JTL=2,3", "JTL=1,1"):
        ours = call(app, f"FIF=gz.fits.fz[SCI]&{query}")
        assert ours.status == 200 and ours.body == call(twin, f"FIF=gz.tif&{query}").body


@pytest.mark.parametrize(
    "query",
    [
        "MINMAX=1:95,400&GAM=0.5&JTL=1,1",
        "CMP=JET&INV&JTL=2,5",
        "CNT=3.5&JTL=0,0",
        "GAM=log&JTL=3,7",
        "WID=300&CVT=png",
        "RGN=0.1,0.2,0.5,0.3&HEI=200&CVT=jpeg",
        "PTL=2,1",
    ],
)
def test_processed_outputs_equal_the_tiff_twin(proto, query):
    _, app, twin = proto
    ours = call(app, f"FIF=big.fits&{query}")
    assert ours.status == 200
    assert ours.body == call(twin, f"FIF=big.tif&{query}").body


def test_png_tile_is_the_float_tile_scaled_by_the_cuts(proto):
    root, app, _ = proto
    (lo,), (hi,) = cuts_of(root / "big.fits")
    image = read_hdu(root / "big.fits")[:, :, 0]
    for r, k, index, box in [(3, 0, 6, (256, 256, 256, 256)), (2, 1, 2, (512, 0, 38, 256))]:
        reply = call(app, f"FIF=big.fits&PTL={r},{index}")
        assert (reply.status, reply.header("Content-Type")) == (200, "image/png")
        got = imagecodecs.png_decode(reply.body).astype(np.float64)
        x, y, w, h = box
        tile = reduce(image, k)[y : y + h, x : x + w].astype(np.float64)
        want = np.where(np.isfinite(tile), np.clip((tile - lo) / (hi - lo), 0, 1) * 255, 0)
        assert got.shape[:2] == (h, w)
        assert np.abs(got.reshape(h, w) - want).max() <= 1.0


def test_visiomatic_info(proto):
    root, app, _ = proto
    info = json.loads(call(app, "FIF=big.fits&INFO", path="/api").body)
    assert (info["type"], info["image_name"], info["object_name"]) == (
        "visiomatic",
        "big.fits",
        "NGC 1234",
    )
    assert (info["full_size"], info["tile_size"], info["tile_levels"]) == (
        [1100, 900],
        [256, 256],
        4,
    )
    assert (info["channels"], info["bits_per_channel"]) == (1, 32)
    header = info["header"]
    c, s = 0.8660254037844387, 0.5
    assert header["CD1_1"] == pytest.approx(-5.6e-05 * c, rel=1e-12)
    assert header["CD1_2"] == pytest.approx(-5.6e-05 * -s, rel=1e-12)
    assert header["CD2_1"] == pytest.approx(5.6e-05 * s, rel=1e-12)
    assert header["CD2_2"] == pytest.approx(5.6e-05 * c, rel=1e-12)
    assert "CDELT1" not in header
    assert (header["CRVAL1"], header["CTYPE2"], header["NAXIS1"]) == (150.1, "DEC--TAN", 1100)
    image = info["images"][0]
    (lo,), (hi,) = cuts_of(root / "big.fits")
    assert image["size"] == [1100, 900, 1]
    assert image["min_max"] == [[lo, hi]]
    assert image["header"]["CDELT1"] == -5.6e-05
    cube = json.loads(call(app, "FIF=cube.fits&INFO", path="/api").body)
    assert (cube["full_size"], cube["channels"], cube["images"][0]["size"]) == (
        [600, 300],
        3,
        [600, 300, 3],
    )
    mins, maxs = cuts_of(root / "cube.fits")
    assert cube["images"][0]["min_max"] == [list(p) for p in zip(mins, maxs, strict=True)]


def test_visiomatic_values_use_fits_pixel_coordinates(proto):
    root, app, _ = proto
    with fits.open(root / "big.fits") as hdul:
        data = np.array(hdul[0].data)  # FITS order: data[y - 1, x - 1] is pixel (x, y)
    with fits.open(root / "cube.fits") as hdul:
        cube = np.array(hdul[0].data)  # (3, 300, 600)

    def val(name, x, y, chans=""):
        r = call(app, f"FIF={name}&{chans}VAL={x},{y}", path="/api")
        assert r.status == 200
        return json.loads(r.body)["values"]

    assert val("big.fits", 1, 1) == [float(data[0, 0])]
    assert val("big.fits", 1100, 900) == [float(data[899, 1099])]
    assert val("big.fits", 17, 600) == [float(data[599, 16])]
    assert np.isnan(data[599, 520]) and val("big.fits", 521, 600) == [None]
    assert val("big.fits", 1101, 5) == [None] and val("big.fits", 5, 0) == [None]
    assert val("cube.fits", 7, 300, "CHAN=3&CHAN=1&") == [
        float(cube[2, 299, 6]),
        float(cube[0, 299, 6]),
    ]


def test_visiomatic_value_of_a_blank_integer_pixel_is_null(kinds_dir):
    app = make_app(kinds_dir, PYRAMID_CACHE_MB="0")
    # _int16_raw blanks image row 5, column 7: FITS pixel (8, 201 - 5)
    r = call(app, "FIF=i16.fits&VAL=8,196", path="/api")
    assert json.loads(r.body) == {"values": [None]}
    expected = float(_int16_raw(201, 300, 3)[5, 8] * 0.25 + 1000.5)
    assert json.loads(call(app, "FIF=i16.fits&VAL=9,196", path="/api").body) == {
        "values": [expected]
    }


# ---- selectors and paths ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("identifier", "status", "body"),
    [
        ("mef.fits[FOO]", 404, b"no image HDU [FOO]"),
        ("mef.fits[SCI,3]", 404, b"no image HDU [SCI,3]"),
        ("mef.fits[9]", 404, b"no image HDU [9]"),
        ("mef.fits[0]", 404, b"no image HDU [0]"),  # the empty primary HDU
        ("mef.fits[SCI,x]", 404, b"no image HDU [SCI,x]"),
        ("mef.fits[-1]", 404, b"no image HDU [-1]"),
        ("f32.fits[1]", 404, b"no image HDU [1]"),
        ("mef.fits[../mef.fits]", 404, None),
        ("../fits-kinds0/mef.fits[SCI]", 404, None),
        ("nothere.fits[SCI]", 404, None),
        ("plain.tif[1]", 404, b"HDU selection applies to FITS files only"),
        ("plain.tif[SCI]", 404, b"HDU selection applies to FITS files only"),
    ],
)
def test_bad_selectors_and_paths_are_not_found(kinds_dir, identifier, status, body):
    app = make_app(kinds_dir, PYRAMID_CACHE_MB="0")
    r = call(app, f"FIF={identifier}&OBJ=Max-size")
    missing = f"{identifier} is neither a file nor part of an image sequence".encode()
    assert (r.status, r.body) == (status, missing if body is None else body)
    v3 = call(app, f"FIF={identifier}&INFO", path="/api")
    assert v3.status == 404 and json.loads(v3.body)["detail"][0]["loc"] == ["query", "FIF"]
    assert call(app, "FIF=mef.fits[SCI,2]&OBJ=Max-size").body == b"\r\nMax-size:300 200\r\n"


def test_a_file_named_like_a_selector_is_served_as_itself(tmp_path):
    write_fits(tmp_path / "odd.fits[SCI]", sky(40, 30, 1))
    write_fits(tmp_path / "odd.fits", sky(50, 20, 2), extname="SCI")
    app = make_app(tmp_path, PYRAMID_CACHE_MB="0")
    assert call(app, "FIF=odd.fits[SCI]&OBJ=Max-size").body == b"\r\nMax-size:40 30\r\n"
    assert call(app, "FIF=odd.fits[1]&OBJ=Max-size").body == b"\r\nMax-size:50 20\r\n"


# ---- hostile files ---------------------------------------------------------------------------

_S = [("SIMPLE", True)]
_PLANE = np.arange(40 * 30, dtype=">f4").tobytes()


def _hostile(root: Path) -> None:
    good = raw_fits(
        root / "good.fits",
        [*_S, ("BITPIX", -32), ("NAXIS", 2), ("NAXIS1", 40), ("NAXIS2", 30)],
        _PLANE,
    )
    whole = good.read_bytes()
    (root / "truncated.fits").write_bytes(whole[: 2880 + 1000])
    (root / "header-only.fits").write_bytes(whole[:2880])
    raw_fits(
        root / "naxis1.fits", [*_S, ("BITPIX", -32), ("NAXIS", 1), ("NAXIS1", 40)], _PLANE[:160]
    )
    raw_fits(root / "naxis0.fits", [*_S, ("BITPIX", 8), ("NAXIS", 0)])
    raw_fits(
        root / "zero-width.fits", [*_S, ("BITPIX", -32), ("NAXIS", 2), ("NAXIS1", 0), ("NAXIS2", 5)]
    )
    raw_fits(
        root / "negative.fits",
        [*_S, ("BITPIX", -32), ("NAXIS", 2), ("NAXIS1", 10), ("NAXIS2", -5)],
        _PLANE[:200],
    )
    raw_fits(
        root / "naxis4.fits",
        [
            *_S,
            ("BITPIX", -32),
            ("NAXIS", 4),
            ("NAXIS1", 10),
            ("NAXIS2", 6),
            ("NAXIS3", 2),
            ("NAXIS4", 2),
        ],
        _PLANE[:960],
    )
    raw_fits(
        root / "bitpix12.fits",
        [*_S, ("BITPIX", 12), ("NAXIS", 2), ("NAXIS1", 40), ("NAXIS2", 30)],
        _PLANE,
    )
    raw_fits(
        root / "bscale-text.fits",
        [*_S, ("BITPIX", 16), ("NAXIS", 2), ("NAXIS1", 10), ("NAXIS2", 5), ("BSCALE", "abc")],
        _PLANE[:100],
    )
    side = 2**31 - 1
    raw_fits(
        root / "huge.fits",
        [*_S, ("BITPIX", -32), ("NAXIS", 2), ("NAXIS1", side), ("NAXIS2", side)],
        _PLANE,
    )
    noise = np.random.default_rng(3).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    (root / "garbage.fits").write_bytes(b"SIMPLE  = " + noise)
    gz = write_fits(root / "gz.fits.fz", sky(300, 200, 1), compression="GZIP_2").read_bytes()
    (root / "gz-truncated.fits.fz").write_bytes(gz[: len(gz) // 2])
    damaged = bytearray(gz)
    damaged[len(gz) // 2 : len(gz) // 2 + 2000] = b"\x55" * 2000
    (root / "gz-damaged.fits.fz").write_bytes(bytes(damaged))


UNSUPPORTED = "banner"
HOSTILE = {
    "truncated.fits": (404, b"FITS data shorter than its header says"),
    "header-only.fits": (404, b"FITS data shorter than its header says"),
    "naxis1.fits": (400, UNSUPPORTED),
    "naxis0.fits": (400, UNSUPPORTED),
    "zero-width.fits": (400, UNSUPPORTED),
    "negative.fits": (404, b"unreadable FITS ("),
    "naxis4.fits": (400, UNSUPPORTED),
    "bitpix12.fits": (404, b"unreadable FITS ("),
    "bscale-text.fits": (404, b"unreadable FITS ("),
    "huge.fits": (404, b"unreadable FITS ("),
    "garbage.fits": (404, b"unreadable FITS ("),
    "gz-truncated.fits.fz": (404, b"FITS read failed ("),
}


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fits-hostile")
    _hostile(root)
    return root


@pytest.mark.filterwarnings(ASTROPY_WARNINGS)
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_files_give_clean_errors(hostile_dir, name):
    status, body = HOSTILE[name]
    app = make_app(hostile_dir, PYRAMID_CACHE_MB="0")
    expected = banner(app) if body == UNSUPPORTED else body
    for query in ("OBJ=Max-size", "JTL=0,0", "OBJ=subject&CVT=jpeg"):
        r = call(app, f"FIF={name}&{query}")
        assert r.status == status, query
        assert r.body.startswith(expected)
        assert body == UNSUPPORTED or len(r.body) < 80
    v3 = call(app, f"FIF={name}&INFO", path="/api")
    assert v3.status == status and "detail" in json.loads(v3.body)
    assert call(app, "FIF=good.fits&OBJ=Max-size").body == b"\r\nMax-size:40 30\r\n"
    assert call(app, "FIF=good.fits&JTL=0,0").status == 200


@pytest.mark.filterwarnings(ASTROPY_WARNINGS)
def test_damaged_compressed_tiles_fail_only_where_they_are_read(hostile_dir):
    app = make_app(hostile_dir, PYRAMID_CACHE_MB="0")
    assert call(app, "FIF=gz-damaged.fits.fz&OBJ=Max-size").body == b"\r\nMax-size:300 200\r\n"
    r = call(app, "FIF=gz-damaged.fits.fz&JTL=1,0")
    assert (r.status, r.body[:18]) == (404, b"FITS read failed (")
    assert call(app, "FIF=gz.fits.fz&JTL=1,0").status == 200


def test_degenerate_images_are_served(tmp_path):
    write_fits(tmp_path / "nan.fits", np.full((300, 400), np.nan, np.float32))
    write_fits(tmp_path / "flat.fits", np.full((300, 400), 7.0, np.float32))
    app = make_app(tmp_path, tmp_path / "cache")
    r = call(app, "FIF=nan.fits&OBJ=Min-Max-sample-values")
    assert r.body == b"\r\nMin-Max-sample-values: 0  1\r\n"
    r = call(app, "FIF=flat.fits&OBJ=Min-Max-sample-values")
    assert r.body == b"\r\nMin-Max-sample-values: 7  8\r\n"
    for name in ("nan.fits", "flat.fits"):
        for query in ("JTL=0,0", "JTL=1,1", "PTL=0,0"):
            assert call(app, f"FIF={name}&{query}").status == 200
    png = imagecodecs.png_decode(call(app, "FIF=nan.fits&PTL=1,0").body)
    assert png.shape[:2] == (256, 256) and not png.any()
    join_builds()


# ---- the pyramid cache -----------------------------------------------------------------------


@pytest.fixture
def big(tmp_path) -> Path:
    path = tmp_path / "img" / "big.fits"
    path.parent.mkdir()
    image = sky(*BIG, seed=31)
    image[100:140, 700:720] = np.nan
    return write_fits(path, image)


def test_direct_tiles_then_background_build_then_cached_tiles(big, tmp_path):
    cache_dir = tmp_path / "cache"
    cache = PyramidCache(str(cache_dir), 1 << 30)
    image = read_hdu(big)
    source = FitsSource(str(big), cache)
    try:
        assert not glob.glob(f"{cache_dir}/*/L*")
        check_source(source, image)  # computed from footprints, a build started meanwhile
        wait_built(cache_dir)
        assert [source.stored_raw(r) for r in range(4)] == [True] * 4
        check_source(source, image)
    finally:
        source.close()
    (name,) = entries(cache_dir)
    assert re.fullmatch(r"[0-9a-f]{24}-[0-9a-f]{12}", name)
    entry = cache_dir / name
    assert (cache_dir / f"{name}.lock").is_file()
    assert sorted(os.listdir(entry)) == ["L0", "L1", "L2", "builds.log", "cuts.json", "meta.json"]
    log_lines = (entry / "builds.log").read_text().splitlines()
    assert sorted(line.split()[0] for line in log_lines) == ["0", "1", "2"]
    assert {line.split()[1] for line in log_lines} == {str(os.getpid())}
    lo, hi = cuts_of(big)
    assert json.loads((entry / "cuts.json").read_text()) == {"min": list(lo), "max": list(hi)}
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["image"] == str(big) and meta["channels"] == 1
    assert meta["levels"] == [[1100, 900], [550, 450], [275, 225], [137, 112]]
    assert meta["bytes"] == (550 * 450 + 275 * 225 + 137 * 112) * 4
    for r, expected in enumerate(expected_levels(image)[:3]):
        assert (entry / f"L{r}" / "c" / "0" / "0" / "0").is_file()
        stored = zarr.open_array(str(entry / f"L{r}"), mode="r")
        assert (stored.shape, stored.dtype) == (expected.shape, np.float32)
        np.testing.assert_array_equal(stored[:], expected)
    again = FitsSource(str(big), cache)  # another worker: reads the levels, same cuts
    try:
        assert again.stored_raw(0) and again.info.min_values == lo and again.info.max_values == hi
        check_source(again, image)
    finally:
        again.close()
    (entry / "cuts.json").write_text('{"min": [1.5], "max": [2.5]}')
    shared = FitsSource(str(big), cache)  # the saved cuts are used, not sampled again
    assert (shared.info.min_values, shared.info.max_values) == ((1.5,), (2.5,))
    shared.close()


def test_large_footprints_wait_for_the_build(big, tmp_path, monkeypatch):
    monkeypatch.setattr(fits_source, "DIRECT_PIXELS", 256 * 256)
    cache_dir = tmp_path / "cache"
    source = FitsSource(str(big), PyramidCache(str(cache_dir), 1 << 30))
    try:
        assert not glob.glob(f"{cache_dir}/*/meta.json")
        tile = source.read_tile(1, 1)  # footprint 76×900 > DIRECT_PIXELS: built first
        assert glob.glob(f"{cache_dir}/*/meta.json") and source.stored_raw(1)
        expected = reduce(read_hdu(big), 2)[0:225, 256:275]
        np.testing.assert_array_equal(tile, expected)
        check_source(source, read_hdu(big))
    finally:
        source.close()


def test_a_crashed_build_leaves_nothing_that_breaks_serving(big, tmp_path):
    cache_dir = tmp_path / "cache"
    cache = PyramidCache(str(cache_dir), 1 << 30)
    data = FitsData(str(big))
    sizes = level_sizes(data.width, data.height, TILE)
    entry = cache.entry(str(big), os.stat(big), sizes, 1)
    assert entry is not None

    class Dying:
        width, height, channels = data.width, data.height, 1

        def region(self, x, y, w, h):
            raise RuntimeError("worker killed")

    with pytest.raises(RuntimeError):
        entry.build(Dying(), sizes)
    data.release()
    leftovers = glob.glob(f"{entry.path}/tmp-*")
    assert leftovers and not glob.glob(f"{entry.path}/L*")
    image = read_hdu(big)
    source = FitsSource(str(big), cache)
    try:
        check_source(source, image)  # no level looks whole: tiles computed
        wait_built(cache_dir)
        assert not glob.glob(f"{entry.path}/tmp-*")
        assert sorted(p.name for p in Path(entry.path).glob("L*")) == ["L0", "L1", "L2"]
        check_source(source, image)
    finally:
        source.close()


@pytest.mark.parametrize("damage", ["truncate-before-open", "truncate-while-open", "delete"])
def test_damaged_cached_levels_give_computed_tiles(big, tmp_path, damage):
    cache = PyramidCache(str(tmp_path / "cache"), 1 << 30)
    entry = build(cache, big)
    image = read_hdu(big)
    shards = [Path(entry) / f"L{r}" / "c" / "0" / "0" / "0" for r in range(3)]
    source = FitsSource(str(big), cache)
    try:
        if damage == "truncate-while-open":
            check_source(source, image)  # every level file open now
        for shard in shards:
            if damage == "delete":
                shard.unlink()
            else:
                os.truncate(shard, shard.stat().st_size // 2)
        check_source(source, image)
    finally:
        source.close()


def _v2_app_check(root, app, twin, name, twin_name):
    source = open_source(f"{root}/{name}")
    queries = tile_queries(source)
    source.close()
    for query in queries:
        assert call(app, f"FIF={name}&{query}").body == call(twin, f"FIF={twin_name}&{query}").body


def test_a_rewritten_file_gets_new_levels_and_the_stale_ones_go(tmp_path):
    root, twins, cache = tmp_path / "img", tmp_path / "twins", tmp_path / "cache"
    root.mkdir()
    twins.mkdir()
    path = root / "img.fits"
    write_fits(path, sky(600, 500, seed=41))
    os.utime(path, (1_700_000_000, 1_700_000_000))
    tiff_twin(path, twins / "v1.tif")
    app = make_app(root, cache)
    twin = make_app(twins)
    _v2_app_check(root, app, twin, "img.fits", "v1.tif")
    wait_built(cache)
    (old,) = entries(cache)
    _v2_app_check(root, app, twin, "img.fits", "v1.tif")  # from the cache now
    write_fits(path, sky(600, 500, seed=42))  # same size, new pixels
    os.utime(path, (1_700_000_100, 1_700_000_100))
    tiff_twin(path, twins / "v2.tif")
    _v2_app_check(root, app, twin, "img.fits", "v2.tif")
    wait_for(lambda: len(glob.glob(f"{cache}/*/meta.json")) == 1 and old not in entries(cache))
    (new,) = entries(cache)
    assert new.split("-")[0] == old.split("-")[0] and new != old
    _v2_app_check(root, app, twin, "img.fits", "v2.tif")


def test_no_cache_when_the_bound_is_zero(tmp_path):
    root, cache = tmp_path / "img", tmp_path / "cache"
    root.mkdir()
    image = sky(600, 500, seed=43)
    write_fits(root / "a.fits", image)
    app = make_app(root, cache, PYRAMID_CACHE_MB="0")
    for query in ("JTL=0,0", "JTL=1,1", "OBJ=Max-size"):
        assert call(app, f"FIF=a.fits&{query}").status == 200
    assert entries(cache) == []  # an enabled cache makes the entry when the image opens
    source = open_source(str(root / "a.fits"), PyramidCache(str(cache), 0))
    try:
        assert source.stored_raw(0) is False
        check_source(source, image[:, :, None])
    finally:
        source.close()
    assert entries(cache) == []


def test_an_image_larger_than_the_bound_is_never_cached(big, tmp_path):
    needed = (550 * 450 + 275 * 225 + 137 * 112) * 4
    cache = PyramidCache(str(tmp_path / "cache"), needed - 1)
    assert cache.entry(str(big), os.stat(big), level_sizes(*BIG, TILE), 1) is None
    source = FitsSource(str(big), cache)
    try:
        check_source(source, read_hdu(big))
    finally:
        source.close()
    assert entries(tmp_path / "cache") == []
    assert PyramidCache(str(tmp_path / "cache"), needed).entry(
        str(big), os.stat(big), level_sizes(*BIG, TILE), 1
    )


def test_least_recently_used_images_are_evicted(tmp_path):
    cache_dir = tmp_path / "cache"
    paths = {
        n: write_fits(tmp_path / f"{n}.fits", sky(300, 300, seed=s))
        for n, s in zip("abc", (51, 52, 53), strict=True)
    }
    needed = 150 * 150 * 4
    cache = PyramidCache(str(cache_dir), int(2.5 * needed))
    made = {n: Path(build(cache, paths[n])) for n in "ab"}
    now = time.time()
    os.utime(made["a"] / "meta.json", (now - 200, now - 200))  # a used long ago…
    os.utime(made["b"] / "meta.json", (now - 100, now - 100))
    FitsSource(str(paths["a"]), cache).close()  # …but opened again now: b is the oldest
    made["c"] = Path(build(cache, paths["c"]))
    assert made["a"].is_dir() and made["c"].is_dir() and not made["b"].exists()
    assert sorted(entries(cache_dir)) == sorted(p.name for p in (made["a"], made["c"]))
    source = FitsSource(str(paths["b"]), cache)  # evicted: computed, then cached again
    try:
        check_source(source, read_hdu(paths["b"]))
    finally:
        source.close()
    join_builds()


# ---- open files and the image list -----------------------------------------------------------


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_compressed_images_respect_max_open_files(tmp_path):
    for i in range(5):
        write_fits(tmp_path / f"c{i}.fits.fz", sky(50, 40, seed=i), compression="GZIP_2")
    app = make_app(tmp_path, PYRAMID_CACHE_MB="0", MAX_OPEN_FILES="2")

    def open_images() -> list[str]:
        found = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith(str(tmp_path)):
                found.append(target)
        return found

    for _ in range(2):
        for i in range(5):
            r = call(app, f"FIF=c{i}.fits.fz&PTL=0,0")
            assert r.status == 200
            png = imagecodecs.png_decode(r.body)
            assert png.shape[:2] == (40, 50) and png.any()
        assert len(open_images()) <= 2, open_images()


def test_image_list_includes_fits_files(tmp_path):
    from iipserver.site import create_site

    write_fits(tmp_path / "a.fits", sky(120, 80, 1))
    write_fits(tmp_path / "b.fits.fz", sky(90, 70, 2), compression="GZIP_2")
    write_fits(tmp_path / "cube.fits", sky(60, 50, 3, channels=3))
    _write_mef(tmp_path / "mef.fits", [("SCI", 1, sky(40, 30, 4))])
    (tmp_path / "broken.fits").write_bytes(b"SIMPLE  = nonsense" * 200)
    write_pyramid(tmp_path / "t.tif", [np.zeros((20, 30), np.uint8)])
    listed = create_site(str(tmp_path)).test_client().get("/images").get_json()
    assert listed == {
        "images": [
            {"path": "a.fits", "width": 120, "height": 80, "channels": 1},
            {"path": "b.fits.fz", "width": 90, "height": 70, "channels": 1},
            {"path": "broken.fits"},
            {"path": "cube.fits", "width": 60, "height": 50, "channels": 3},
            {"path": "mef.fits", "width": 40, "height": 30, "channels": 1},
            {"path": "t.tif", "width": 30, "height": 20, "channels": 1},
        ],
        "truncated": False,
    }


# ---- VisiOmatic 3 background statistics of a large FITS -----------------------------------


def test_large_fits_info_samples_only_the_cut_rows(tmp_path: Path) -> None:
    """Over 2^24 pixels the FITS source samples every k-th row (k > 16) for INFO, the same
    rows as its default cuts: INFO's min_max equals OBJ's Min-Max-sample-values, and the
    statistics equal VisiOmatic 3's formula applied to exactly those rows."""
    from iipserver import display

    width, height = 4200, 4000  # 16.8 M pixels: k = 17
    image = np.full((height, width), 100.0, dtype=np.float32)
    rng = np.random.default_rng(5)
    image += rng.normal(0.0, 5.0, size=(height, width)).astype(np.float32)
    image[: height // 2] += 50.0  # top half brighter: which rows are sampled shows in the level
    write_fits(tmp_path / "big.fits", image)
    app = make_app(tmp_path, tmp_path / "cache")
    info = json.loads(call(app, "FIF=big.fits&INFO", path="/api").body)
    obj = call(app, "FIF=big.fits&OBJ=Min-Max-sample-values").body.decode()
    advertised = [float(v) for v in obj.split(":", 1)[1].split()]
    assert info["images"][0]["min_max"][0] == pytest.approx(advertised, rel=1e-6)
    step = -(-width * height // fits_source.CUT_SAMPLES)
    assert step == 17
    rows = image[::-1][::step]  # FITS row 1 (the bottom) first
    level, mad = display.background(rows.reshape(1, -1))
    assert info["images"][0]["background_level"][0] == pytest.approx(float(level[0]), rel=1e-5)
    assert info["images"][0]["background_mad"][0] == pytest.approx(float(mad[0]), rel=1e-5)
