"""Shared fixtures: generated test images, and FastCGI servers (iipsrv 1.1 and ours) over them.

The images are written once per session with ``tests/images.py`` into a temporary folder,
with a fixed modification time so that Last-Modified / If-Modified-Since are predictable.
``reference`` is Debian's iipsrv 1.1 (skipped when the binary is missing) and ``ours`` is
``python -m iipserver fcgi`` (or ``$IIPSERVER_FCGI_COMMAND``, with ``{port}``); both
serve that folder as ``FILESYSTEM_PREFIX`` and expose
``.get(query, headers=None) -> fcgi_client.Response``.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from images import pyramid_levels, rgb_image, smin_smax_tags, star_field, write_pyramid
from reference import ServerProcess

IIPSRV = os.environ.get("IIPSRV_BINARY", "/usr/lib/iipimage-server/iipsrv.fcgi")

#: Every fixture file gets this modification time: Sat, 02 Mar 2024 03:04:05 GMT.
IMAGE_MTIME = 1709348645
IMAGE_MTIME_HTTP = "Sat, 02 Mar 2024 03:04:05 GMT"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "reference: differential tests against Debian's iipsrv 1.1")


@dataclass
class TestImage:
    """One generated image: its file name, pyramid levels (largest first) and facts."""

    name: str
    levels: list[np.ndarray]
    tile: int = 256
    smin: tuple[float, ...] | None = None  # SMinSampleValue tag values, if written
    smax: tuple[float, ...] | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return 1 if self.levels[0].ndim == 2 else self.levels[0].shape[2]

    @property
    def is_float(self) -> bool:
        return np.issubdtype(self.levels[0].dtype, np.floating)

    def level(self, resolution: int) -> np.ndarray:
        """Level by IIP resolution number (0 = smallest)."""
        return self.levels[len(self.levels) - 1 - resolution]

    def ntiles(self, resolution: int) -> tuple[int, int]:
        h, w = self.level(resolution).shape[:2]
        return -(-w // self.tile), -(-h // self.tile)


@dataclass
class ImageSet:
    """The folder of generated images and what was written into each."""

    root: Path
    images: dict[str, TestImage]
    mtime: int = IMAGE_MTIME
    mtime_http: str = IMAGE_MTIME_HTTP

    def __getitem__(self, name: str) -> TestImage:
        return self.images[name]


def _ramp_float(width: int, height: int) -> np.ndarray:
    """A float32 ramp with ripples and a few non-finite pixels (f1nomm.tif)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    out = (0.5 * x - 0.25 * y + 20.0 * np.sin(x / 37.0) * np.cos(y / 23.0) - 30.0).astype(
        np.float32
    )
    out[100, 100] = np.nan
    out[200:203, 300] = np.inf
    out[600, 900] = -np.inf
    return out


def _two_band_float(width: int, height: int) -> np.ndarray:
    """Two float32 bands inside the f2.tif tag ranges (-10..189.5 and 1000..1598)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    band0 = -10.0 + 199.5 * (x / (width - 1)) * (0.5 + 0.5 * np.cos(y / 40.0))
    band1 = 1000.0 + 598.0 * (y / (height - 1))
    return np.stack([band0, band1], axis=2).astype(np.float32)


def _texture_rgb(width: int, height: int, seed: int) -> np.ndarray:
    """RGB uint8 with structure at several scales (to exercise JPEG on real detail)."""
    rng = np.random.default_rng(seed)
    base = rgb_image(width, height).astype(np.float64)
    y, x = np.mgrid[0:height, 0:width]
    base[..., 2] = 128 + 100 * np.sin(x / 9.0) * np.sin(y / 13.0)
    base += rng.normal(0, 6, size=base.shape)
    return np.clip(np.round(base), 0, 255).astype(np.uint8)


def _normal_map(width: int, height: int) -> np.ndarray:
    """Three float32 bands in 0..1 encoding unit surface normals (p = n/2 + 0.5) of a bumpy
    surface, the input SHD expects."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    z = 18.0 * np.sin(x / 17.0) * np.cos(y / 11.0) + 0.02 * (x - width / 2) ** 2 / 10.0
    gy, gx = np.gradient(z)
    n = np.stack([-gx, -gy, np.ones_like(z)], axis=2)
    n /= np.linalg.norm(n, axis=2, keepdims=True)
    return (0.5 * n + 0.5).astype(np.float32)


#: Image sequence (spec §6, notes §8): ``seq_pyr_<x>_<y>.tif`` for these angles.
SEQUENCE_HORIZONTAL = (0, 10, 20)
SEQUENCE_VERTICAL = (80, 90)


def _sequence_view(x: int, y: int) -> np.ndarray:
    """One float32 view of the sequence: its own star field, scaled and offset by angle."""
    sky = star_field(300, 200, seed=23 + x + 1000 * y)
    return (sky * (1.0 + x / 40.0) + (90 - y) * 3.0).astype(np.float32)


# VisiOmatic v2 replay (tests/test_visiomatic_v2.py): STIFF-style float32 images whose TIFF
# ImageDescription holds a FITS header (80-column cards concatenated, END, padded with spaces
# to a multiple of 2880). No '%' anywhere (1.1's printf hazard) and no NaN (1.1 prints ``nan``
# in PFL, which JSON.parse rejects).

#: Full-resolution size of the VisiOmatic images: 3 levels (150x112, 300x225, 600x450).
VM_SIZE = (600, 450)
#: CRVAL and a slightly rotated CD matrix (degrees per pixel) of vm_single.tif / vm_cube3.tif.
VM_CRVAL = (150.1191666667, 2.2058333333)
VM_CD = {
    "CD1_1": -5.5517477136937e-05,
    "CD1_2": 2.0833333333333e-06,
    "CD2_1": 2.0833333333333e-06,
    "CD2_2": 5.5517477136937e-05,
}
VM_CHANNEL_LABELS = ("g", "r", "i")
#: vm_cdeltpc.tif: CDELT with a PC matrix (30 degrees) and no CD.
VM_CDELT = (-5.6e-05, 5.6e-05)
VM_PC = {
    "PC1_1": 0.8660254037844387,
    "PC1_2": -0.5,
    "PC2_1": 0.5,
    "PC2_2": 0.8660254037844387,
}


def fits_card(key: str, value: bool | int | float | str, comment: str = "") -> str:
    """One 80-column FITS card in fixed format (value right-aligned to column 30)."""
    if isinstance(value, bool):
        text = f"{'T' if value else 'F':>20}"
    elif isinstance(value, int):
        text = f"{value:>20d}"
    elif isinstance(value, float):
        number = repr(value).upper()
        text = f"{number if ('.' in number or 'E' in number) else number + '.':>20}"
    else:
        text = f"{chr(39) + value.ljust(8) + chr(39):<20}"
    card = f"{key:<8}= {text}" + (f" / {comment}" if comment else "")
    assert len(card) <= 80 and "%" not in card, card
    return card.ljust(80)


def fits_header(cards: Sequence[str]) -> str:
    """Cards + END, padded with spaces to a whole number of 2880-byte blocks."""
    text = "".join(cards) + "END".ljust(80)
    return text.ljust(-(-len(text) // 2880) * 2880)


def _vm_header(
    width: int,
    height: int,
    channels: int,
    wcs: Sequence[tuple[str, float]],
    labels: Sequence[str] = (),
) -> str:
    cards = [
        fits_card("SIMPLE", True, "conforms to FITS standard"),
        fits_card("BITPIX", -32, "array data type"),
        fits_card("NAXIS", 3 if channels > 1 else 2, "number of array dimensions"),
        fits_card("NAXIS1", width),
        fits_card("NAXIS2", height),
    ]
    if channels > 1:
        cards.append(fits_card("NAXIS3", channels))
    cards += [
        fits_card("EQUINOX", 2000.0, "Mean equinox"),
        fits_card("RADESYS", "ICRS", "Astrometric system"),
        fits_card("CTYPE1", "RA---TAN", "WCS projection type for this axis"),
        fits_card("CTYPE2", "DEC--TAN", "WCS projection type for this axis"),
        fits_card("CUNIT1", "deg", "Axis unit"),
        fits_card("CUNIT2", "deg", "Axis unit"),
        fits_card("CRVAL1", VM_CRVAL[0], "World coordinate on this axis"),
        fits_card("CRVAL2", VM_CRVAL[1], "World coordinate on this axis"),
        fits_card("CRPIX1", width / 2 + 0.5, "Reference pixel on this axis"),
        fits_card("CRPIX2", height / 2 + 0.5, "Reference pixel on this axis"),
    ]
    cards += [fits_card(key, value, "Linear projection matrix") for key, value in wcs]
    cards += [
        fits_card(f"CHAN{i + 1:04d}", label, "Channel label") for i, label in enumerate(labels)
    ]
    cards += [
        fits_card("OBJECT", "TESTFIELD", "Object name"),
        fits_card("EXPTIME", 300.0, "Exposure time [s]"),
        "COMMENT STIFF-style header written by the iipserver test suite".ljust(80),
    ]
    return fits_header(cards)


def _visiomatic_images() -> list[tuple[TestImage, str]]:
    """The VisiOmatic v2 images and their ImageDescription (FITS header)."""
    width, height = VM_SIZE
    single = star_field(width, height, seed=31)
    cube = star_field(width, height, seed=37, channels=3)
    cdelt = star_field(300, 200, seed=41)
    cd = list(VM_CD.items())
    pc = [("CDELT1", VM_CDELT[0]), ("CDELT2", VM_CDELT[1]), *VM_PC.items()]
    out = []
    for name, data, wcs, labels in (
        ("vm_single.tif", single, cd, ()),
        ("vm_cube3.tif", cube, cd, VM_CHANNEL_LABELS),
        ("vm_cdeltpc.tif", cdelt, pc, ()),
    ):
        assert np.isfinite(data).all()
        axes = (0, 1)
        header = _vm_header(data.shape[1], data.shape[0], 1 if data.ndim == 2 else 3, wcs, labels)
        image = TestImage(
            name,
            pyramid_levels(data),
            smin=tuple(float(v) for v in np.atleast_1d(data.min(axis=axes))),
            smax=tuple(float(v) for v in np.atleast_1d(np.percentile(data, 99.5, axis=axes))),
            tags={"subject": header},
        )
        out.append((image, header))
    return out


def _builders() -> list[tuple[TestImage, Callable[[Path, TestImage], None]]]:
    """Each test image and how to write it."""
    rgb_levels = pyramid_levels(rgb_image())
    out: list[tuple[TestImage, Callable[[Path, TestImage], None]]] = []

    def add(image: TestImage, extratags: Sequence[tuple[object, ...]] = (), **kwargs: Any) -> None:
        def write(path: Path, img: TestImage) -> None:
            extra = list(extratags)
            if img.smin is not None and img.smax is not None:
                extra += smin_smax_tags(img.smin, img.smax)
            write_pyramid(path, img.levels, extratags=extra, **kwargs)

        out.append((image, write))

    # §22 conformance images (1000x750, 3 levels).
    add(
        TestImage("rgb.tif", rgb_levels),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": 90},
    )
    add(TestImage("rgb_raw.tif", rgb_levels), photometric="rgb")
    add(TestImage("grey.tif", [lv[..., 0].copy() for lv in rgb_levels]), photometric="minisblack")
    add(TestImage("f1nomm.tif", pyramid_levels(_ramp_float(1000, 750))), photometric="minisblack")
    add(
        TestImage(
            "f2.tif",
            pyramid_levels(_two_band_float(1000, 750)),
            smin=(-10.0, 1000.0),
            smax=(189.5, 1598.0),
        ),
        photometric="minisblack",
        planarconfig="contig",
    )

    # Small extra images.
    y, x = np.mgrid[0:400, 0:600]
    grey16 = ((x * 109 + y * 3) % 65536).astype(np.uint16)
    add(TestImage("grey16.tif", pyramid_levels(grey16)), photometric="minisblack")

    star = star_field(512, 384, seed=3)
    add(
        TestImage(
            "star.tif",
            pyramid_levels(star),
            smin=(float(star.min()),),
            smax=(float(star.max()),),
        ),
        photometric="minisblack",
    )

    cube = star_field(400, 300, seed=7, channels=3)
    add(
        TestImage(
            "cube.tif",
            pyramid_levels(cube),
            smin=tuple(float(v) for v in cube.min(axis=(0, 1))),
            smax=tuple(float(v) for v in np.percentile(cube, 99.5, axis=(0, 1))),
        ),
        photometric="minisblack",
        planarconfig="contig",
    )

    rng = np.random.default_rng(11)
    y5, x5 = np.mgrid[0:200, 0:300]
    band5 = np.stack(
        [
            (x5 * 200).astype(np.uint16),
            (y5 * 300).astype(np.uint16),
            ((x5 + y5) * 130).astype(np.uint16),
            rng.integers(0, 65535, size=(200, 300), dtype=np.uint16),
            np.full((200, 300), 65535, dtype=np.uint16),
        ],
        axis=2,
    )
    add(
        TestImage("band5.tif", pyramid_levels(band5)),
        photometric="minisblack",
        planarconfig="contig",
    )

    add(
        TestImage("deflate.tif", pyramid_levels(_texture_rgb(320, 240, 5))),
        photometric="rgb",
        compression="zlib",
    )

    bigf = star_field(300, 300, seed=13)
    add(
        TestImage("bigfloat.tif", pyramid_levels(bigf), smin=(90.0,), smax=(400.0,)),
        photometric="minisblack",
        bigtiff=True,
    )

    yi, xi = np.mgrid[0:200, 0:300]
    # Non-negative and below 2**31 (1.1 reads 32-bit integers as unsigned).
    int32 = (xi.astype(np.int64) * 6_000_000 + yi * 1_000_000).astype(np.int32)
    add(TestImage("int32.tif", pyramid_levels(int32)), photometric="minisblack")

    meta_tags = {
        "subject": "A small test image for iipserver",
        "author": "Test Artist",
        "copyright": "CC-BY 4.0 Test Observatory",
        "create-dtm": "2024:03:02 03:04:05",
        "app-name": "testsuite 1.0",
    }
    add(
        TestImage("meta.tif", pyramid_levels(_texture_rgb(200, 150, 9)), tags=meta_tags),
        photometric="rgb",
        description=meta_tags["subject"],
        extratags=[
            (315, "s", 0, meta_tags["author"], True),
            (33432, "s", 0, meta_tags["copyright"], True),
            (306, "s", 0, meta_tags["create-dtm"], True),
            (305, "s", 0, meta_tags["app-name"], True),
        ],
    )

    # Science pipeline (tests/test_differential_science.py): a 5-band float cube, a
    # normal map for SHD and a float image sequence.
    cube5 = star_field(300, 200, seed=17, channels=5)
    add(
        TestImage(
            "cube5.tif",
            pyramid_levels(cube5),
            smin=tuple(float(v) for v in cube5.min(axis=(0, 1))),
            smax=tuple(float(v) for v in np.percentile(cube5, 99.5, axis=(0, 1))),
        ),
        photometric="minisblack",
        planarconfig="contig",
    )
    add(
        TestImage(
            "normals.tif", pyramid_levels(_normal_map(320, 240)), smin=(0.0,) * 3, smax=(1.0,) * 3
        ),
        photometric="rgb",
        planarconfig="contig",
    )
    # One calibration (SMin/SMax of the first view) for every view: 1.1 normalises a view
    # with the tags of whichever file it opened last, which depends on its tile cache.
    first = _sequence_view(0, 90)
    seq_range = (float(first.min()), float(np.percentile(first, 99.0)))
    for sx in SEQUENCE_HORIZONTAL:
        for sy in SEQUENCE_VERTICAL:
            add(
                TestImage(
                    f"seq_pyr_{sx:03d}_{sy:03d}.tif",
                    pyramid_levels(_sequence_view(sx, sy)),
                    smin=(seq_range[0],),
                    smax=(seq_range[1],),
                ),
                photometric="minisblack",
            )

    # VisiOmatic v2 replay: FITS headers in ImageDescription (tests/test_visiomatic_v2.py).
    for image, header in _visiomatic_images():
        add(image, description=header, photometric="minisblack", planarconfig="contig")

    # IIIF / DeepZoom / Zoomify (tests/test_differential_iiif.py): a portrait image of odd
    # size (555x777, levels 277x388 and 138x194) and a single-level grey image of odd size.
    add(TestImage("odd.tif", pyramid_levels(_texture_rgb(555, 777, 19))), photometric="rgb")
    yo, xo = np.mgrid[0:173, 0:231]
    single = ((xo * 7 + yo * 3) % 256).astype(np.uint8)
    add(TestImage("single.tif", [single]), photometric="minisblack")
    # Four levels (300x200 down to 37x25), three of them smaller than a tile: Zoomify discards
    # two, DeepZoom maps its small levels onto the 37x25 one.
    deep = pyramid_levels(_texture_rgb(300, 200, 29), min_levels=4)
    add(TestImage("deep.tif", deep), photometric="rgb")
    return out


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> ImageSet:
    """All test images, written once into a temporary folder (the servers' prefix)."""
    root = tmp_path_factory.mktemp("images")
    catalogue: dict[str, TestImage] = {}
    for image, write in _builders():
        path = root / image.name
        write(path, image)
        os.utime(path, (IMAGE_MTIME, IMAGE_MTIME))
        catalogue[image.name] = image
    return ImageSet(root, catalogue)


def _server_env(images: ImageSet, logfile: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key
        in ("PATH", "HOME", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV", "TMPDIR", "SYSTEMROOT")
        or key.startswith("PYENV")
    }
    env.update(
        FILESYSTEM_PREFIX=f"{images.root}/",
        VERBOSITY="0",
        LOGFILE=str(logfile),
        OMP_NUM_THREADS="1",
        TZ="UTC",
    )
    return env


def _reference_process(images: ImageSet, logdir: Path, **settings: str) -> ServerProcess:
    """iipsrv 1.1 (not started) over ``images``, with extra environment ``settings``."""
    if not (os.path.isfile(IIPSRV) and os.access(IIPSRV, os.X_OK)):
        pytest.skip(f"iipsrv 1.1 not installed ({IIPSRV}); apt-get install iipimage-server")
    env = _server_env(images, logdir / "iipsrv.log")
    env.update(settings)
    return ServerProcess(
        "iipsrv", lambda port: [IIPSRV, "--bind", f"127.0.0.1:{port}"], env, cwd=logdir
    )


def _our_process(images: ImageSet, logdir: Path, **settings: str) -> ServerProcess:
    """Our server (not started) over ``images``, with extra environment ``settings``.

    CODEC_PASSTHROUGH is off unless ``settings`` turn it on, so that JPEG-in-TIFF tiles are
    re-encoded as 1.1 does and compared with its answers byte for byte;
    tests/test_passthrough.py covers the default.
    """
    env = _server_env(images, logdir / "iipserver.log")
    env["CODEC_PASSTHROUGH"] = "0"
    env.update(settings)
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p)
    override = os.environ.get("IIPSERVER_FCGI_COMMAND", "")

    def argv(port: int) -> list[str]:
        if override:  # e.g. another build; "{port}" is replaced by the port number
            return [part.replace("{port}", str(port)) for part in shlex.split(override)]
        bind = f"127.0.0.1:{port}"
        return [sys.executable, "-m", "iipserver", "fcgi", "--bind", bind, "--workers", "1"]

    return ServerProcess("iipserver", argv, env, cwd=logdir)


@pytest.fixture(scope="session")
def reference(
    images: ImageSet, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Debian's iipsrv 1.1 on a free port, serving ``images``."""
    server = _reference_process(images, tmp_path_factory.mktemp("iipsrv"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ours(images: ImageSet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Our server, ``python -m iipserver fcgi``, on a free port, serving ``images``.

    CODEC_PASSTHROUGH is off (see ``_our_process``).
    """
    server = _our_process(images, tmp_path_factory.mktemp("iipserver"))
    server.start()
    yield server
    server.stop()


ServerPair = tuple[ServerProcess, ServerProcess]


class ServerPairs:
    """(iipsrv 1.1, ours) pairs started with extra environment settings, one per setting.

    ``server_pair(MAX_CVT="300", ALLOW_UPSCALING="0")`` starts both servers on the first call
    with those settings and returns the same running pair afterwards.
    """

    def __init__(self, images: ImageSet, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.images = images
        self.tmp_path_factory = tmp_path_factory
        self.pairs: dict[tuple[tuple[str, str], ...], ServerPair] = {}

    def __call__(self, **settings: str) -> ServerPair:
        key = tuple(sorted(settings.items()))
        if key not in self.pairs:
            label = "-".join(f"{k}{v}" for k, v in key) or "default"
            mktemp = self.tmp_path_factory.mktemp
            ref = _reference_process(self.images, mktemp(f"iipsrv-{label}"), **settings)
            mine = _our_process(self.images, mktemp(f"iipserver-{label}"), **settings)
            ref.start()
            try:
                mine.start()
            except BaseException:
                ref.stop()
                raise
            self.pairs[key] = (ref, mine)
        return self.pairs[key]

    def stop(self) -> None:
        for ref, mine in self.pairs.values():
            ref.stop()
            mine.stop()


@pytest.fixture(scope="session")
def server_pair(
    images: ImageSet, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerPairs]:
    """Factory for (iipsrv 1.1, ours) started with extra environment settings (for example
    MAX_CVT, ALLOW_UPSCALING), stopped at the end of the session. Skips without iipsrv."""
    pairs = ServerPairs(images, tmp_path_factory)
    yield pairs
    pairs.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Debian Chromium driven by Playwright (never a browser from ``playwright install``)."""
    sync_api = pytest.importorskip(
        "playwright.sync_api",
        reason="the playwright module is not installed (pip install -e '.[test]')",
    )
    from processes import CHROMIUM, LAUNCH_ARGS

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found (Debian package chromium; scripts/test.sh installs it)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS
        )
        try:
            yield launched
        finally:
            launched.close()
