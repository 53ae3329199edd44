"""atheris target: mutated TIFF bytes opened by iipserver's TIFF source and served by the app.

Each input is written as a file in a temporary data root, opened with ``TiffSource`` (which
may only raise iipserver's own errors) and asked for through the WSGI app (OBJ metadata, the
first tiles, a CVT region, IIIF info and the VisiOmatic 3 INFO). Crashes are exceptions
escaping the source's constructor or the app, and answers that are not well formed. The seed
corpus (tiled 8-bit RGB, float32 grey, deflate, BigTIFF, strips) is generated at start. See
fuzz/README.md.

    python fuzz/fuzz_tiff.py -max_total_time=600 -rss_limit_mb=2048 [corpus_dir]
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys

import atheris
import numpy as np
import tifffile
from _common import check, default_corpus, temp_root
from wsgi_client import environ_for

with atheris.instrument_imports():
    import iipserver.sources.pool
    import iipserver.sources.tiff  # noqa: F401

from _common import make_app

from iipserver.errors import IIPServerError
from iipserver.sources.tiff import TiffSource

QUERIES = [
    "FIF={name}&OBJ=IIP,1.0&OBJ=Max-size&OBJ=Tile-size&OBJ=Resolution-number"
    "&OBJ=Bits-per-channel&OBJ=Min-Max-sample-values&OBJ=Resolutions&OBJ=Colorspace,0-0,0"
    "&OBJ=subject",
    "FIF={name}&JTL=0,0",
    "FIF={name}&JTL=1,0",
    "FIF={name}&MINMAX=1:0,1&GAM=0.5&JTL=0,0",
    "FIF={name}&WID=64&CVT=png",
    "IIIF={name}/info.json",
    "FIF={name}&INFO",
]


def _tiff(data: np.ndarray, **kwargs: object) -> bytes:
    out = io.BytesIO()
    bigtiff = bool(kwargs.pop("bigtiff", False))
    with tifffile.TiffWriter(out, bigtiff=bigtiff) as tif:
        tif.write(data, metadata=None, **kwargs)  # type: ignore[arg-type]
    return out.getvalue()


def seeds() -> list[bytes]:
    """Small valid TIFFs of several layouts and codecs."""
    y, x = np.mgrid[0:40, 0:48]
    rgb = np.stack([x * 5, y * 6, x + y], axis=2).astype(np.uint8)
    grey = (np.sin(x / 3.0) * 50).astype(np.float32)
    pyramid = io.BytesIO()
    with tifffile.TiffWriter(pyramid) as tif:
        tif.write(rgb, tile=(32, 32), photometric="rgb", metadata=None)
        tif.write(rgb[::2, ::2], tile=(32, 32), photometric="rgb", subfiletype=1, metadata=None)
    return [
        pyramid.getvalue(),
        _tiff(grey, tile=(16, 16), photometric="minisblack"),
        _tiff(rgb, tile=(16, 16), photometric="rgb", compression="zlib"),
        _tiff(grey.astype(np.uint16), tile=(16, 16), photometric="minisblack", bigtiff=True),
        _tiff(rgb[..., 0], photometric="minisblack", rowsperstrip=8),
        _tiff(rgb, tile=(16, 16), photometric="rgb", planarconfig="separate"),
    ]


def main() -> None:
    """Generate the images and seed corpus, then fuzz (libFuzzer options from argv)."""
    logging.disable(logging.CRITICAL)
    root = temp_root("iipserver-fuzz-tiff-")
    app = make_app(root)
    counter = [0]

    def one_input(data: bytes) -> None:
        counter[0] += 1
        name = f"f{counter[0]}.tif"
        path = root / name
        path.write_bytes(data)
        try:
            with contextlib.suppress(IIPServerError):  # anything else is a crash
                TiffSource(str(path)).close()
            for query in QUERIES:
                check(app, environ_for(query.format(name=name)))
        finally:
            os.unlink(path)
            app.clear_caches()

    atheris.Setup(default_corpus(sys.argv, "tiff", seeds()), one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
