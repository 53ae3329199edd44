"""Real-browser test of the demo viewer: Debian's Chromium driven by Playwright.

``python -m iipserver serve`` runs as a subprocess with ``XDG_CACHE_HOME`` in a temporary folder,
so that it generates the demo set there; the page at ``/`` is then used as a person would: the
image list, a click on each image, the zoom button, the mouse wheel and the extra-parameters box.
What is checked is what the browser really got and drew: the IIP responses it received (metadata,
``JTL`` tiles), the pixels of the canvas, the console, failed requests, and a screenshot.

Skipped when ``/usr/bin/chromium`` (Debian package ``chromium``) or the ``playwright`` module
(pip package, in the ``[test]`` extra) is missing. Playwright's own browsers are never used.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import pytest
from processes import children as _children

from iipserver import demo

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page, Request, Response

sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="the playwright module is not installed (pip install -e '.[test]')",
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
#: The canvas is this minus the 280-pixel side bar: 520 × 500. Every demo image then opens
#: ("fit") below its full-resolution level, so that zooming in must fetch a larger one.
VIEWPORT = {"width": 800, "height": 500}
BANNER = re.compile(r"server on http://(?P<address>\S+?)/?[,)]")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 8.0
WAIT_MS = 10_000
BACKGROUND = (17, 20, 23)  # the canvas fill, #111417
METADATA_OBJ = "obj=IIP,1.0&obj=Max-size&obj=Tile-size&obj=Resolution-number"
STATUS = re.compile(r"^(?P<path>\S+) — (?P<w>\d+) × (?P<h>\d+) px, level (?P<r>\d+)/(?P<top>\d+),")

#: Canvas statistics read back from the page: the share of pixels that are not the background
#: fill (the image's footprint), the number of distinct colours, and the luminance range, mean
#: and variance over the image's pixels.
CANVAS_STATS = """([br, bg, bb]) => {
  const canvas = document.getElementById("view");
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  const colours = new Set();
  let n = 0, sum = 0, sum2 = 0, lo = 255, hi = 0;
  for (let i = 0; i < data.length; i += 4) {
    const r = data[i], g = data[i + 1], b = data[i + 2];
    if (r === br && g === bg && b === bb) continue;
    const y = 0.299 * r + 0.587 * g + 0.114 * b;
    n++; sum += y; sum2 += y * y;
    if (y < lo) lo = y;
    if (y > hi) hi = y;
    if (colours.size <= 100000) colours.add((r << 16) | (g << 8) | b);
  }
  const mean = n ? sum / n : 0;
  return {width: canvas.width, height: canvas.height, coverage: n / (data.length / 4),
          colours: colours.size, lo: lo, hi: hi, mean: mean,
          variance: n ? sum2 / n - mean * mean : 0};
}"""


# -- the server -----------------------------------------------------------------------------


@dataclass
class DemoServer:
    """The running ``iipserver serve`` subprocess."""

    proc: subprocess.Popen[bytes]
    base: str
    cache: Path
    stderr_path: Path
    banner: str

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def get_json(self, path: str) -> Any:
        with urllib.request.urlopen(self.base + path, timeout=10) as response:
            assert response.status == 200
            return json.load(response)


def _wait_healthy(server: DemoServer, deadline: float) -> None:
    while True:
        try:
            if server.get_json("/health").get("status") == "ok":
                return
        except OSError:
            pass
        if server.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"/health never answered ok:\n{server.stderr()}")
        time.sleep(0.05)


@pytest.fixture
def demo_server(tmp_path: Path) -> Iterator[DemoServer]:
    """``iipserver serve --workers 1`` on a free port (the kernel's pick: ``--port 0``, read back
    from the banner), generating the demo set under a temporary ``XDG_CACHE_HOME``."""
    cache = tmp_path / "xdg-cache"
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "VIRTUAL_ENV", "TMPDIR")
    env = {k: v for k, v in os.environ.items() if k in keep or k.startswith("PYENV")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env.update(XDG_CACHE_HOME=str(cache), VERBOSITY="2", OMP_NUM_THREADS="1")
    stdout_path, stderr_path = tmp_path / "server.out", tmp_path / "server.err"
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "iipserver", "serve", "--port", "0", "--workers", "1"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
            cwd=tmp_path,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (match := BANNER.search(stdout_path.read_text(errors="replace"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no banner (exit {proc.poll()}):\n{stderr_path.read_text()}")
            time.sleep(0.02)
        banner = stdout_path.read_text().splitlines()[0]
        server = DemoServer(proc, f"http://{match['address']}", cache, stderr_path, banner)
        _wait_healthy(server, deadline)
        yield server
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


# -- what the page does ---------------------------------------------------------------------


@dataclass
class Tile:
    """One JTL response seen by the page."""

    fif: str
    level: int
    index: int
    status: int
    content_type: str
    query: dict[str, list[str]]


@dataclass
class Recorder:
    """Everything the page requested, received, failed at or complained about."""

    pending: set[Request] = field(default_factory=set)
    tiles: list[Tile] = field(default_factory=list)
    bad_responses: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        page.on("request", self._started)
        page.on("requestfinished", self._finished)
        page.on("requestfailed", self._failed)
        page.on("response", self._response)
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))

    def _started(self, request: Request) -> None:
        self.pending.add(request)

    def _finished(self, request: Request) -> None:
        self.pending.discard(request)

    def _failed(self, request: Request) -> None:
        self.pending.discard(request)
        self.failed.append(f"{request.url}: {request.failure}")

    def _response(self, response: Response) -> None:
        if response.status >= 400:
            self.bad_responses.append(f"{response.status} {response.url}")
        query = parse_qs(urlsplit(response.url).query)
        if "JTL" in query:
            level, index = (int(v) for v in query["JTL"][0].split(","))
            content_type = response.headers.get("content-type", "")
            tile = Tile(query["FIF"][0], level, index, response.status, content_type, query)
            self.tiles.append(tile)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        url = message.location.get("url", "")
        # Known, reported separately: the page has no icon and the site no /favicon.ico, so
        # Chromium's automatic favicon request logs a 404 on every load. Nothing else is excused.
        if url.endswith("/favicon.ico") and "404" in message.text:
            return
        self.errors.append(f"console error: {message.text} ({url})")

    def tiles_of(self, fif: str, **params: str) -> list[Tile]:
        """Tiles of ``fif`` requested with exactly these extra parameters (besides FIF, JTL)."""
        wanted = {k: [v] for k, v in params.items()}
        return [
            t
            for t in self.tiles
            if t.fif == fif
            and {k: v for k, v in t.query.items() if k not in ("FIF", "JTL")} == wanted
        ]


def settle(page: Page, recorder: Recorder) -> None:
    """Wait until no request has been in flight for a while, then for two animation frames
    (tiles that just loaded are drawn on the next one)."""
    deadline = time.monotonic() + WAIT_MS / 1000
    quiet = 0
    while quiet < 4:
        page.wait_for_timeout(50)  # also lets Playwright deliver the page's events
        quiet = 0 if recorder.pending else quiet + 1
        if time.monotonic() > deadline:
            raise AssertionError(f"requests still pending: {[r.url for r in recorder.pending]}")
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def status_level(page: Page, path: str) -> tuple[int, int]:
    """(level shown, top level) from the status line, which must be about ``path``, no error."""
    text = page.inner_text("#status")
    match = STATUS.match(text)
    assert match and match["path"] == path, f"status line: {text!r}"
    assert "error" not in (page.get_attribute("#status", "class") or ""), text
    return int(match["r"]), int(match["top"])


def wait_until(page: Page, predicate: Callable[[], object], what: str) -> None:
    """Poll ``predicate`` (while Playwright delivers the page's events) until true."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while not predicate():
        if time.monotonic() > deadline:
            status = page.inner_text("#status")
            raise AssertionError(f"timed out waiting for {what} (status line: {status!r})")
        page.wait_for_timeout(50)


def wait_for_image(page: Page, path: str) -> None:
    """Wait until the status line is about ``path`` (its metadata arrived and it was drawn)."""
    wait_until(page, lambda: page.inner_text("#status").startswith(path + " — "), path)


def wait_for_level_above(page: Page, recorder: Recorder, path: str, level: int) -> None:
    wait_until(
        page,
        lambda: any(t.level > level for t in recorder.tiles_of(path)),
        f"{path}: a tile request above level {level} after zooming in",
    )


def level_grid(width: int, height: int, levels: int, tile: int, r: int) -> tuple[int, int]:
    """Columns and rows of tiles at resolution ``r`` (0 = smallest, floor halvings)."""
    f = 2 ** (levels - 1 - r)
    return -(-(width // f) // tile), -(-(height // f) // tile)


def assert_jpeg_tiles(tiles: list[Tile], what: str) -> None:
    bad = [t for t in tiles if t.status != 200 or t.content_type != "image/jpeg"]
    assert not bad, f"{what}: tiles not answered 200 image/jpeg: {bad}"


def assert_drawn(
    stats: dict[str, Any],
    what: str,
    *,
    coverage: float,
    min_range: float = 8,
    min_variance: float = 0.01,
) -> None:
    """The canvas shows an image: not the bare background, not a single flat colour.

    The default thresholds are low on purpose: the float demo images, linearly stretched over
    their full sample range (iipsrv's default), show a nearly black sky with a few stars.
    """
    assert stats["coverage"] >= coverage, f"{what}: image covers too little of the canvas: {stats}"
    assert stats["colours"] >= 8, f"{what}: too few distinct colours: {stats}"
    assert stats["hi"] - stats["lo"] >= min_range, f"{what}: flat luminance: {stats}"
    assert stats["variance"] > min_variance, f"{what}: too little luminance variance: {stats}"


def parse_metadata(text: str) -> dict[str, list[int]]:
    """The numeric IIP objects of a metadata reply: ``{"Max-size": [w, h], ...}``."""
    found = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name in ("Max-size", "Tile-size", "Resolution-number"):
            found[name] = [int(v) for v in value.split()]
    return found


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", data
    return struct.unpack(">II", data[16:24])


# -- the test -------------------------------------------------------------------------------


def test_demo_viewer(browser: Browser, demo_server: DemoServer, tmp_path: Path) -> None:
    # (browser first: without Chromium the test skips before starting a server)
    demo_dir = demo_server.cache / "iipserver" / "demo"
    assert f"data root {demo_dir}/," in demo_server.banner
    assert all((demo_dir / name).is_file() for name in demo.FILES)
    listing = {e["path"]: e for e in demo_server.get_json("/images")["images"]}
    assert sorted(listing) == sorted(demo.FILES)

    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(WAIT_MS)
    recorder = Recorder()
    recorder.attach(page)
    response = page.goto(demo_server.base + "/")
    assert response is not None and response.ok

    # The image list: every demo image with its size, in the server's order.
    page.wait_for_selector("#images li[data-path]")
    entries = page.locator("#images li[data-path]")
    paths = entries.evaluate_all("items => items.map(li => li.dataset.path)")
    assert paths == list(listing)
    for i, path in enumerate(paths):
        size = entries.nth(i).locator(".size").inner_text()
        assert size == f"{listing[path]['width']} × {listing[path]['height']}"

    # The page opens the first image by itself; let it finish. Its tiles then sit in Chromium's
    # memory cache, so reopening it last (below) draws them without new requests.
    wait_for_image(page, paths[0])
    settle(page, recorder)

    shot = tmp_path / "viewer.png"
    for path in [*paths[1:], paths[0]]:
        what = path
        with page.expect_response(
            lambda r, p=path: "obj=" in r.url and f"FIF={p}&" in r.url
        ) as info:
            page.click(f"#images li[data-path='{path}']")
        metadata = info.value
        assert metadata.ok, f"{what}: metadata {metadata.status}: {metadata.text()[:200]}"
        assert METADATA_OBJ in metadata.url
        objects = parse_metadata(metadata.text())
        width, height = objects["Max-size"]
        assert (width, height) == (listing[path]["width"], listing[path]["height"])
        tile_w, tile_h = objects["Tile-size"]
        assert tile_w == tile_h
        (levels,) = objects["Resolution-number"]

        wait_for_image(page, path)
        settle(page, recorder)
        assert page.eval_on_selector_all(
            "#images li.selected", "items => items.map(li => li.dataset.path)"
        ) == [path]
        assert page.evaluate("() => location.hash") == "#image=" + path
        level, top = status_level(page, path)
        assert top == levels - 1
        assert level < top, f"{what}: opens at its full level; the zoom check needs room"

        # Fitted, the whole level is visible: every one of its tiles was fetched, as JPEG.
        at_level = [t for t in recorder.tiles_of(path) if t.level == level]
        cols, rows = level_grid(width, height, levels, tile_w, level)
        assert {t.index for t in at_level} == set(range(cols * rows)), f"{what}: {at_level}"
        assert len(at_level) >= 4
        assert_jpeg_tiles(recorder.tiles_of(path), what)
        fitted = page.evaluate(CANVAS_STATS, list(BACKGROUND))
        assert (fitted["width"], fitted["height"]) == (520, 500)
        drawn = min(520 / width, 500 / height)  # the image's share of the canvas when fitted
        expected = (width * drawn) * (height * drawn) / (520 * 500)
        assert_drawn(fitted, f"{what} fitted", coverage=0.97 * expected)

        # Zoom in with the + button: a larger level is requested, answered and drawn.
        page.click("#zoom-in")
        wait_for_level_above(page, recorder, path, level)
        settle(page, recorder)
        zoomed_level, _ = status_level(page, path)
        assert zoomed_level > level
        new_tiles = [t for t in recorder.tiles_of(path) if t.level > level]
        assert {t.level for t in new_tiles} == {zoomed_level}
        assert len(new_tiles) >= 4
        assert_jpeg_tiles(new_tiles, f"{what} zoomed")
        cols, rows = level_grid(width, height, levels, tile_w, zoomed_level)
        assert all(t.index < cols * rows for t in new_tiles)
        zoomed = page.evaluate(CANVAS_STATS, list(BACKGROUND))
        assert_drawn(zoomed, f"{what} zoomed", coverage=1)

        if path == demo.RGB:
            page.screenshot(path=str(shot))

        if path == demo.STARS:
            # The mouse wheel over the canvas zooms in further, up to the full level.
            box = page.locator("#view").bounding_box()
            assert box is not None
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.mouse.wheel(0, -500)
            wait_for_level_above(page, recorder, path, zoomed_level)
            settle(page, recorder)
            wheeled, _ = status_level(page, path)
            assert wheeled == top
            full = [t for t in recorder.tiles_of(path) if t.level == top]
            assert len(full) >= 4
            assert_jpeg_tiles(full, f"{what} wheel")
            before = page.evaluate(CANVAS_STATS, list(BACKGROUND))
            # At 1:1 this crop of the sky is almost uniformly black (luminance ≤ 8 of 255) with
            # the default stretch: only check that tiles cover the canvas; GAM=log shows more.
            assert before["coverage"] == 1, before

            # Extra IIP parameters go into every tile request; GAM=log brightens the sky.
            page.fill("#params", "GAM=log")
            page.press("#params", "Enter")
            wait_until(
                page, lambda: len(recorder.tiles_of(demo.STARS, GAM="log")) >= 4, "GAM=log tiles"
            )
            settle(page, recorder)
            assert_jpeg_tiles(recorder.tiles_of(path, GAM="log"), f"{what} GAM=log")
            after = page.evaluate(CANVAS_STATS, list(BACKGROUND))
            assert_drawn(after, f"{what} GAM=log", coverage=1, min_range=32, min_variance=1)
            assert after["mean"] > before["mean"] + 5, (before, after)
            page.fill("#params", "")
            page.press("#params", "Enter")
            settle(page, recorder)

    # The screenshot of the RGB image, zoomed in: a page of the right size with real detail
    # (the same page with an empty canvas compresses to about 25 kB).
    assert png_size(shot) == (VIEWPORT["width"], VIEWPORT["height"])
    assert 100_000 < shot.stat().st_size < 5_000_000, shot.stat().st_size
    assert recorder.failed == []
    assert recorder.bad_responses == []
    assert recorder.errors == []
    assert not recorder.pending
    page.close()
    stderr = demo_server.stderr()
    assert "Traceback" not in stderr and " ERROR" not in stderr, stderr
