"""Locust users that browse like real viewers: VisiOmatic v2 (IIP), OpenSeadragon (IIIF), snapshots.

Data, then a server on port 8080 (bench/README.md has the details)::

    python bench/make_data.py /tmp/iipbench/images --size 8192
    # (a) the standalone HTTP server (IIP at /fcgi-bin/iipsrv.fcgi, IIIF at /iiif/):
    python -m iipserver serve --port 8080 --workers 2 /tmp/iipbench/images
    # (b) or the FastCGI daemon (or Debian's /usr/lib/iipimage-server/iipsrv.fcgi, same
    #     environment) behind the shipped nginx site, nginx/iipserver.conf with `listen 8080;`
    #     and `server 127.0.0.1:9000;`, in an nginx.conf with `worker_connections 4096;`:
    FILESYSTEM_PREFIX=/tmp/iipbench/images/ URI_MAP="iiif=>IIIF" \\
        python -m iipserver fcgi --bind 127.0.0.1:9000 --workers 2

Load: 200 browsers for 60 s; the summary gives requests, failures, requests/s and latency
percentiles per kind of request (``--csv PREFIX`` also writes them as CSV)::

    locust -f bench/locustfile.py --headless -u 200 -r 50 -t 60s \\
        --host http://127.0.0.1:8080 --only-summary

The users:

- ``VisiomaticUser`` (weight 5) opens ``sky.tif`` (a quarter of them ``cube.tif`` in colour
  mode, ``CTW=0,0,1;0,1,0;1,0,0``) with the VisiOmatic v2 metadata request
  (``obj=IIP,1.0&obj=max-size&...&obj=subject``), reads the image size, tile size, resolution
  count and per-channel min/max from the answer, starts at the zoom level where the whole image
  fits its screen, then repeats a step: pan, zoom in or out, move the contrast sliders
  (``MINMAX``, ``GAM``) or pick a colour map (``CMP=jet|cold|hot``), and fetch the visible tiles
  of that level (a contiguous block, centre first: 20–56 tiles for its screen, fewer when the
  level is smaller) as the v2 client writes them:
  ``FIF=..[&CMP=..]&GAM=0.4545[&MINMAX=1:lo,hi]&CTW=1;1;1&JTL=r,i``.
- ``IIIFUser`` (weight 4) reads ``/iiif/rgb.tif/info.json`` (IIIF 2 or 3) and does the same
  with OpenSeadragon's tile URLs from the ``tiles`` grid and ``scaleFactors``:
  ``/iiif/rgb.tif/x,y,w,h/sw,sh/0/default.jpg`` (OpenSeadragon ≥ 4) or ``.../sw,/...``
  (OpenSeadragon 2–3; each user picks one).
- ``SnapshotUser`` (weight 1) opens the sky image, then every 10–30 s downloads a 640–1024
  pixel wide ``CVT=jpeg`` snapshot of a region (``RGN``) of ``rgb.tif``, or of ``sky.tif``
  with its current ``MINMAX``/``GAM``.

Like a browser, every user fetches a screen over 6 connections at once and does not fetch a
URL it already holds (a per-user cache of 3000 URLs, as ``Cache-Control: max-age`` allows),
with 2–5 s of think time between steps. Every answer is checked: status 200, Content-Type,
JPEG bytes and pixel size (edge tiles cropped, CVT width within one pixel), metadata that
parses; anything else is a locust failure. Requests are grouped under the names ``visiomatic
open``, ``visiomatic tile``, ``iiif info``, ``iiif tile``, ``cvt rgb`` and ``cvt sky``.

Options (command line or environment): ``--iip-endpoint`` / ``IIP_ENDPOINT`` (default
``/fcgi-bin/iipsrv.fcgi``), ``--iiif-prefix`` / ``IIIF_PREFIX`` (``/iiif``; empty for
``?IIIF=`` on the IIP endpoint), ``--sky-image`` / ``IIP_SKY_IMAGE`` (``sky.tif``),
``--cube-image`` / ``IIP_CUBE_IMAGE`` (``cube.tif``; empty: sky only), ``--rgb-image`` /
``IIP_RGB_IMAGE`` (``rgb.tif``). Sizes are read from the server at each session start.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import gevent.pool
from locust import FastHttpUser, between, events, task

#: Connections a browser opens to one host over HTTP/1.1, and tiles fetched at once.
BROWSER_CONNECTIONS = 6
#: URLs a user remembers (its browser cache).
BROWSER_CACHE = 3000
VISIOMATIC_OBJ = (
    "&obj=IIP,1.0&obj=max-size&obj=tile-size&obj=resolution-number&obj=bits-per-channel"
    "&obj=min-max-sample-values&obj=subject"
)
COLORMAPS = ("jet", "cold", "hot")
#: VisiOmatic v2's colour mixing for 3 channels (blue, green, red), as the client sends it.
CTW_COLOUR3 = "0,0,1;0,1,0;1,0,0"
#: A response check: None if the answer is right, else what is wrong with it.
Check = Callable[[Any], str | None]
SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    env = os.environ.get
    parser.add_argument(
        "--iip-endpoint", default=env("IIP_ENDPOINT", "/fcgi-bin/iipsrv.fcgi"),
        help="path of the IIP endpoint (env IIP_ENDPOINT)",
    )  # fmt: skip
    parser.add_argument(
        "--iiif-prefix", default=env("IIIF_PREFIX", "/iiif"),
        help="path prefix of IIIF path-style URLs; empty: ?IIIF= on the IIP endpoint",
    )  # fmt: skip
    parser.add_argument("--sky-image", default=env("IIP_SKY_IMAGE", "sky.tif"))
    parser.add_argument("--cube-image", default=env("IIP_CUBE_IMAGE", "cube.tif"))
    parser.add_argument("--rgb-image", default=env("IIP_RGB_IMAGE", "rgb.tif"))


def _option(user: FastHttpUser, name: str, env: str, default: str) -> str:
    """A custom option, from the parsed command line or (run as a library) the environment."""
    options = getattr(user.environment, "parsed_options", None)
    value = getattr(options, name, None) if options is not None else None
    return str(value) if value is not None else os.environ.get(env, default)


# --------------------------------------------------------------------------------------------
# Checks


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's SOF segment, or None if ``data`` is not a JPEG."""
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 9 < len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in SOF_MARKERS:
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return width, height
        pos += 2 + length
    return None


def check_jpeg(
    resp: Any, width: int | None = None, height: int | None = None, slack: int = 0
) -> str | None:
    """None if ``resp`` is a 200 image/jpeg of the given pixel size (± ``slack``), else why not."""
    if resp.status_code != 200:
        return f"status {resp.status_code}"
    ctype = resp.headers.get("Content-Type", "") if resp.headers else ""
    if ctype != "image/jpeg":
        return f"Content-Type {ctype!r}"
    size = jpeg_size(resp.content or b"")
    if size is None:
        return f"not a JPEG: {(resp.content or b'')[:16]!r}"
    if (width is not None and abs(size[0] - width) > slack) or (
        height is not None and abs(size[1] - height) > slack
    ):
        return f"JPEG is {size[0]}×{size[1]}, expected {width}×{height}"
    return None


# --------------------------------------------------------------------------------------------
# Navigation


@dataclass
class Viewport:
    """A screen of ``cols``×``rows`` tiles over a pyramid, at zoom ``z`` (0 = smallest level)."""

    sizes: list[tuple[int, int]]  # (width, height) per zoom level, smallest first
    tile: int
    cols: int
    rows: int
    z: int = 0
    cx: float = 0.5  # view centre, as fractions of the image width and height
    cy: float = 0.5

    def grid(self, z: int | None = None) -> tuple[int, int]:
        w, h = self.sizes[self.z if z is None else z]
        return -(-w // self.tile), -(-h // self.tile)

    @property
    def home(self) -> int:
        """Deepest level whose tiles all fit on the screen (where viewers open)."""
        fits = [z for z in range(len(self.sizes)) if self.fits(z)]
        return fits[-1] if fits else 0

    def fits(self, z: int) -> bool:
        gx, gy = self.grid(z)
        return gx <= self.cols and gy <= self.rows

    def step(self, rng: random.Random) -> str:
        """Pan or zoom as a user would; returns what it did."""
        top = len(self.sizes) - 1
        move = rng.choices(("pan", "in", "out"), weights=(5, 3, 2))[0]
        if move == "in" and self.z >= top:
            move = "out" if rng.random() < 0.5 else "pan"
        if move == "out" and self.z == 0:
            move = "in" if self.z < top else "pan"
        w, h = self.sizes[self.z]
        span_x, span_y = self.cols * self.tile / w, self.rows * self.tile / h
        if move == "pan":
            # A drag of 40-100 % of the screen in some direction.
            angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.4, 1.0)
            self.cx += length * span_x * math.cos(angle)
            self.cy += length * span_y * math.sin(angle)
        elif move == "in":
            # Scroll-wheel zoom towards the pointer: the centre moves towards it.
            self.cx += rng.uniform(-0.25, 0.25) * span_x
            self.cy += rng.uniform(-0.25, 0.25) * span_y
            self.z += 1
        else:
            self.z -= 1
        self.cx = min(max(self.cx, 0.0), 1.0)
        self.cy = min(max(self.cy, 0.0), 1.0)
        return move

    def tiles(self) -> list[tuple[int, int]]:
        """The tiles on screen at the current level, nearest to the centre first."""
        gx, gy = self.grid()
        w, h = self.sizes[self.z]
        px, py = self.cx * w / self.tile, self.cy * h / self.tile
        x0 = min(max(0, math.floor(px - self.cols / 2)), max(0, gx - self.cols))
        y0 = min(max(0, math.floor(py - self.rows / 2)), max(0, gy - self.rows))
        cells = [
            (x, y)
            for y in range(y0, min(gy, y0 + self.rows))
            for x in range(x0, min(gx, x0 + self.cols))
        ]
        cells.sort(key=lambda c: (c[0] + 0.5 - px) ** 2 + (c[1] + 0.5 - py) ** 2)
        return cells


# --------------------------------------------------------------------------------------------
# Users


class BrowserUser(FastHttpUser):
    """Shared browser behaviour: 6 connections, a URL cache, think time between steps."""

    abstract = True
    concurrency = BROWSER_CONNECTIONS
    wait_time = between(2, 5)

    def on_start(self) -> None:
        self.rng = random.Random()
        self.cache: OrderedDict[str, None] = OrderedDict()
        self.viewport: Viewport | None = None

    def screen(self, sizes: list[tuple[int, int]], tile: int) -> Viewport:
        """A screen of 5-8 × 4-7 tiles (20-56), opened at the home view."""
        view = Viewport(sizes, tile, self.rng.randint(5, 8), self.rng.randint(4, 7))
        view.z = view.home
        return view

    def get(self, url: str, name: str, check: Check) -> Any:
        """GET ``url``; a non-None answer of ``check`` is reported as a failure."""
        with self.client.get(url, name=name, catch_response=True) as resp:
            problem = check(resp)
            if problem is None:
                resp.success()
                return resp
            resp.failure(problem)
            return None

    def burst(self, requests: list[tuple[str, Check]], name: str) -> None:
        """Fetch the URLs this browser does not hold yet, 6 at a time, in the given order."""
        pool = gevent.pool.Pool(BROWSER_CONNECTIONS)
        for url, check in requests:
            if url in self.cache:
                self.cache.move_to_end(url)
                continue
            pool.spawn(self._fetch, url, name, check)
        pool.join()

    def _fetch(self, url: str, name: str, check: Check) -> None:
        if self.get(url, name, check) is not None:
            self.cache[url] = None
            while len(self.cache) > BROWSER_CACHE:
                self.cache.popitem(last=False)


@dataclass
class IIPImage:
    """What the VisiOmatic v2 client reads from its metadata request."""

    name: str
    width: int
    height: int
    tile: int
    levels: int
    bits: int
    minmax: list[tuple[float, float]]

    def sizes(self) -> list[tuple[int, int]]:
        """Level sizes, smallest first: floor(W / 2^(N-1-z)) as the client computes them."""
        n = self.levels
        return [(self.width >> (n - 1 - z), self.height >> (n - 1 - z)) for z in range(n)]


def parse_obj(name: str, text: str) -> IIPImage | str:
    """The metadata answer parsed as VisiOmatic v2 does (regexes, any line order), or a problem."""

    def find(key: str, pattern: str) -> re.Match[str] | None:
        return re.search(key + ":" + pattern, text)

    size = find("Max-size", r"(\d+)\s+(\d+)")
    tile = find("Tile-size", r"(\d+)\s+(\d+)")
    levels = find("Resolution-number", r"(\d+)")
    bits = find("Bits-per-channel", r"(\d+)")
    minmax = find("Min-Max-sample-values", r"[ \t]*([^\r\n]*)")
    if not (text.startswith("IIP:1.0") and size and tile and levels and bits and minmax):
        return f"unexpected metadata {text[:120]!r}"
    try:
        values = [float(v) for v in minmax.group(1).split()]
    except ValueError:
        return f"bad Min-Max-sample-values {minmax.group(1)!r}"
    if not values or len(values) % 2:
        return f"bad Min-Max-sample-values {minmax.group(1)!r}"
    return IIPImage(
        name, int(size.group(1)), int(size.group(2)), int(tile.group(1)), int(levels.group(1)),
        int(bits.group(1)), list(zip(values[0::2], values[1::2], strict=True)),
    )  # fmt: skip


def open_iip(user: BrowserUser | SnapshotUser, endpoint: str, name: str) -> IIPImage | None:
    """The VisiOmatic v2 metadata request, checked; None (and a failure) if it went wrong."""
    parsed: list[IIPImage] = []

    def check(resp: Any) -> str | None:
        if resp.status_code != 200:
            return f"status {resp.status_code}"
        ctype = resp.headers.get("Content-Type", "") if resp.headers else ""
        if ctype != "application/vnd.netfpx":
            return f"Content-Type {ctype!r}"
        result = parse_obj(name, (resp.content or b"").decode("latin-1"))
        if isinstance(result, str):
            return result
        parsed.append(result)
        return None

    with user.client.get(
        f"{endpoint}?FIF={name}{VISIOMATIC_OBJ}", name="visiomatic open", catch_response=True
    ) as resp:
        problem = check(resp)
        if problem is not None:
            resp.failure(problem)
            return None
        resp.success()
    return parsed[0]


def _num(value: float) -> str:
    """A slider value as a short decimal (JS prints such numbers the same way)."""
    return f"{value:.6g}"


class Display:
    """The VisiOmatic v2 display settings of one image, and the tile query they make."""

    def __init__(self, image: IIPImage, colour: bool) -> None:
        self.image = image
        self.colour = colour
        self.minmax = list(image.minmax)
        self.gamma = 2.2 if image.bits >= 32 else 1.0
        self.cmap = "grey"

    def query(self) -> str:
        """``FIF=..[&CMP=..][&GAM=..][&MINMAX=c:lo,hi]..&CTW=..`` in the client's order."""
        parts = [f"FIF={self.image.name}"]
        if self.cmap != "grey":
            parts.append(f"CMP={self.cmap}")
        if self.gamma != 1.0:
            parts.append(f"GAM={1 / self.gamma:.4f}")
        for c, (cur, adv) in enumerate(zip(self.minmax, self.image.minmax, strict=True)):
            if cur != adv:
                parts.append(f"MINMAX={c + 1}:{_num(cur[0])},{_num(cur[1])}")
        nchan = len(self.minmax)
        parts.append(f"CTW={CTW_COLOUR3}" if self.colour and nchan == 3 else "CTW=1;1;1")
        return "&".join(parts)

    def sliders(self, rng: random.Random) -> None:
        """Move the min/max and gamma sliders (the max usually up, to bring out faint stars)."""
        for c, (lo, hi) in enumerate(self.image.minmax):
            span = hi - lo
            self.minmax[c] = (lo + span * rng.uniform(-0.3, 0.5), hi + span * rng.uniform(-0.3, 20))
        self.gamma = rng.choice((0.5, 1.0, 1.5, 2.2, 2.2, 3.0, 4.0, 5.0))

    def colormap(self, rng: random.Random) -> None:
        self.cmap = rng.choice([c for c in ("grey", *COLORMAPS) if c != self.cmap])


class VisiomaticUser(BrowserUser):
    """The VisiOmatic v2 web client on a float image (IIP protocol, JTL tiles)."""

    weight = 5

    def on_start(self) -> None:
        super().on_start()
        self.endpoint = _option(self, "iip_endpoint", "IIP_ENDPOINT", "/fcgi-bin/iipsrv.fcgi")
        sky = _option(self, "sky_image", "IIP_SKY_IMAGE", "sky.tif")
        cube = _option(self, "cube_image", "IIP_CUBE_IMAGE", "cube.tif")
        self.name = cube if cube and self.rng.random() < 0.25 else sky
        self.display: Display | None = None

    def open(self) -> bool:
        image = open_iip(self, self.endpoint, self.name)
        if image is None:
            return False
        self.display = Display(image, colour=len(image.minmax) == 3)
        self.viewport = self.screen(image.sizes(), image.tile)
        return True

    @task
    def browse(self) -> None:
        if self.display is None or self.viewport is None:
            if not self.open():
                return
        else:
            action = self.rng.choices(("move", "sliders", "colormap"), weights=(8, 1.5, 0.5))[0]
            if action == "sliders":
                self.display.sliders(self.rng)
            elif action == "colormap":
                self.display.colormap(self.rng)
            else:
                self.viewport.step(self.rng)
        assert self.display is not None and self.viewport is not None
        view, base = self.viewport, self.display.query()
        gx, _ = view.grid()
        w, h = view.sizes[view.z]
        requests: list[tuple[str, Check]] = []
        for x, y in view.tiles():
            tw, th = min(view.tile, w - x * view.tile), min(view.tile, h - y * view.tile)
            url = f"{self.endpoint}?{base}&JTL={view.z},{x + gx * y}"
            requests.append((url, partial(check_jpeg, width=tw, height=th)))
        self.burst(requests, "visiomatic tile")


@dataclass
class IIIFImage:
    """What OpenSeadragon reads from info.json."""

    base: str  # path (and query) of the image service, without the trailing slash
    version: int
    width: int
    height: int
    tile: int
    scale_factors: list[int]  # largest first: zoom level 0 is the smallest

    def sizes(self) -> list[tuple[int, int]]:
        return [(-(-self.width // s), -(-self.height // s)) for s in self.scale_factors]


def parse_info(doc: Any, fallback_base: str) -> IIIFImage | str:
    """An info.json document (IIIF 2 or 3) as OpenSeadragon reads it, or a problem."""
    if not isinstance(doc, dict):
        return "info.json is not an object"
    context = str(doc.get("@context", ""))
    version = 3 if "/3/" in context else 2
    ident = doc.get("id") or doc.get("@id")
    tiles = doc.get("tiles") or []
    try:
        width, height = int(doc["width"]), int(doc["height"])
        tile = int(tiles[0]["width"])
        factors = sorted({int(s) for s in tiles[0]["scaleFactors"]}, reverse=True)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        return f"info.json without width/height/tiles: {exc!r}"
    if not ident or width <= 0 or height <= 0 or tile <= 0 or not factors:
        return "info.json with an empty id, size or tile grid"
    parts = urlsplit(str(ident))
    base = parts.path + (f"?{parts.query}" if parts.query else "") if parts.path else fallback_base
    return IIIFImage(base.rstrip("/"), version, width, height, tile, factors)


class IIIFUser(BrowserUser):
    """OpenSeadragon on an RGB image through the IIIF Image API (path style)."""

    weight = 4

    def on_start(self) -> None:
        super().on_start()
        endpoint = _option(self, "iip_endpoint", "IIP_ENDPOINT", "/fcgi-bin/iipsrv.fcgi")
        prefix = _option(self, "iiif_prefix", "IIIF_PREFIX", "/iiif").rstrip("/")
        name = _option(self, "rgb_image", "IIP_RGB_IMAGE", "rgb.tif")
        self.service = f"{prefix}/{name}" if prefix else f"{endpoint}?IIIF={name}"
        self.width_only = self.rng.random() < 0.5  # OpenSeadragon 2-3 size syntax
        self.info: IIIFImage | None = None

    def open(self) -> bool:
        parsed: list[IIIFImage] = []

        def check(resp: Any) -> str | None:
            if resp.status_code != 200:
                return f"status {resp.status_code}"
            ctype = resp.headers.get("Content-Type", "") if resp.headers else ""
            if "json" not in ctype:
                return f"Content-Type {ctype!r}"
            try:
                doc = json.loads(resp.content or b"")
            except ValueError as exc:
                return f"info.json does not parse: {exc}"
            result = parse_info(doc, self.service)
            if isinstance(result, str):
                return result
            parsed.append(result)
            return None

        if self.get(f"{self.service}/info.json", "iiif info", check) is None:
            return False
        self.info = parsed[0]
        self.viewport = self.screen(self.info.sizes(), self.info.tile)
        return True

    def tile_url(self, z: int, x: int, y: int) -> tuple[str, int, int | None]:
        """OpenSeadragon's IIIFTileSource.getTileUrl, and the expected JPEG size."""
        info = self.info
        assert info is not None
        scale = info.scale_factors[z]
        level_w, level_h = info.sizes()[z]
        if level_w < info.tile and level_h < info.tile:
            region, sw, sh = "full", level_w, level_h
        else:
            span = info.tile * scale
            rx, ry = x * span, y * span
            rw, rh = min(span, info.width - rx), min(span, info.height - ry)
            full = rx == 0 and ry == 0 and rw == info.width and rh == info.height
            region = "full" if full else f"{rx},{ry},{rw},{rh}"
            sw = min(info.tile, level_w - x * info.tile)
            sh = min(info.tile, level_h - y * info.tile)
        if sw == info.width and sh == info.height:
            size = "max" if info.version == 3 else "full"
        elif self.width_only:
            size = f"{sw},"
        else:
            size = f"{sw},{sh}"
        return f"{info.base}/{region}/{size}/0/default.jpg", sw, None if self.width_only else sh

    @task
    def browse(self) -> None:
        if self.info is None or self.viewport is None:
            if not self.open():
                return
        else:
            self.viewport.step(self.rng)
        assert self.viewport is not None
        requests: list[tuple[str, Check]] = []
        for x, y in self.viewport.tiles():
            url, tw, th = self.tile_url(self.viewport.z, x, y)
            requests.append((url, partial(check_jpeg, width=tw, height=th)))
        self.burst(requests, "iiif tile")


class SnapshotUser(FastHttpUser):
    """VisiOmatic's snapshot button: an 800-pixel CVT of a region, now and then."""

    weight = 1
    wait_time = between(10, 30)

    def on_start(self) -> None:
        self.rng = random.Random()
        self.endpoint = _option(self, "iip_endpoint", "IIP_ENDPOINT", "/fcgi-bin/iipsrv.fcgi")
        self.rgb = _option(self, "rgb_image", "IIP_RGB_IMAGE", "rgb.tif")
        self.sky_name = _option(self, "sky_image", "IIP_SKY_IMAGE", "sky.tif")
        self.sky: Display | None = None

    @task
    def snapshot(self) -> None:
        if self.sky is None:
            image = open_iip(self, self.endpoint, self.sky_name)
            if image is None:
                return
            self.sky = Display(image, colour=False)
        width = self.rng.choice((640, 800, 800, 1024))
        fw = self.rng.uniform(0.05, 0.6)
        fh = fw * self.rng.uniform(0.5, 1.0)
        region = f"{_num(self.rng.uniform(0, 1 - fw))},{_num(self.rng.uniform(0, 1 - fh))}"
        region += f",{_num(fw)},{_num(fh)}"
        if self.rng.random() < 0.5:
            name, base = "cvt rgb", f"FIF={self.rgb}"
        else:
            if self.rng.random() < 0.5:
                self.sky.sliders(self.rng)
            name, base = "cvt sky", self.sky.query()
        url = f"{self.endpoint}?{base}&RGN={region}&WID={width}&CVT=jpeg"
        with self.client.get(url, name=name, catch_response=True) as resp:
            # iipsrv 1.1 rounds some regions to WID-1 pixels (iipserver does the same).
            problem = check_jpeg(resp, width, slack=1)
            if problem is None:
                resp.success()
            else:
                resp.failure(problem)
