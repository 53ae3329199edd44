"""Shared helpers of the atheris targets: a small image set, the app, a well-formedness check."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile

REPO = Path(__file__).resolve().parent.parent
for _path in (str(REPO), str(REPO / "tests")):  # the targets use tests/wsgi_client.py
    if _path not in sys.path:
        sys.path.insert(0, _path)


class Crash(AssertionError):
    """An answer the server must never give (libFuzzer reports it with its input)."""


def write_images(root: Path) -> None:
    """Two small tiled pyramids: 8-bit RGB (2 levels) and float32 grey with SMin/SMax."""
    y, x = np.mgrid[0:200, 0:300]
    rgb = np.stack([x % 256, y % 256, (x + y) % 256], axis=2).astype(np.uint8)
    star = (np.sin(x / 7.0) * np.cos(y / 5.0) * 100.0).astype(np.float32)
    with tifffile.TiffWriter(root / "rgb.tif") as tif:
        tif.write(rgb, tile=(256, 256), photometric="rgb", metadata=None)
        tif.write(rgb[::2, ::2], tile=(256, 256), photometric="rgb", subfiletype=1, metadata=None)
    extra = [(340, "d", 1, (-100.0,), True), (341, "d", 1, (100.0,), True)]
    with tifffile.TiffWriter(root / "star.tif") as tif:
        tif.write(star, tile=(256, 256), photometric="minisblack", metadata=None, extratags=extra)


def make_app(root: Path) -> Callable:
    from iipserver.app import make_app as build
    from iipserver.settings import Settings

    env = {"FILESYSTEM_PREFIX": f"{root}/", "URI_MAP": "iiif=>IIIF", "VERBOSITY": "0"}
    return build(Settings.from_environ(env))


def check(app: Callable, environ: dict) -> tuple[int, bytes]:
    """Call the app and raise Crash unless the answer is well formed."""
    captured: dict = {}

    def start_response(status: str, headers: list, exc_info: object = None) -> None:
        captured["status"], captured["headers"] = status, headers

    body = b"".join(app(environ, start_response))
    status = int(captured["status"][:3])
    headers = {k.lower(): v for k, v in captured["headers"]}
    if not 200 <= status <= 599:
        raise Crash(f"status {status}")
    if status not in (204, 304) and not headers.get("content-type"):
        raise Crash(f"no Content-Type: {captured['headers']}")
    length = headers.get("content-length")
    if length is not None and environ["REQUEST_METHOD"] != "HEAD" and int(length) != len(body):
        raise Crash(f"Content-Length {length} for {len(body)} bytes")
    if status == 500 and environ["REQUEST_METHOD"] != "HEAD" and body != b"Internal server error":
        raise Crash(f"500 with body {body[:200]!r}")
    if b"Traceback" in body:
        raise Crash("traceback in the body")
    return status, body


def temp_root(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def default_corpus(argv: list[str], name: str, seeds: list[bytes]) -> list[str]:
    """Write ``seeds`` into a corpus directory and add it to ``argv`` when none is given."""
    if any(not a.startswith("-") for a in argv[1:]):
        return argv
    corpus = temp_root(f"iipserver-fuzz-{name}-")
    for i, seed in enumerate(seeds):
        (corpus / f"seed-{i:03d}").write_bytes(seed)
    return [*argv, str(corpus)]
