"""Real-browser tests of third-party viewers on iipserver's IIIF, DeepZoom and Zoomify.

OpenSeadragon 5 (IIIF Image API 3 and 2 ``info.json``, a DeepZoom ``.dzi`` descriptor, Zoomify
tiles described by ``ImageProperties.xml``) and Leaflet 1.9.4 with Leaflet-IIIF 3 (IIIF 2 and 3)
are fetched from npm once per session into a temporary folder (``npm pack``, or the registry's
tarballs when npm fails) and never committed. Small HTML pages using them are served by a
separate ``http.server`` on another port, so that every request to iipserver is cross-origin
(the servers run with ``CORS=*``; OpenSeadragon and Leaflet load tiles with
``crossOrigin="anonymous"``). Two ``python -m iipserver serve`` processes serve one generated
RGB pyramid: the default (IIIF 3) and one with ``IIIF_VERSION=2``.

Each page exposes the same small API to the test (``ready()``, ``zoomIn()``, ``toImage()``,
``controls()``, ``problems``), so every viewer is checked in the same way: no failed request,
no non-2xx response, no console error and no page error; the first view loads completely, its
screenshot shows the image's colour blocks where the viewer says the image is; zooming in
requests tiles of a finer level than before, which load and show the right blocks too.

The test image is a grid of 100 × 100 blocks of distinct colours: at any screen point that the
viewer maps to a block's interior, the screenshot must show that block's colour (within JPEG
tolerance), which fails on a blank or uniform view, on misplaced or mis-scaled tiles and on
swapped channels.

Skipped when ``/usr/bin/chromium`` (Debian package ``chromium``), the ``playwright`` module or
the npm registry is missing. Playwright's own browsers are never used.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import imagecodecs
import numpy as np
import pytest
from images import pyramid_levels, write_pyramid
from processes import children as _children

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page, Request, Response

sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="the playwright module is not installed (pip install -e '.[test]')",
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
BANNER = re.compile(r"server on http://(?P<address>\S+?)/?[,)]")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 8.0
WAIT_MS = 15_000
VIEWPORT = {"width": 660, "height": 500}
#: The viewer's element, at the page's top left corner. OpenSeadragon fits the image at 0.43 of
#: its full size, so that (with its minPixelRatio of 0.5) zooming in needs the full level.
VIEWER = (640, 480)

#: The test image: WIDTH × HEIGHT, blocks of BLOCK × BLOCK pixels, one colour each.
IMAGE = "viewers.tif"
WIDTH, HEIGHT, BLOCK = 1500, 1100, 100
#: Screen points sampled every GRID pixels; only points at least MARGIN screen pixels inside a
#: block are compared (JPEG and resampling blur the edges), each channel within TOLERANCE.
GRID, MARGIN, TOLERANCE = 16, 8, 32
#: OpenSeadragon fits the image to the viewer's width: 640 × 469 of 640 × 480.
OSD_COVERAGE = 0.95

#: npm package specs, and the files each page needs from them (package path -> site path).
NPM_SPECS = {"openseadragon": "5", "leaflet": "1.9.4", "leaflet-iiif": "3"}
ASSETS = {
    "openseadragon": {
        "build/openseadragon/openseadragon.min.js": "openseadragon/openseadragon.min.js",
        "build/openseadragon/images": "openseadragon/images",
    },
    "leaflet": {"dist/leaflet.js": "leaflet/leaflet.js", "dist/leaflet.css": "leaflet/leaflet.css"},
    "leaflet-iiif": {"leaflet-iiif.js": "leaflet-iiif/leaflet-iiif.js"},
}
REGISTRY = "https://registry.npmjs.org"
#: npm gives up after one retry (and 20 s without an answer) when the registry is unreachable,
#: unless the environment says otherwise.
REGISTRY_PATIENCE = {
    "npm_config_fetch_retries": "1",
    "npm_config_fetch_timeout": "20000",
    "npm_config_update_notifier": "false",
    "npm_config_fund": "false",
    "npm_config_audit": "false",
}
FRAMES = "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"


def block_colour(bx: np.ndarray | int, by: np.ndarray | int) -> np.ndarray:
    """RGB of block (bx, by): horizontal neighbours differ by 53 in red (and 71 in blue),
    vertical ones by 97 in green (and 142 in blue), modulo 200."""
    bx, by = np.asarray(bx), np.asarray(by)
    return np.stack(
        [(bx * 53) % 200 + 30, (by * 97) % 200 + 30, ((bx + 2 * by) * 71) % 200 + 30], axis=-1
    ).astype(np.uint8)


# -- the viewers, from npm ------------------------------------------------------------------


def _matching_version(spec: str, versions: list[str]) -> str:
    """The highest release version equal to ``spec`` or in its major (``"5"``) series."""
    releases = [v for v in versions if re.fullmatch(r"\d+\.\d+\.\d+", v)]
    if spec in releases:
        return spec
    series = [v for v in releases if v.split(".")[0] == spec]
    if not series:
        raise RuntimeError(f"no release matching {spec!r}")
    return max(series, key=lambda v: tuple(int(p) for p in v.split(".")))


def _download_tarball(name: str, spec: str, into: Path) -> Path:
    """The registry's tarball for ``name@spec`` (checked against its SHA-1), without npm."""
    request = urllib.request.Request(
        f"{REGISTRY}/{name}", headers={"Accept": "application/vnd.npm.install-v1+json"}
    )
    with urllib.request.urlopen(request, timeout=20) as response:
        document = json.load(response)
    dist = document["versions"][_matching_version(spec, list(document["versions"]))]["dist"]
    with urllib.request.urlopen(dist["tarball"], timeout=60) as response:
        data = response.read()
    if hashlib.sha1(data).hexdigest() != dist["shasum"]:
        raise RuntimeError(f"{dist['tarball']}: SHA-1 mismatch")
    path = into / dist["tarball"].rsplit("/", 1)[1]
    path.write_bytes(data)
    return path


def _npm_pack(into: Path) -> dict[str, Path]:
    """``npm pack`` of every package into ``into``: {name: tarball}."""
    env = {**REGISTRY_PATIENCE, **os.environ}
    specs = [f"{name}@{spec}" for name, spec in NPM_SPECS.items()]
    result = subprocess.run(
        ["npm", "pack", "--json", "--pack-destination", str(into), *specs],
        cwd=into,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    packed = {entry["name"]: into / entry["filename"] for entry in json.loads(result.stdout)}
    if set(packed) != set(NPM_SPECS) or not all(p.is_file() for p in packed.values()):
        raise RuntimeError(f"npm pack gave {packed}")
    return packed


@dataclass
class Viewers:
    """The fetched viewers: the site folder the page server serves, and their versions."""

    site: Path
    versions: dict[str, str]


@pytest.fixture(scope="session")
def viewers(tmp_path_factory: pytest.TempPathFactory) -> Viewers:
    """OpenSeadragon, Leaflet and Leaflet-IIIF from npm, unpacked into a fresh site folder."""
    work = tmp_path_factory.mktemp("viewers-npm")
    try:
        tarballs = _npm_pack(work)
    except (OSError, ValueError, KeyError, subprocess.SubprocessError) as npm_error:
        try:
            tarballs = {n: _download_tarball(n, s, work) for n, s in NPM_SPECS.items()}
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            pytest.skip(
                f"cannot fetch the viewers from npm (offline?): npm: {npm_error!r}; "
                f"{REGISTRY}: {exc!r}"
            )
    site = tmp_path_factory.mktemp("viewers-site")
    versions = {}
    for name, tarball in tarballs.items():
        unpacked = work / f"{name}-unpacked"
        with tarfile.open(tarball) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(unpacked, filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                tar.extractall(unpacked)
        package = unpacked / "package"
        versions[name] = json.loads((package / "package.json").read_text())["version"]
        for source, target in ASSETS[name].items():
            (site / target).parent.mkdir(parents=True, exist_ok=True)
            if (package / source).is_dir():
                shutil.copytree(package / source, site / target)
            else:
                shutil.copyfile(package / source, site / target)
    assert versions["openseadragon"].split(".")[0] == NPM_SPECS["openseadragon"], versions
    assert versions["leaflet"] == NPM_SPECS["leaflet"], versions
    return Viewers(site, versions)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Site:
    """The page server: static files (the viewers and the pages written by the tests)."""

    root: Path
    base: str

    def page(self, name: str, html: str) -> str:
        """Write the page ``name`` and return its URL."""
        (self.root / name).write_text(html)
        return f"{self.base}/{name}"


@pytest.fixture(scope="module")
def site(viewers: Viewers) -> Iterator[Site]:
    """``http.server`` over the site folder, on a free port, in a thread."""
    handler = functools.partial(_QuietHandler, directory=str(viewers.site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Site(viewers.site, f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# -- the image, the servers, the browser -------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data folder: one RGB pyramid (1500 × 1100, tiles 256, four levels)."""
    root = tmp_path_factory.mktemp("viewers-data")
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    full = block_colour(xx // BLOCK, yy // BLOCK)
    levels = pyramid_levels(full)
    assert [lv.shape[:2] for lv in levels] == [(1100, 1500), (550, 750), (275, 375), (137, 187)]
    write_pyramid(root / IMAGE, levels, photometric="rgb", compression="jpeg")
    return root


@dataclass
class Server:
    """One running ``iipserver serve``."""

    proc: subprocess.Popen[bytes]
    base: str
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def _stop(proc: subprocess.Popen[bytes]) -> None:
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


def _healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def servers(
    browser: Browser, viewers: Viewers, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[int, Server]]:
    """Two ``iipserver serve --port 0 --workers 1`` over ``data_dir``, with ``CORS=*``: the
    default IIIF version (3) and ``IIIF_VERSION=2``. (Browser and viewers first: without them
    the tests skip before starting anything.)"""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "VIRTUAL_ENV", "TMPDIR")
    base_env = {k: v for k, v in os.environ.items() if k in keep or k.startswith("PYENV")}
    base_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p
    )
    base_env.update(IIPSERVER_CLIENT_FETCH="0", CORS="*", VERBOSITY="2", OMP_NUM_THREADS="1")
    started: dict[int, tuple[subprocess.Popen[bytes], Path, Path]] = {}
    try:
        for version in (3, 2):
            work = tmp_path_factory.mktemp(f"viewers-iiif{version}")
            env = {**base_env, "XDG_CACHE_HOME": str(work / "xdg-cache")}
            if version == 2:
                env["IIIF_VERSION"] = "2"
            out_path, err_path = work / "server.out", work / "server.err"
            command = [sys.executable, "-m", "iipserver", "serve", "--port", "0", "--workers", "1"]
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                proc = subprocess.Popen(
                    [*command, str(data_dir)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env=env,
                    cwd=work,
                )
            started[version] = (proc, out_path, err_path)
        running = {}
        deadline = time.monotonic() + START_TIMEOUT
        for version, (proc, out_path, err_path) in started.items():
            while not (match := BANNER.search(out_path.read_text(errors="replace"))):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"IIIF {version} server: no banner (exit {proc.poll()}):\n"
                        f"{err_path.read_text(errors='replace')}"
                    )
                time.sleep(0.02)
            running[version] = Server(proc, f"http://{match['address']}", err_path)
            while not _healthy(running[version].base):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"IIIF {version} server: /health never answered")
                time.sleep(0.05)
        yield running
    finally:
        for proc, _, _ in started.values():
            _stop(proc)


# -- the pages ------------------------------------------------------------------------------

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<link rel="icon" href="data:,">
{head}
<style>html, body {{ margin: 0; background: #fff; }}
#viewer {{ width: {width}px; height: {height}px; background: #000; }}</style>
</head><body><div id="viewer"></div>
<script>
window.problems = [];
const relative = (r, v) => [r.left - v.left, r.top - v.top, r.right - v.left, r.bottom - v.top];
{script}
</script></body></html>
"""

#: OpenSeadragon: ``SOURCE`` is a tile source (an info.json or .dzi URL, or an object), or a
#: promise of one. Tiles are fetched with CORS; the viewer zooms in without animation.
OSD_HEAD = '<script src="openseadragon/openseadragon.min.js"></script>'
OSD_SCRIPT = """
const viewer = OpenSeadragon({
  id: "viewer", prefixUrl: "openseadragon/images/", crossOriginPolicy: "Anonymous",
});
viewer.addHandler("open-failed", e => problems.push("open-failed: " + e.message));
viewer.addHandler("tile-load-failed",
                  e => problems.push("tile-load-failed: " + e.message + " " + e.tile.getUrl()));
Promise.resolve(SOURCE).then(source => viewer.open(source))
  .catch(e => problems.push("source: " + e));
window.ready = () => viewer.world.getItemCount() === 1
  && viewer.world.getItemAt(0).getFullyLoaded() && !viewer.world.needsDraw();
window.zoomIn = () => { viewer.viewport.zoomBy(4, null, true); viewer.viewport.applyConstraints(true); };
window.toImage = points => points.map(([x, y]) => {
  const p = viewer.viewport.viewerElementToImageCoordinates(new OpenSeadragon.Point(x, y));
  return [p.x, p.y];
});
window.controls = () => {
  const v = viewer.element.getBoundingClientRect();
  return viewer.navControl ? [relative(viewer.navControl.getBoundingClientRect(), v)] : [];
};
window.state = () => ({drawer: viewer.drawer.getType(), zoom: viewer.viewport.getZoom(true)});
"""

#: Leaflet with Leaflet-IIIF: ``INFO`` is the info.json URL. No animations (tiles show at once).
#: Zooming in goes two zoom levels up: from the fitted 375 × 275 (scale factor 4) to the full size.
LEAFLET_HEAD = """<link rel="stylesheet" href="leaflet/leaflet.css">
<script src="leaflet/leaflet.js"></script>
<script src="leaflet-iiif/leaflet-iiif.js"></script>"""
LEAFLET_SCRIPT = """
const map = L.map("viewer", {center: [0, 0], crs: L.CRS.Simple, zoom: 0,
                             zoomAnimation: false, fadeAnimation: false});
const layer = L.tileLayer.iiif(INFO, {crossOrigin: "anonymous"}).addTo(map);
layer.on("tileerror", e => problems.push("tileerror: " + e.tile.src));
window.ready = () => {
  if (!layer._map || !layer._tiles) return false;
  const tiles = Object.values(layer._tiles).filter(t => t.current);
  return tiles.length > 0 && !layer.isLoading()
    && tiles.every(t => t.loaded && t.el.complete && t.el.naturalWidth > 0);
};
window.zoomIn = () => map.setZoom(map.getZoom() + 2, {animate: false});
window.toImage = points => points.map(([x, y]) => {
  const p = map.project(map.containerPointToLatLng(L.point(x, y)), layer.maxNativeZoom);
  return [p.x, p.y];
});
window.controls = () => {
  const v = map.getContainer().getBoundingClientRect();
  return [...document.querySelectorAll("#viewer .leaflet-control")]
    .map(c => relative(c.getBoundingClientRect(), v));
};
window.state = () => ({zoom: map.getZoom(), maxNativeZoom: layer.maxNativeZoom});
"""

#: Zoomify: OpenSeadragon's "zoomifytileservice" needs the size, read from ImageProperties.xml.
ZOOMIFY_SOURCE = """fetch(PROPERTIES).then(r => {
  if (!r.ok) throw new Error(r.status + " " + r.url);
  return r.text();
}).then(text => {
  const e = new DOMParser().parseFromString(text, "application/xml").documentElement;
  if (e.tagName !== "IMAGE_PROPERTIES") throw new Error("not ImageProperties: " + text);
  return {type: "zoomifytileservice", tilesUrl: TILES, width: +e.getAttribute("WIDTH"),
          height: +e.getAttribute("HEIGHT"), tileSize: +e.getAttribute("TILESIZE")};
})"""


def page_html(title: str, head: str, script: str, **values: str) -> str:
    """A page: ``values`` become JavaScript constants (JSON strings), then ``script`` runs."""
    constants = "".join(f"const {k} = {json.dumps(v)};\n" for k, v in values.items())
    return PAGE.format(
        title=title, head=head, script=constants + script, width=VIEWER[0], height=VIEWER[1]
    )


def osd_page(title: str, source_js: str, **values: str) -> str:
    return page_html(title, OSD_HEAD, f"const SOURCE = {source_js};\n" + OSD_SCRIPT, **values)


# -- what the page does ---------------------------------------------------------------------


@dataclass
class Recorder:
    """Every request the page made, and everything it failed at or complained about."""

    server: str  # iipserver's base URL
    pending: set[Request] = field(default_factory=set)
    requests: list[str] = field(default_factory=list)  # iipserver's, in order
    responses: list[Response] = field(default_factory=list)  # iipserver's
    bad: list[Response] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        page.on("request", self._started)
        page.on("requestfinished", self._finished)
        page.on("requestfailed", self._failed)
        page.on("response", self._response)
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))

    def _started(self, request: Request) -> None:
        self.pending.add(request)
        if request.url.startswith(self.server + "/"):
            self.requests.append(request.url)

    def _finished(self, request: Request) -> None:
        self.pending.discard(request)

    def _failed(self, request: Request) -> None:
        self.pending.discard(request)
        self.problems.append(f"request failed: {request.method} {request.url}: {request.failure}")

    def _response(self, response: Response) -> None:
        if response.url.startswith(self.server + "/"):
            self.responses.append(response)
        if not 200 <= response.status < 300 and urlsplit(response.url).path != "/favicon.ico":
            self.bad.append(response)

    def _console(self, message: ConsoleMessage) -> None:
        url = message.location.get("url", "")
        text = f"console {message.type}: {message.text} ({url})"
        if message.type == "error":
            # The page declares no icon; should Chromium still ask the page server for one,
            # its 404 is no fault of the viewer or of iipserver.
            if not (url.endswith("/favicon.ico") and "404" in message.text):
                self.problems.append(text)
        elif message.type == "warning":
            self.warnings.append(text)

    def tiles(self) -> list[tuple[str, float]]:
        """(URL, level) of every tile requested from iipserver so far."""
        return [(url, level) for url in self.requests if (level := tile_level(url)) is not None]

    def assert_clean(self, page: Page, what: str) -> None:
        """No failed request, non-2xx response, console error, page error or viewer problem."""
        problems = [*self.problems, *page.evaluate("() => window.problems")]
        for response in self.bad:
            try:
                body = response.text()[:300]
            except Exception as exc:  # the body may be gone: report what is known
                body = f"<body unavailable: {exc}>"
            problems.append(f"HTTP {response.status} {response.url}: {body!r}")
        assert not problems, f"{what}:\n" + "\n".join(problems)


def tile_level(url: str) -> float | None:
    """The resolution level of a tile URL (larger is finer; comparable within one protocol:
    DeepZoom and Zoomify levels, -log2 of the IIIF scale factor), or None if not a tile."""
    url = unquote(url)
    if match := re.search(r"[?&]DeepZoom=[^&]*_files/(\d+)/\d+_\d+\.jpg$", url):
        return int(match[1])
    if match := re.search(r"[?&]Zoomify=[^&]*/TileGroup\d+/(\d+)-\d+-\d+\.jpg$", url):
        return int(match[1])
    match = re.search(
        r"(?:/iiif/|[?&]IIIF=)[^/&]+/(?P<region>[^/]+)/(?P<size>[^/]+)/[^/]+/[a-z]+\.jpg$", url
    )
    if not match:
        return None
    region, size = match["region"], match["size"]
    rw, rh = (WIDTH, HEIGHT) if region == "full" else [float(v) for v in region.split(",")[2:]]
    if size in ("max", "full"):
        return 0.0
    w, _, h = size.lstrip("!").partition(",")
    scale = rw / float(w) if w else rh / float(h)
    return -math.log2(scale)


def wait_until(page: Page, predicate: Callable[[], object], what: str) -> None:
    """Poll ``predicate`` (while Playwright delivers the page's events) until true."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        page.wait_for_timeout(25)


def settle(page: Page, recorder: Recorder, what: str) -> None:
    """Wait until the viewer says all its tiles are loaded and drawn and no request has been in
    flight for a while, then for two animation frames."""
    deadline = time.monotonic() + WAIT_MS / 1000
    quiet = 0
    while quiet < 5:
        page.wait_for_timeout(40)
        if recorder.problems or page.evaluate("() => window.problems.length"):
            recorder.assert_clean(page, what)
        busy = recorder.pending or not page.evaluate("() => window.ready && window.ready()")
        quiet = 0 if busy else quiet + 1
        if time.monotonic() > deadline:
            state = page.evaluate("() => window.state && window.state()")
            pending = [r.url for r in recorder.pending]
            raise AssertionError(f"{what}: not loaded (state {state}, pending {pending})")
    page.evaluate(FRAMES)


@dataclass
class View:
    """What the screenshot showed at the sampled points inside the image."""

    coverage: float  # share of the sampled points inside the image
    checked: int  # points inside a block, away from its edges
    blocks: int  # distinct blocks among them
    mismatches: list[str]


def check_view(page: Page, shot: Path) -> View:
    """Screenshot the viewer, and compare it at a grid of points with the block colours at the
    image coordinates the viewer gives for them."""
    width, height = VIEWER
    png = page.screenshot(clip={"x": 0, "y": 0, "width": width, "height": height})
    shot.write_bytes(png)
    pixels = imagecodecs.png_decode(png)[..., :3]
    assert pixels.shape[:2] == (height, width), pixels.shape
    controls = page.evaluate("() => controls()")
    points = [
        (x, y)
        for y in range(GRID // 2, height, GRID)
        for x in range(GRID // 2, width, GRID)
        if not any(x0 - 4 <= x <= x1 + 4 and y0 - 4 <= y <= y1 + 4 for x0, y0, x1, y1 in controls)
    ]
    coords = np.array(
        page.evaluate("points => toImage(points)", [[x + 0.5, y + 0.5] for x, y in points])
    )
    # image pixels per screen pixel, from two neighbouring grid points of the first row
    per_pixel = math.hypot(*(coords[1] - coords[0])) / GRID
    margin = MARGIN * per_pixel
    inside = (coords[:, 0] >= 0) & (coords[:, 0] < WIDTH) & (coords[:, 1] >= 0)
    inside &= coords[:, 1] < HEIGHT
    offset = coords % BLOCK
    interior = inside & (offset.min(axis=1) >= margin) & (offset.max(axis=1) <= BLOCK - margin)
    mismatches, blocks = [], set()
    for (x, y), (ix, iy), keep in zip(points, coords, interior, strict=True):
        if not keep:
            continue
        bx, by = int(ix // BLOCK), int(iy // BLOCK)
        blocks.add((bx, by))
        expected, seen = block_colour(bx, by).astype(int), pixels[y, x].astype(int)
        if np.abs(expected - seen).max() > TOLERANCE:
            mismatches.append(
                f"screen ({x}, {y}) -> image ({ix:.0f}, {iy:.0f}), block ({bx}, {by}): "
                f"{seen.tolist()}, expected {expected.tolist()}"
            )
    return View(float(inside.mean()), int(interior.sum()), len(blocks), mismatches)


def assert_view(view: View, what: str, *, coverage: float) -> None:
    assert view.coverage >= coverage, f"{what}: the image covers too little of the viewer: {view}"
    assert view.checked >= 40 and view.blocks >= 4, f"{what}: too few points to compare: {view}"
    shown = "\n".join(view.mismatches[:20])
    assert not view.mismatches, (
        f"{what}: {len(view.mismatches)} of {view.checked} points show the wrong colour:\n{shown}"
    )


@dataclass
class Run:
    """What a viewer asked iipserver for: every URL in order, the tiles, and the descriptor (the
    first request: info.json, .dzi or ImageProperties.xml) with its answer."""

    requests: list[str]
    before_zoom: list[str]
    tiles: list[tuple[str, float]]
    descriptor: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def exercise(
    browser: Browser, url: str, server: Server, tmp_path: Path, what: str, *, coverage: float
) -> Run:
    """Open the page, check the first view (the image covering at least ``coverage`` of the
    viewer), zoom in, check again (the image covering all the viewer)."""
    context = browser.new_context(viewport=VIEWPORT)
    try:
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        recorder = Recorder(server.base)
        recorder.attach(page)
        response = page.goto(url)
        assert response is not None and response.ok, url

        settle(page, recorder, f"{what}: first view")
        recorder.assert_clean(page, f"{what}: first view")
        before_zoom = list(recorder.requests)
        levels = [level for _, level in recorder.tiles()]
        assert levels, f"{what}: no tiles requested: {before_zoom}"
        view = check_view(page, tmp_path / "first.png")
        assert_view(view, f"{what}: first view", coverage=coverage)

        page.evaluate("() => zoomIn()")
        wait_until(
            page,
            lambda: any(level > max(levels) for _, level in recorder.tiles()),
            f"{what}: a tile finer than level {max(levels)} after zooming in",
        )
        settle(page, recorder, f"{what}: zoomed in")
        recorder.assert_clean(page, f"{what}: zoomed in")
        view = check_view(page, tmp_path / "zoomed.png")
        assert_view(view, f"{what}: zoomed in", coverage=1)

        for response in recorder.responses:
            if tile_level(response.url) is not None:
                kind = response.headers.get("content-type", "")
                assert kind == "image/jpeg", f"{what}: {response.url}: {kind}"
        # Every request to iipserver is the descriptor (first) or a tile.
        assert all(tile_level(u) is not None for u in recorder.requests[1:]), recorder.requests
        assert not recorder.pending
        descriptor = recorder.responses[0]
        assert descriptor.url == recorder.requests[0], recorder.requests
        print(f"\n{what} ({page.evaluate('() => state()')}):")
        print("\n".join(f"  {u}" for u in recorder.requests))
        print("\n".join(f"  {w}" for w in recorder.warnings))
        return Run(
            list(recorder.requests),
            before_zoom,
            recorder.tiles(),
            descriptor.url,
            descriptor.headers,
            descriptor.body(),
        )
    finally:
        context.close()
        stderr = server.stderr()
        assert "Traceback" not in stderr and " ERROR" not in stderr, stderr


def assert_iiif_info(run: Run, version: int) -> dict[str, Any]:
    """The info.json answer: IIIF ``version``, the test image's size, CORS."""
    assert run.headers.get("access-control-allow-origin") == "*", run.headers
    info = run.json()
    context = info["@context"]
    contexts = context if isinstance(context, list) else [context]
    assert f"http://iiif.io/api/image/{version}/context.json" in contexts, info
    assert (info["width"], info["height"]) == (WIDTH, HEIGHT), info
    assert info["id" if version == 3 else "@id"].startswith("http"), info
    return info


# -- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "style"), [(3, "path"), (3, "query"), (2, "path")], ids=["v3", "v3-query", "v2"]
)
def test_openseadragon_iiif(
    browser: Browser,
    site: Site,
    servers: dict[int, Server],
    tmp_path: Path,
    version: int,
    style: str,
) -> None:
    server = servers[version]
    info_url = (
        f"{server.base}/iiif/{IMAGE}/info.json"
        if style == "path"
        else f"{server.base}/iip?IIIF={IMAGE}/info.json"
    )
    html = osd_page(f"OpenSeadragon IIIF {version}", "INFO", INFO=info_url)
    what = f"OpenSeadragon, IIIF {version} ({style})"
    run = exercise(
        browser,
        site.page(f"osd-iiif{version}-{style}.html", html),
        server,
        tmp_path,
        what,
        coverage=OSD_COVERAGE,
    )
    assert run.descriptor == info_url, run.requests
    info = assert_iiif_info(run, version)
    service = info["id" if version == 3 else "@id"]
    tiles = [url for url, _ in run.tiles]
    assert all(url.startswith(service + "/") for url in tiles), (service, tiles)
    sizes = {unquote(url).rsplit("/", 3)[1] for url in tiles}
    pattern = r"\d+,\d+|max" if version == 3 else r"\d+,|full"
    assert all(re.fullmatch(pattern, s) for s in sizes), sizes


def test_openseadragon_deepzoom(
    browser: Browser, site: Site, servers: dict[int, Server], tmp_path: Path
) -> None:
    server = servers[3]
    dzi = f"{server.base}/iip?DeepZoom={IMAGE}.dzi"
    html = osd_page("OpenSeadragon DeepZoom", "DZI", DZI=dzi)
    run = exercise(
        browser,
        site.page("osd-deepzoom.html", html),
        server,
        tmp_path,
        "OpenSeadragon, DeepZoom",
        coverage=OSD_COVERAGE,
    )
    assert run.descriptor == dzi, run.requests
    assert run.headers.get("access-control-allow-origin") == "*", run.headers
    text = run.body.decode()
    assert 'TileSize="256"' in text and '<Size Width="1500" Height="1100"' in text, text
    prefix = f"{server.base}/iip?DeepZoom={IMAGE}_files/"
    assert all(url.startswith(prefix) for url, _ in run.tiles), run.requests
    # DeepZoom levels: 0 is 1 × 1, 11 (ceil(log2 1500)) the full size.
    assert max(level for _, level in run.tiles) == 11


def test_openseadragon_zoomify(
    browser: Browser, site: Site, servers: dict[int, Server], tmp_path: Path
) -> None:
    server = servers[3]
    properties = f"{server.base}/iip?Zoomify={IMAGE}/ImageProperties.xml"
    tiles_url = f"{server.base}/iip?Zoomify={IMAGE}/"
    html = osd_page("OpenSeadragon Zoomify", ZOOMIFY_SOURCE, PROPERTIES=properties, TILES=tiles_url)
    run = exercise(
        browser,
        site.page("osd-zoomify.html", html),
        server,
        tmp_path,
        "OpenSeadragon, Zoomify",
        coverage=OSD_COVERAGE,
    )
    assert run.descriptor == properties, run.requests
    assert run.headers.get("access-control-allow-origin") == "*", run.headers
    text = run.body.decode()
    assert 'WIDTH="1500"' in text and 'HEIGHT="1100"' in text and 'TILESIZE="256"' in text, text
    # Four levels (187 × 137 up to 1500 × 1100), 1 + 4 + 9 + 30 tiles: all in TileGroup0.
    assert all(url.startswith(tiles_url + "TileGroup0/") for url, _ in run.tiles), run.requests
    assert max(level for _, level in run.tiles) == 3


@pytest.mark.parametrize("version", [2, 3], ids=["v2", "v3"])
def test_leaflet_iiif(
    browser: Browser, site: Site, servers: dict[int, Server], tmp_path: Path, version: int
) -> None:
    server = servers[version]
    info_url = f"{server.base}/iiif/{IMAGE}/info.json"
    html = page_html(f"Leaflet-IIIF {version}", LEAFLET_HEAD, LEAFLET_SCRIPT, INFO=info_url)
    run = exercise(
        browser,
        site.page(f"leaflet-iiif{version}.html", html),
        server,
        tmp_path,
        f"Leaflet-IIIF, IIIF {version}",
        coverage=0.3,  # 375 × 275 in 640 × 480
    )
    assert run.descriptor == info_url, run.requests
    assert_iiif_info(run, version)
    # Leaflet-IIIF builds tile URLs from the info.json URL, not from the service id.
    base = info_url.removesuffix("info.json")
    assert all(url.startswith(base) for url, _ in run.tiles), run.requests
    # Opened at 375 × 275 (scale factor 4), zoomed in to the full size (1).
    assert sorted({level for _, level in run.tiles}) == [-2.0, 0.0]
