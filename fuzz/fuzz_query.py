"""atheris target: bytes as a request string, URI_MAP path or POST body, through the WSGI app.

Crashes are exceptions escaping the app and answers that are not well formed (status outside
200–599, no Content-Type, a wrong Content-Length, a 500 other than "Internal server error", a
traceback in a body). See fuzz/README.md.

    python fuzz/fuzz_query.py -max_total_time=600 [corpus_dir]
"""

from __future__ import annotations

import logging
import sys

import atheris
from _common import check, default_corpus, temp_root, write_images
from wsgi_client import environ_for

with atheris.instrument_imports():
    import iipserver.app
    import iipserver.protocol.commands
    import iipserver.protocol.iiif
    import iipserver.protocol.iip
    import iipserver.protocol.query
    import iipserver.protocol.visiomatic
    import iipserver.sources.paths  # noqa: F401

from _common import make_app

SEEDS = [
    b"FIF=rgb.tif&OBJ=IIP,1.0&OBJ=Max-size&OBJ=Resolutions&OBJ=Tile-size",
    b"FIF=rgb.tif&JTL=1,0",
    b"FIF=star.tif&MINMAX=1:-50,50&GAM=0.5&CMP=jet&INV&JTL=0,0",
    b"FIF=star.tif&CTW=[1;0.5]&CNT=2&SHD=10,20&ROT=!90&PTL=0,0",
    b"FIF=rgb.tif&WID=120&HEI=80&RGN=0.1,0.1,0.5,0.5&QLT=70&CVT=jpeg",
    b"FIF=star.tif&PFL=0:1,1-50,50&SPECTRA=1,1",
    b"FIF=star.tif&INFO",
    b"FIF=star.tif&CHAN=1&MINMAX=1:-10,10&BRT=3&CNT=2&JTL=1,0",
    b"FIF=star.tif&VAL=10,10",
    b"FIF=star.tif&RGN=0,0:100,100&BIN=2",
    b"IIIF=rgb.tif/info.json",
    b"IIIF=rgb.tif/pct:10,10,50,50/!100,100/!90/gray.png",
    b"IIIF=rgb.tif/0,0,256,256/256,/0/default.jpg",
    b"DeepZoom=rgb.tif.dzi",
    b"DeepZoom=rgb.tif_files/8/0_0.jpg",
    b"Zoomify=rgb.tif/ImageProperties.xml",
    b"Zoomify=rgb.tif/TileGroup0/0-0-0.jpg",
    b"\x01rgb.tif/full/max/0/default.jpg",
    b"\x02FIF=rgb.tif&JTL=0,0",
    b"FIF=%2e%2e%2fsecret.tif&OBJ=Max-size",
]


def main() -> None:
    """Generate the images and seed corpus, then fuzz (libFuzzer options from argv)."""
    logging.disable(logging.CRITICAL)
    root = temp_root("iipserver-fuzz-query-")
    write_images(root)
    app = make_app(root)

    def one_input(data: bytes) -> None:
        mode = data[0] if data and data[0] < 4 else 0  # a first byte 1-3 picks another mode
        text = (data[1:] if mode else data).decode("latin-1")  # as a WSGI server hands it over
        if mode == 1:  # path style, as nginx sends REQUEST_URI with URI_MAP iiif=>IIIF
            environ = environ_for("", "/iiif/" + text.split("?", 1)[0])
        elif mode == 2:
            environ = environ_for("", method="POST", body=data[1:])
        elif mode == 3:
            environ = environ_for(text, method="HEAD", headers={"If-None-Match": text[:40]})
        else:
            environ = environ_for(text)
        check(app, environ)

    atheris.Setup(default_corpus(sys.argv, "query", SEEDS), one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
