"""Cache paths in-process: tiles/s on one core for cold, warm and shared-cache (memcached) hits.

    python bench/cache.py [--seconds 3] [--memcached host:port]

Serves VisiOmatic-style float32 tiles (MINMAX + GAM + CTW) of an 8-level 4096×4096 star field
through the WSGI app: "cold" with the tile cache off (read + decode + render + encode),
"warm" with the tile caches on (a repeated tile is an encoded-tile hit: no render, no
encode), and "memcached hit" with a shared cache
(a lookup and a replay). Starts a private memcached if none is given and one is installed.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import numpy as np
from images import pyramid_levels, smin_smax_tags, write_pyramid

from iipserver.app import make_app
from iipserver.settings import Settings


def sky_image(width: int, height: int, seed: int = 7) -> np.ndarray:
    """Noise around 100 with 2000 gaussian stars, each drawn in a 15×15 stamp."""
    rng = np.random.default_rng(seed)
    sky = rng.normal(100.0, 5.0, size=(height, width)).astype(np.float32)
    yy, xx = np.mgrid[-7:8, -7:8]
    for _ in range(2000):
        x, y = int(rng.integers(7, width - 8)), int(rng.integers(7, height - 8))
        stamp = rng.uniform(50, 5000) * np.exp(-(xx**2 + yy**2) / (2 * rng.uniform(0.8, 2.5) ** 2))
        sky[y - 7 : y + 8, x - 7 : x + 8] += stamp.astype(np.float32)
    return sky


def rate(app, queries, seconds: float) -> float:
    """Requests per second (one thread) over ``queries`` repeated for ``seconds``."""

    def start_response(status, headers, exc_info=None):
        return None

    def environ(q):
        return {"REQUEST_METHOD": "GET", "QUERY_STRING": q, "wsgi.input": io.BytesIO()}

    for q in queries:  # fill whatever cache is on
        b"".join(app(environ(q), start_response))
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for q in queries:
            b"".join(app(environ(q), start_response))
        done += len(queries)
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--memcached")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sky = sky_image(4096, 4096)
        write_pyramid(Path(tmp) / "sky.tif", pyramid_levels(sky),
                      extratags=smin_smax_tags([90.0], [1500.0]))  # fmt: skip
        queries = [f"FIF=sky.tif&MINMAX=1:95,900&GAM=0.4545&CTW=1;1;1&JTL=4,{i}" for i in range(64)]
        base = {"FILESYSTEM_PREFIX": f"{tmp}/", "VERBOSITY": "0"}
        cold = make_app(Settings.from_environ({**base, "MAX_IMAGE_CACHE_SIZE": "0"}))
        warm = make_app(Settings.from_environ({**base, "MAX_IMAGE_CACHE_SIZE": "100"}))
        rows = {
            "cold (read+decode+render+encode)": rate(cold, queries, args.seconds),
            "warm (tile caches on: encoded-tile hit)": rate(warm, queries, args.seconds),
        }
        server = None
        address = args.memcached
        if address is None and shutil.which("memcached"):
            server = subprocess.Popen(["memcached", "-l", "127.0.0.1", "-p", "21311", "-U", "0",
                                       "-u", "root"], stderr=subprocess.DEVNULL)  # fmt: skip
            time.sleep(0.5)
            address = "127.0.0.1:21311"
        if address:
            shared = make_app(Settings.from_environ({**base, "MEMCACHED_SERVERS": address}))
            rows["memcached hit (lookup + replay)"] = rate(shared, queries, args.seconds)
        if server is not None:
            server.kill()
    for name, value in rows.items():
        print(f"{name:42s} {value:8.0f} tiles/s  ({1e6 / value:6.0f} µs/tile)")


if __name__ == "__main__":
    main()
