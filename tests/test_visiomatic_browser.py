"""Real-browser tests of the VisiOmatic 3 client against iipserver (Debian Chromium + Playwright).

The client (the ``visiomatic`` 3.0.7 wheel from PyPI and Leaflet 1.9.4's CSS from npm) is fetched
once per session into a temporary ``IIPSERVER_CLIENT_DIR`` by :func:`iipserver.client.fetch`;
``python -m iipserver serve`` then serves it at ``/client/`` and our page at ``/visiomatic``
(visiomatic.md §4 and §(b)). Two STIFF-like float32 images (a star field and a 3-band cube, each
with a FITS header in ImageDescription) are opened in mono, mono channel 2 and colour modes, and
a 3-plane FITS cube (astropy, TAN WCS) served directly, without conversion, in colour mode; each
is driven as in visiomatic.md §(b) 8: zoom, contrast, gamma, colour map, pixel values, a profile
line and a snapshot. What is checked is what the browser sent and received (every request to the
server, alerts, page errors, console errors) and what it drew (screenshots).

Skipped when ``/usr/bin/chromium``, the ``playwright`` module or the package registries are
missing. Playwright's own browsers are never used (no ``playwright install``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import imagecodecs
import numpy as np
import pytest
from images import pyramid_levels, star_field, write_pyramid
from processes import children as _children
from processes import wait_for

from iipserver import client

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Dialog, Page, Request, Response

sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="the playwright module is not installed (pip install -e '.[test]')",
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
VIEWPORT = {"width": 900, "height": 650}
BANNER = re.compile(r"server on http://(?P<address>\S+?)/?[,)]")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 8.0
WAIT_MS = 10_000

SINGLE, CUBE, FITS_CUBE = "vm3_single.tif", "vm3_cube3.tif", "vm3_cube3.fits"
SIZES = {SINGLE: (1000, 800), CUBE: (800, 600), FITS_CUBE: (720, 540)}
CRVAL = (150.1191666667, 2.2058333333)
CD = (("CD1_1", -5.55e-05), ("CD1_2", 2.1e-06), ("CD2_1", 2.1e-06), ("CD2_2", 5.55e-05))

#: The tiles Leaflet currently shows (of the current zoom level) and whether all are loaded.
CURRENT_TILES = """() => {
  const tiles = Object.values(layer._tiles).filter(t => t.current);
  return {count: tiles.length, loaded: tiles.every(t => t.loaded && t.el.complete),
          urls: tiles.map(t => t.el.src)};
}"""
#: The screen rectangle covered by the current tiles, clipped to the map.
TILE_RECT = """() => {
  const map_rect = document.getElementById('map').getBoundingClientRect();
  const rects = Object.values(layer._tiles).filter(t => t.current && t.loaded)
    .map(t => t.el.getBoundingClientRect());
  const left = Math.max(map_rect.left, Math.min(...rects.map(r => r.left)));
  const top = Math.max(map_rect.top, Math.min(...rects.map(r => r.top)));
  const right = Math.min(map_rect.right, Math.max(...rects.map(r => r.right)));
  const bottom = Math.min(map_rect.bottom, Math.max(...rects.map(r => r.bottom)));
  return [left, top, right, bottom];
}"""
#: pip and npm give up after one retry (and 20 s without an answer) when the registries are
#: unreachable, unless the environment says otherwise.
REGISTRY_PATIENCE = {
    "PIP_RETRIES": "1",
    "PIP_DEFAULT_TIMEOUT": "20",
    "npm_config_fetch_retries": "1",
    "npm_config_fetch_timeout": "20000",
}
#: Screen position (CSS pixels, in the page) of the centre of FITS pixel (x, y): 1-based, y up.
FITS_TO_SCREEN = """([x, y]) => {
  const p = map.latLngToContainerPoint(map.options.crs.unproject(L.point(x, y)));
  const r = document.getElementById('map').getBoundingClientRect();
  return [p.x + r.left, p.y + r.top];
}"""
FRAMES = "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"


# -- images ------------------------------------------------------------------------------------


def fits_card(key: str, value: bool | int | float | str) -> str:
    """One 80-column FITS card, fixed format (value right-aligned to column 30)."""
    if isinstance(value, bool):
        text = f"{'T' if value else 'F':>20}"
    elif isinstance(value, int):
        text = f"{value:>20d}"
    elif isinstance(value, float):
        text = f"{repr(value).upper():>20}"
    else:
        text = f"{chr(39) + value.ljust(8) + chr(39):<20}"
    return f"{key:<8}= {text}".ljust(80)


def stiff_header(width: int, height: int, channels: int) -> str:
    """A STIFF-style FITS header: cards concatenated, END, padded to 2880 bytes."""
    cards = [
        fits_card("SIMPLE", True),
        fits_card("BITPIX", -32),
        fits_card("NAXIS", 3 if channels > 1 else 2),
        fits_card("NAXIS1", width),
        fits_card("NAXIS2", height),
        *([fits_card("NAXIS3", channels)] if channels > 1 else []),
        fits_card("OBJECT", "VM3FIELD"),
        fits_card("CTYPE1", "RA---TAN"),
        fits_card("CTYPE2", "DEC--TAN"),
        fits_card("CRPIX1", width / 2 + 0.5),
        fits_card("CRPIX2", height / 2 + 0.5),
        fits_card("CRVAL1", CRVAL[0]),
        fits_card("CRVAL2", CRVAL[1]),
        *(fits_card(key, value) for key, value in CD),
    ]
    text = "".join(cards) + "END".ljust(80)
    return text.ljust(-(-len(text) // 2880) * 2880)


@pytest.fixture(scope="module")
def image_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """The data folder and the full-resolution arrays (top row first, as stored)."""
    root = tmp_path_factory.mktemp("vm3-data")
    data = {
        SINGLE: star_field(*SIZES[SINGLE], seed=53),
        CUBE: star_field(*SIZES[CUBE], seed=59, channels=3),
    }
    for name, array in data.items():
        channels = 1 if array.ndim == 2 else array.shape[2]
        header = stiff_header(array.shape[1], array.shape[0], channels)
        assert len(header) % 2880 == 0
        extra = {"photometric": "minisblack", "planarconfig": "contig"} if channels > 1 else {}
        write_pyramid(root / name, pyramid_levels(array), description=header, **extra)
    return root, data


@pytest.fixture(scope="module")
def fits_cube(image_set: tuple[Path, dict[str, np.ndarray]]) -> np.ndarray:
    """A 3-plane float32 FITS cube with a TAN WCS, written into the data folder with astropy
    (planes ``(c, h, w)``, the top image row last, as FITS stores it); returns it as
    ``(h, w, c)``, top row first."""
    astropy_fits = pytest.importorskip("astropy.io.fits")
    width, height = SIZES[FITS_CUBE]
    cube = star_field(width, height, seed=71, channels=3)
    hdu = astropy_fits.PrimaryHDU(np.ascontiguousarray(np.moveaxis(cube, 2, 0)[:, ::-1]))
    hdu.header.update(
        {
            "OBJECT": "VM3FIELD",
            "CTYPE1": "RA---TAN",
            "CTYPE2": "DEC--TAN",
            "CRPIX1": width / 2 + 0.5,
            "CRPIX2": height / 2 + 0.5,
            "CRVAL1": CRVAL[0],
            "CRVAL2": CRVAL[1],
            **dict(CD),
        }
    )
    hdu.writeto(image_set[0] / FITS_CUBE)
    return cube


# -- the client, the server, the browser ------------------------------------------------------


@pytest.fixture(scope="session")
def client_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The VisiOmatic 3 client, fetched from PyPI and npm once per session."""
    directory = tmp_path_factory.mktemp("vm3-client") / "client"
    try:
        with pytest.MonkeyPatch.context() as patch:  # fail fast when offline
            for name, value in REGISTRY_PATIENCE.items():
                patch.setenv(name, os.environ.get(name, value))
            client.fetch(directory)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot fetch the VisiOmatic client from PyPI/npm (offline?): {exc!r}")
    assert client.installed(directory)
    return directory


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    base: str
    stderr_path: Path
    pyramids: Path  # PYRAMID_CACHE_DIR

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def server(
    browser: Browser,
    client_dir: Path,
    image_set: tuple[Path, dict[str, np.ndarray]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    """``iipserver serve --port 0 --workers 1 <data>`` with the fetched client (browser first:
    without Chromium the tests skip before fetching anything or starting a server)."""
    work = tmp_path_factory.mktemp("vm3-server")
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "VIRTUAL_ENV", "TMPDIR")
    env = {k: v for k, v in os.environ.items() if k in keep or k.startswith("PYENV")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env.update(
        IIPSERVER_CLIENT_DIR=str(client_dir),
        XDG_CACHE_HOME=str(work / "xdg-cache"),
        PYRAMID_CACHE_DIR=str(work / "pyramids"),
        VERBOSITY="2",
        OMP_NUM_THREADS="1",
    )
    stdout_path, stderr_path = work / "server.out", work / "server.err"
    command = [sys.executable, "-m", "iipserver", "serve", "--port", "0", "--workers", "1"]
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [*command, str(image_set[0])],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
            cwd=work,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (match := BANNER.search(stdout_path.read_text(errors="replace"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no banner (exit {proc.poll()}):\n{stderr_path.read_text()}")
            time.sleep(0.02)
        yield Server(proc, f"http://{match['address']}", stderr_path, work / "pyramids")
    finally:
        workers = _children(proc.pid) if proc.poll() is None else set()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        for pid in workers:  # normally gone already: they follow their parent
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# -- what the page does -----------------------------------------------------------------------


@dataclass
class Recorder:
    """Every response from the server, and everything the page failed at or complained about."""

    base: str
    pending: set[Request] = field(default_factory=set)
    responses: list[Response] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        page.on("request", self._started)
        page.on("requestfinished", self._finished)
        page.on("requestfailed", self._failed)
        page.on("response", self._response)
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        page.on("dialog", self._dialog)

    def _started(self, request: Request) -> None:
        self.pending.add(request)

    def _finished(self, request: Request) -> None:
        self.pending.discard(request)

    def _failed(self, request: Request) -> None:
        self.pending.discard(request)
        self.problems.append(f"request failed: {request.url}: {request.failure}")

    def _response(self, response: Response) -> None:
        if not response.url.startswith(self.base):
            return
        self.responses.append(response)
        if response.status != 200 and urlsplit(response.url).path != "/favicon.ico":
            self.problems.append(f"{response.status} {response.url}")

    def _console(self, message: ConsoleMessage) -> None:
        url = message.location.get("url", "")
        if message.type == "error" and not url.endswith("/favicon.ico"):
            self.problems.append(f"console error: {message.text} ({url})")

    def _dialog(self, dialog: Dialog) -> None:
        self.problems.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def api(self, key: str) -> list[Response]:
        """Responses of /api requests carrying the parameter ``key``."""
        return [r for r in self.responses if "/api?" in r.url and key in query(r.url)]

    def tiles(self, **params: str) -> list[Response]:
        """JTL responses whose URL carries these parameter values."""
        return [
            r for r in self.api("JTL") if all(query(r.url).get(k) == [v] for k, v in params.items())
        ]


def query(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query, keep_blank_values=True)


def wait_until(page: Page, predicate: Callable[[], object], what: str) -> None:
    """Poll ``predicate`` (while Playwright delivers the page's events) until true."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        page.wait_for_timeout(25)


def settle(page: Page, recorder: Recorder) -> None:
    """Wait until no request has been in flight for a while and Leaflet's current tiles are all
    loaded, then for two animation frames."""
    deadline = time.monotonic() + WAIT_MS / 1000
    quiet = 0
    while quiet < 4:
        page.wait_for_timeout(40)
        busy = recorder.pending or not page.evaluate(CURRENT_TILES)["loaded"]
        quiet = 0 if busy else quiet + 1
        if time.monotonic() > deadline:
            raise AssertionError(f"still busy: {[r.url for r in recorder.pending]}")
    page.evaluate(FRAMES)


def redraw(page: Page, recorder: Recorder, script: str, marker: str) -> None:
    """Change the layer's settings, redraw, and wait until every current tile shows ``marker``."""
    page.evaluate(f"() => {{ {script}; layer.redraw(); }}")
    wait_until(
        page,
        lambda: all(marker in url for url in page.evaluate(CURRENT_TILES)["urls"]),
        f"tiles with {marker}",
    )
    settle(page, recorder)


def screenshot(page: Page) -> np.ndarray:
    """Luminance of a screenshot of the page (one pixel per CSS pixel)."""
    shot = imagecodecs.png_decode(page.screenshot())
    assert shot.shape[:2] == (VIEWPORT["height"], VIEWPORT["width"]), shot.shape
    return shot[..., :3].astype(np.float64) @ [0.299, 0.587, 0.114]


def luminance(page: Page, rect: list[float]) -> np.ndarray:
    """Luminance of the central half of ``rect`` (CSS pixels) in a screenshot of the page."""
    left, top, right, bottom = rect
    dx, dy = (right - left) / 4, (bottom - top) / 4
    crop = screenshot(page)[int(top + dy) : int(bottom - dy), int(left + dx) : int(right - dx)]
    assert crop.shape[0] > 50 and crop.shape[1] > 50, (rect, crop.shape)
    return crop


def assert_not_uniform(lum: np.ndarray, what: str) -> None:
    stats = dict(mean=lum.mean(), std=lum.std(), lo=lum.min(), hi=lum.max())
    assert lum.std() > 1.0 and lum.max() - lum.min() > 40, f"{what}: uniform map area: {stats}"
    assert len(np.unique(np.round(lum))) > 20, f"{what}: too few grey levels: {stats}"


def jpeg_tiles(
    responses: list[Response], what: str, meta: dict[str, Any] | None = None
) -> list[np.ndarray]:
    """Check 200 image/jpeg, decode, and (given the INFO reply) check the tile sizes: edge tiles
    are cropped (visiomatic.md §2.2: the v3 client shows tiles at their natural size)."""
    bad = [
        f"{r.status} {r.headers.get('content-type')} {r.url}"
        for r in responses
        if r.status != 200 or r.headers.get("content-type") != "image/jpeg"
    ]
    assert not bad, f"{what}: tiles not answered 200 image/jpeg: {bad}"
    tiles = [imagecodecs.jpeg_decode(r.body()) for r in responses]
    if meta is not None:
        wrong = [
            (r.url, t.shape[:2], shape)
            for r, t in zip(responses, tiles, strict=True)
            if t.shape[:2] != (shape := tile_shape(meta, query(r.url)["JTL"][0]))
        ]
        assert not wrong, f"{what}: tile sizes (url, got, expected): {wrong}"
    return tiles


def tile_shape(meta: dict[str, Any], jtl: str) -> tuple[int, int]:
    """(height, width) of tile ``JTL=level,index``, by the client's floor halvings."""
    level, index = (int(v) for v in jtl.split(","))
    (width, height), (tw, th) = meta["full_size"], meta["tile_size"]
    shift = meta["tile_levels"] - 1 - level
    lw, lh = width >> shift, height >> shift
    columns = -(-lw // tw)
    x, y = index % columns, index // columns
    return min(th, lh - y * th), min(tw, lw - x * tw)


def pixel(data: np.ndarray, x: int, y: int, channel: int) -> float:
    """The value at 0-based FITS coordinates (x, y up) of a (h, w[, c]) array."""
    value = data[data.shape[0] - 1 - y, x]
    return float(value if data.ndim == 2 else value[channel])


def open_tab(page: Page, pane: str) -> None:
    """Open a pane of the side bar, as a person would (the side bar starts collapsed)."""
    if page.locator(".sidebar.collapsed").count():
        page.get_by_title("Toggle advanced menu").click()
    page.locator(f"#{pane}-toggle").click()
    page.locator(f"#{pane}.active").wait_for()


# -- the tests --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    image: str
    mode: str
    channel: int  # 0-based, as the page's query takes it

    @property
    def colour(self) -> bool:
        return self.mode == "color"


CASES = [
    Case(SINGLE, "mono", 0),
    Case(CUBE, "mono", 1),
    Case(CUBE, "color", 0),
    Case(FITS_CUBE, "color", 0),
]
CASE_IDS = ["single-mono", "cube-mono-chan2", "cube-colour", "fits-cube-colour"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_visiomatic3_client(
    case: Case,
    browser: Browser,
    server: Server,
    image_set: tuple[Path, dict[str, np.ndarray]],
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    fits = case.image == FITS_CUBE
    data = request.getfixturevalue("fits_cube") if fits else image_set[1][case.image]
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    recorder = Recorder(server.base)
    recorder.attach(page)
    try:
        url = f"{server.base}/visiomatic?image={case.image}&mode={case.mode}"
        response = page.goto(url + (f"&channel={case.channel}" if case.channel else ""))
        assert response is not None and response.status == 200
        page.wait_for_function("() => window.layer && layer.visio && layer.visio.metaReady")
        page.wait_for_load_state("networkidle")
        settle(page, recorder)
        meta = check_opened(page, recorder, case, data)
        rect = check_zoom(page, recorder, meta, data)
        check_settings(page, recorder, case, rect, meta)
        check_pixel_value(page, recorder, case, data)
        check_profile(page, recorder, case, data)
        check_snapshot(page, data, tmp_path)
        settle(page, recorder)
    except Exception as exc:  # an alert or a page error is often the cause: show them too
        exc.add_note(f"page problems so far: {recorder.problems}")
        raise
    finally:
        context.close()
    assert recorder.problems == []
    if fits:
        check_fits_pyramid(server, data)
    stderr = server.stderr()
    assert "Traceback" not in stderr and " ERROR" not in stderr, stderr


def check_fits_pyramid(server: Server, data: np.ndarray) -> None:
    """The FITS cube's reduced tiles were computed from their footprints while one background
    build filled PYRAMID_CACHE_DIR: one complete entry for the cube, its levels built once."""
    height, width = data.shape[:2]
    levels = 1
    while width > 256 or height > 256:
        width, height, levels = width // 2, height // 2, levels + 1
    wait_for(
        lambda: (
            server.pyramids.is_dir()
            and any((e / "meta.json").exists() for e in server.pyramids.iterdir())
        ),
        WAIT_MS / 1000,
        "the FITS pyramid build",
    )
    (entry,) = [e for e in server.pyramids.iterdir() if e.is_dir()]
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["image"].endswith(FITS_CUBE) and meta["channels"] == 3, meta
    built = sorted(int(line.split()[0]) for line in (entry / "builds.log").read_text().splitlines())
    assert built == list(range(levels - 1)), built
    assert not [p.name for p in entry.iterdir() if p.name.startswith("tmp-")]


def check_opened(page: Page, recorder: Recorder, case: Case, data: np.ndarray) -> dict[str, Any]:
    """INFO answered with the image's facts; the first tiles were JPEGs and were drawn."""
    (info,) = recorder.api("INFO")
    assert info.status == 200 and info.headers["content-type"].startswith("application/json")
    meta = info.json()
    height, width = data.shape[:2]
    assert meta["type"] == "visiomatic"
    assert meta["full_size"] == [width, height]
    assert meta["channels"] == (1 if data.ndim == 2 else data.shape[2])
    assert meta["header"]["CTYPE1"] == "RA---TAN" and meta["object_name"] == "VM3FIELD"
    assert page.evaluate("() => layer.visio.nChannel") == meta["channels"]
    # The WCS comes from the header: a TAN projection centred on CRVAL (CRPIX is the centre).
    wcs = page.evaluate("() => [layer.wcs.code, layer.wcs.pixelFlag, layer.wcs.centerLatLng]")
    assert wcs[0] == "WCS:TAN" and not wcs[1], wcs
    assert (wcs[2]["lng"], wcs[2]["lat"]) == pytest.approx(CRVAL, abs=1e-4), wcs

    tiles = recorder.api("JTL")
    assert len(tiles) >= 4, [r.url for r in tiles]
    for tile in jpeg_tiles(tiles, "first view", meta):
        assert tile.ndim == (3 if case.colour else 2), tile.shape
    for r in tiles:
        q = query(r.url)
        if case.colour:
            assert "CHAN" not in q and len(q["MIX"]) == 3, r.url
        else:
            assert q["CHAN"] == [str(case.channel + 1)] and "MIX" not in q, r.url
    lum = luminance(page, page.evaluate(TILE_RECT))
    assert_not_uniform(lum, "first view")
    return meta


def check_zoom(
    page: Page, recorder: Recorder, meta: dict[str, Any], data: np.ndarray
) -> list[float]:
    """One zoom step in (to full resolution): tiles of the next level are requested, answered
    and drawn, and the stars are where the client's WCS puts them."""
    before = max(int(query(r.url)["JTL"][0].split(",")[0]) for r in recorder.api("JTL"))
    zoom = page.evaluate("() => map.getZoom()")
    page.evaluate("() => map.setZoom(map.getZoom() + 1)")
    wait_until(
        page,
        lambda: any(
            int(query(r.url)["JTL"][0].split(",")[0]) > before for r in recorder.api("JTL")
        ),
        "tiles of a higher level",
    )
    settle(page, recorder)
    assert page.evaluate("() => map.getZoom()") == zoom + 1
    higher = [r for r in recorder.api("JTL") if int(query(r.url)["JTL"][0].split(",")[0]) > before]
    assert len(higher) >= 4
    jpeg_tiles(higher, "zoomed in", meta)
    assert page.evaluate("() => layer._tileZoom") == meta["tile_levels"] - 1
    rect = page.evaluate(TILE_RECT)
    assert_not_uniform(luminance(page, rect), "zoomed in")
    check_stars(page, data)
    return rect


def check_stars(page: Page, data: np.ndarray) -> None:
    """The brightest pixels of the image are drawn bright where the client's coordinate
    transformation (FITS pixels, y up) puts them on the screen: tiles, rows and the y axis
    agree between the server and the client."""
    lum = screenshot(page)
    flat = data if data.ndim == 2 else data.sum(axis=2)
    height = flat.shape[0]
    rows, cols = np.unravel_index(np.argsort(flat, axis=None)[::-1][:400], flat.shape)
    seen = []
    for row, col in zip(rows.tolist(), cols.tolist(), strict=True):
        x, y = page.evaluate(FITS_TO_SCREEN, [col + 1, height - row])
        # away from the controls (zoom bar on the left, coordinates and values on the right)
        if 60 <= x < VIEWPORT["width"] - 10 and 100 <= y < VIEWPORT["height"] - 30:
            seen.append(lum[int(y) - 1 : int(y) + 2, int(x) - 1 : int(x) + 2].max())
    assert len(seen) >= 20, len(seen)
    sky = float(np.median(lum[100:-30, 60:-10]))
    assert np.median(seen) > sky + 100, (sky, np.percentile(seen, [10, 50, 90]))


def check_settings(
    page: Page, recorder: Recorder, case: Case, rect: list[float], meta: dict[str, Any]
) -> None:
    """Contrast brightens the view; gamma and the colour map reach the tile URLs."""
    before = luminance(page, rect)
    redraw(page, recorder, "layer.visio.contrast = 3", "CNT=3")
    contrasted = recorder.tiles(CNT="3")
    assert len(contrasted) >= 4
    jpeg_tiles(contrasted, "CNT=3", meta)
    after = luminance(page, rect)
    assert_not_uniform(after, "CNT=3")
    assert after.mean() > before.mean() + 5, (before.mean(), after.mean())

    script = "layer.visio.gamma = 1.5; layer.visio.cMap = 'hot'"
    redraw(page, recorder, script + ("; layer.updateMix()" if case.colour else ""), "CMP=hot")
    hot = recorder.tiles(CNT="3", GAM="1.5000", CMP="hot")
    assert len(hot) >= 4, [r.url for r in recorder.api("JTL")][-8:]
    decoded = jpeg_tiles(hot, "CMP=hot", meta)
    assert all(t.ndim == 3 and t.shape[2] == 3 for t in decoded)
    spread = max(float(np.abs(t[..., 0].astype(int) - t[..., 2]).max()) for t in decoded)
    if not case.colour:  # the hot map is red before blue; colour mode ignores CMP
        assert spread > 64, spread
    assert_not_uniform(luminance(page, rect), "CMP=hot")


def check_pixel_value(page: Page, recorder: Recorder, case: Case, data: np.ndarray) -> None:
    """Panning makes the pixel-values control ask VAL at the centre; it shows the number."""
    count = len(recorder.api("VAL"))
    page.evaluate("() => map.panBy([40, 25], {animate: false})")
    wait_until(page, lambda: len(recorder.api("VAL")) > count, "a VAL request after panning")
    settle(page, recorder)
    reply = recorder.api("VAL")[-1]
    q = query(reply.url)
    assert reply.status == 200 and reply.headers["content-type"].startswith("application/json")
    assert q["CHAN"] == [str(case.channel + 1)], reply.url
    body = reply.json()
    assert set(body) == {"values"} and len(body["values"]) == 1, body
    (value,) = body["values"]
    assert isinstance(value, float | int), body
    x, y = (int(v) for v in q["VAL"][0].split(","))
    assert value == pytest.approx(pixel(data, x - 1, y - 1, case.channel), rel=1e-6), reply.url
    shown = page.locator(".leaflet-control-values-input").input_value()
    number, unit = shown.split()  # value.toPrecision(6) and the unit (no BUNIT: ADU)
    assert float(number) == pytest.approx(value, rel=1e-5) and unit == "ADU", shown


def check_profile(page: Page, recorder: Recorder, case: Case, data: np.ndarray) -> None:
    """Start a profile line, drag the map, end it: PFL answered and plotted."""
    open_tab(page, "visiomatic-profile")
    page.get_by_title("Start drawing a profile line").click()
    box = page.locator("#map").bounding_box()
    assert box is not None
    x0, y0 = box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.5
    page.mouse.move(x0, y0)
    page.mouse.down()
    for step in range(1, 11):
        page.mouse.move(x0 - 12 * step, y0 - 5 * step)
    page.mouse.up()
    with page.expect_response(lambda r: "PFL=" in r.url) as pfl:
        page.get_by_title("End line and plot").click()
    reply = pfl.value
    assert reply.status == 200 and reply.headers["content-type"].startswith("application/json")
    q = query(reply.url)
    assert q["CHAN"] == (["1", "2", "3"] if case.colour else [str(case.channel + 1)]), reply.url
    profile = reply.json()["profile"]
    assert len(profile) > 20, reply.url  # the line was dragged over ~130 screen pixels
    channels = [0, 1, 2] if case.colour else [case.channel]
    for point in profile:
        assert len(point["values"]) == len(channels), point
        expected = [pixel(data, point["x"], point["y"], c) for c in channels]
        assert point["values"] == pytest.approx(expected, rel=1e-6), point
    page.locator(".visiomatic-profile-plot canvas").wait_for()
    settle(page, recorder)


def check_snapshot(page: Page, data: np.ndarray, tmp_path: Path) -> None:
    """The snapshot button: RGN=…&BIN=… answered with a JPEG, offered as a download."""
    open_tab(page, "visiomatic-snapshot")
    with page.expect_download() as download, page.expect_response(lambda r: "RGN=" in r.url) as rgn:
        page.get_by_title("Snap the image within the current frame").click()
    reply = rgn.value
    q = query(reply.url)
    assert "BIN" in q and "CNT" in q and "JTL" not in q, reply.url
    assert reply.status == 200 and reply.headers["content-type"] == "image/jpeg", reply.url
    # The client reads the reply as a blob and offers it as a download; Chromium keeps no copy
    # for Playwright (Response.body() is empty), so the downloaded file is what gets checked.
    saved = tmp_path / "snapshot.jpg"
    download.value.save_as(saved)
    blob = saved.read_bytes()
    assert len(blob) == int(reply.headers["content-length"]), reply.url
    snap = imagecodecs.jpeg_decode(blob)
    x1, y1, x2, y2 = (int(v) for v in re.split("[,:]", q["RGN"][0]))
    binning = int(q["BIN"][0])
    assert binning == 1, reply.url  # at full resolution, "current" binning is 1
    # The frame, in full-resolution pixels from the top left, clipped to the image.
    width = min(x2, data.shape[1]) - max(x1, 0)
    height = min(y2, data.shape[0]) - max(y1, 0)
    assert width > 100 and height > 100, reply.url
    assert abs(snap.shape[1] - width) <= 1 and abs(snap.shape[0] - height) <= 1, (snap.shape, q)
    assert snap.ndim == 3, snap.shape  # CMP=hot (mono) or MIX (colour): RGB
    assert_not_uniform(snap.astype(np.float64) @ [0.299, 0.587, 0.114], "snapshot")
