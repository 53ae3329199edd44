"""The standalone server's web pages (Flask): viewer page, image list, health check, static files.

IIP and IIIF requests never come here; :mod:`iipserver.serve` sends them straight to the IIP
application.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import tifffile
from flask import Flask, Response, jsonify, send_from_directory

from iipserver import __version__
from iipserver.sources.fits import FitsData

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"

#: File name suffixes listed by ``/images`` (compared case-insensitively).
IMAGE_SUFFIXES = (".tif", ".tiff", ".btf", ".fits", ".fit", ".fts", ".fits.fz", ".fz")
#: Of those, the FITS ones (read with the FITS source; the others with tifffile).
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fz")
#: ``/images`` lists at most this many files (and says so with ``"truncated": true``).
MAX_LISTED = 2000
#: Entries kept in the (path, mtime, size) → (width, height) cache.
_DIMENSIONS_CACHE_SIZE = 4096


class _Dimensions:
    """Width, height and channels of TIFF and FITS files, read once per file version
    (thread-safe, bounded)."""

    def __init__(self, size: int = _DIMENSIONS_CACHE_SIZE) -> None:
        self._entries: OrderedDict[tuple[str, int, int], tuple[int, int, int] | None] = (
            OrderedDict()
        )
        self._size = size
        self._lock = threading.Lock()

    def get(self, path: str, st: os.stat_result) -> tuple[int, int, int] | None:
        key = (path, st.st_mtime_ns, st.st_size)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        value: tuple[int, int, int] | None
        try:
            if path.lower().endswith(FITS_SUFFIXES):
                data = FitsData(path)
                value = (data.width, data.height, data.channels)
                data.release()
            else:
                with tifffile.TiffFile(path) as tif:
                    page = tif.pages[0]
                    shape = page.shaped  # (separate samples, depth, length, width, samples)
                    channels = int(shape[0]) * int(shape[4])
                    value = (int(shape[3]), int(shape[2]), channels)
        except Exception:  # not an image after all, unreadable, truncated…
            value = None
        with self._lock:
            self._entries[key] = value
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return value


def list_images(
    root: str, dimensions: _Dimensions | None = None
) -> tuple[list[dict[str, Any]], bool]:
    """List the TIFF and FITS files under ``root``: relative POSIX paths (usable as FIF), sorted.

    Hidden files and directories are skipped and directory symlinks are not followed. Each
    entry has ``path`` and, when the file can be read, ``width`` and ``height``.

    Returns:
        The entries and whether the list was cut at :data:`MAX_LISTED`.
    """
    found: list[str] = []
    truncated = False
    for current, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            if len(found) >= MAX_LISTED:
                truncated = True
                break
            found.append(os.path.join(current, name))
        if truncated:
            break
    entries: list[dict[str, Any]] = []
    for path in sorted(found):
        entry: dict[str, Any] = {"path": Path(os.path.relpath(path, root)).as_posix()}
        try:
            st = os.stat(path)
        except OSError:
            continue
        size = dimensions.get(path, st) if dimensions is not None else None
        if size is not None:
            entry["width"], entry["height"], entry["channels"] = size
        entries.append(entry)
    return entries, truncated


def create_site(data_root: str, client_root: Path | None = None) -> Flask:
    """Build the Flask application for ``data_root`` (the server's FILESYSTEM_PREFIX).

    Routes: ``/`` (viewer page), ``/images`` (JSON list of images), ``/health`` (JSON status)
    and ``/static/<file>``; with the VisiOmatic client in ``client_root`` also ``/visiomatic``
    (the VisiOmatic 3 page, ``?image=<path>&mode=mono|color``) and ``/client/<file>``.
    """
    site = Flask(__name__, static_folder=str(STATIC_DIR), static_url_path="/static")
    dimensions = _Dimensions()

    @site.get("/visiomatic")
    def visiomatic() -> Response:
        if client_root is None:
            return Response("VisiOmatic client not installed\n", 404, mimetype="text/plain")
        response = send_from_directory(STATIC_DIR, "visiomatic.html")
        response.cache_control.no_cache = True
        return response

    @site.get("/client/<path:name>")
    def client_file(name: str) -> Response:
        if client_root is None:
            return Response("VisiOmatic client not installed\n", 404, mimetype="text/plain")
        response = send_from_directory(client_root, name)
        response.cache_control.max_age = 86400
        return response

    @site.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status=204)

    @site.get("/config")
    def config() -> Response:
        return jsonify({"visiomatic": client_root is not None})

    @site.get("/")
    def index() -> Response:
        response = send_from_directory(STATIC_DIR, "index.html")
        response.cache_control.no_cache = True
        return response

    @site.get("/images")
    def images() -> Response:
        entries, truncated = list_images(data_root, dimensions) if data_root else ([], False)
        response = jsonify({"images": entries, "truncated": truncated})
        response.cache_control.no_cache = True
        return response

    @site.get("/health")
    def health() -> Response:
        return jsonify({"status": "ok", "version": __version__})

    return site
