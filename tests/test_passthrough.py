"""CODEC_PASSTHROUGH: stored JPEG tiles sent as stored (spec §9.4), and when they are not.

The files are built here: tifffile's own JPEG pyramids (whole JFIF stream per tile), libtiff's
layout (abbreviated tile streams + a JPEGTables tag) and RGB-coded JPEG with and without the
Adobe marker that tells a decoder not to convert from YCbCr. iipsrv 1.1 (no pass-through) is
the oracle for the decoded pixels.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import simplejpeg
import tifffile
from images import pyramid_levels, rgb_image, write_pyramid
from reference import ServerProcess
from wsgi_client import call

from iipserver.app import make_app
from iipserver.settings import Settings

IIPSRV = os.environ.get("IIPSRV_BINARY", "/usr/lib/iipimage-server/iipsrv.fcgi")
TABLE_MARKERS = (0xDB, 0xC4)  # DQT, DHT


def smooth(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1)


def split_tables(stream: bytes) -> tuple[bytes, bytes]:
    """A whole JPEG → (JPEGTables: SOI DQT DHT EOI, abbreviated stream without them)."""
    pos, tables, rest = 2, [], []
    while stream[pos + 1] != 0xDA:
        length = int.from_bytes(stream[pos + 2 : pos + 4], "big")
        segment = stream[pos : pos + 2 + length]
        (tables if stream[pos + 1] in TABLE_MARKERS else rest).append(segment)
        pos += 2 + length
    rest.append(stream[pos:])
    return b"\xff\xd8" + b"".join(tables) + b"\xff\xd9", b"\xff\xd8" + b"".join(rest)


def drop_marker(stream: bytes, marker: int) -> bytes:
    pos, out = 2, [stream[:2]]
    while stream[pos + 1] != 0xDA:
        length = int.from_bytes(stream[pos + 2 : pos + 4], "big")
        if stream[pos + 1] != marker:
            out.append(stream[pos : pos + 2 + length])
        pos += 2 + length
    out.append(stream[pos:])
    return b"".join(out)


def renumber_components(stream: bytes) -> bytes:
    """Component identifiers 'R', 'G', 'B' → 1, 2, 3 (in SOF and SOS)."""
    sof = (b"R\x11\x00G\x11\x00B\x11\x00", b"\x01\x11\x00\x02\x11\x00\x03\x11\x00")
    sos = (b"\x03R\x00G\x00B\x00", b"\x03\x01\x00\x02\x00\x03\x00")
    return stream.replace(*sof).replace(*sos)


def write_precompressed(
    path: Path, image: np.ndarray, encode, photometric: str, tables: bytes | None = None
) -> list[bytes]:
    """One-level tiled TIFF whose 256² tiles are ``encode(tile)`` streams; returns them."""
    height, width = image.shape[:2]
    tiles = []
    for y in range(0, height, 256):
        for x in range(0, width, 256):
            tile = np.zeros((256, 256, 3), np.uint8)
            part = image[y : y + 256, x : x + 256]
            tile[: part.shape[0], : part.shape[1]] = part
            tiles.append(encode(tile))
    extratags = [] if tables is None else [(347, 7, len(tables), tables, True)]
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            iter(tiles), shape=image.shape, dtype=np.uint8, tile=(256, 256), compression="jpeg",
            photometric=photometric, subsampling=(2, 2) if photometric == "ycbcr" else None,
            extratags=extratags, metadata=None,
        )  # fmt: skip
    if photometric == "rgb":  # tifffile writes YCbCr for any JPEG RGB; libtiff may not
        with tifffile.TiffFile(path, mode="r+b") as tif:
            tif.pages[0].tags["PhotometricInterpretation"].overwrite(2)
    return tiles


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("passthrough")
    picture = rgb_image(700, 600)
    write_pyramid(root / "plain.tif", pyramid_levels(picture), compression="jpeg")
    write_pyramid(root / "grey.tif", pyramid_levels(picture[:, :, 0]), compression="jpeg")
    gradient = smooth(600, 520).astype(np.uint8)
    tables: list[bytes] = []

    def abbreviated(tile: np.ndarray) -> bytes:
        whole = simplejpeg.encode_jpeg(
            np.ascontiguousarray(tile), quality=90, colorsubsampling="420"
        )
        table, rest = split_tables(whole)
        tables.append(table)
        return rest

    streams = write_precompressed(root / "spare.tif", gradient, abbreviated, "ycbcr")
    assert len(set(tables)) == 1  # same quality → same tables for every tile
    shared = tables[0]
    write_precompressed(root / "tables.tif", gradient, abbreviated, "ycbcr", tables=shared)
    (root / "spare.tif").unlink()

    def rgb_coded(tile: np.ndarray) -> bytes:
        return bytes(
            imagecodecs.jpeg8_encode(tile, level=92, colorspace="RGB", outcolorspace="RGB")
        )

    adobe = write_precompressed(root / "adobe.tif", gradient, rgb_coded, "rgb")
    bare = [renumber_components(drop_marker(s, 0xEE)) for s in adobe]
    assert all(b"RGB" not in s[:700] for s in bare)
    write_precompressed(root / "bare.tif", gradient, lambda t: bare.pop(0), "rgb")
    return {"root": root, "streams": streams, "tables": shared, "adobe": adobe}


@pytest.fixture(scope="module")
def app(data: dict):
    return make_app(Settings.from_environ({"FILESYSTEM_PREFIX": f"{data['root']}/"}))


def stored_tile(path: Path, level: int, index: int) -> bytes:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[level]
        tif.filehandle.seek(page.dataoffsets[index])
        return tif.filehandle.read(page.databytecounts[index])


def decoded_tile(path: Path, level: int, index: int) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[level]
        tif.filehandle.seek(page.dataoffsets[index])
        data = tif.filehandle.read(page.databytecounts[index])
        pixels, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
    return np.asarray(pixels).reshape(page.tilelength, page.tilewidth, -1)


def test_full_tile_is_the_stored_stream(app, data):
    r = call(app, "FIF=plain.tif&JTL=2,0")  # 700×600: resolution 2 is full size
    assert r.status == 200 and r.header("Content-Type") == "image/jpeg"
    assert r.body == stored_tile(data["root"] / "plain.tif", 0, 0)
    assert r.header("Content-Length") == str(len(r.body))
    grey = call(app, "FIF=grey.tif&JTL=2,1")
    assert grey.body == stored_tile(data["root"] / "grey.tif", 0, 1)
    assert simplejpeg.decode_jpeg(grey.body, colorspace="GRAY").shape == (256, 256, 1)


def test_passthrough_is_cached_and_repeated(app, data):
    first = call(app, "FIF=plain.tif&JTL=2,1")
    hits = app.pipeline.encoded_tiles.hits
    again = call(app, "FIF=plain.tif&JTL=2,1")
    assert again.body == first.body and app.pipeline.encoded_tiles.hits == hits + 1


@pytest.mark.parametrize(
    "query",
    [
        "FIF=plain.tif&JTL=2,2",  # right edge: 700 = 2·256 + 188, stored padded
        "FIF=plain.tif&JTL=2,6",  # bottom row (600 = 2·256 + 88)
        "FIF=plain.tif&JTL=0,0",  # a level smaller than a tile
        "FIF=plain.tif&QLT=75&JTL=2,0",  # an explicit quality re-encodes (mainline too)
        "FIF=plain.tif&GAM=1.5&JTL=2,0",
        "FIF=plain.tif&INV&JTL=2,0",
        "FIF=plain.tif&COL=grey&JTL=2,0",
        "FIF=plain.tif&ROT=90&JTL=2,0",
        "FIF=plain.tif&CNT=eq&JTL=2,0",
        "FIF=plain.tif&PTL=2,0",
    ],
)
def test_not_passed_through(app, data, query):
    r = call(app, query)
    assert r.status == 200
    stored = {stored_tile(data["root"] / "plain.tif", 0, i) for i in range(9)}
    assert r.body not in stored
    if r.header("Content-Type") == "image/jpeg":
        assert b"iipserver" not in r.body[:2] and r.body[:2] == b"\xff\xd8"


def test_edge_tile_is_cropped_not_padded(app):
    r = call(app, "FIF=plain.tif&JTL=2,2")
    assert simplejpeg.decode_jpeg(r.body).shape == (256, 700 - 512, 3)


def test_setting_off_reencodes(data):
    off = make_app(
        Settings.from_environ({"FILESYSTEM_PREFIX": f"{data['root']}/", "CODEC_PASSTHROUGH": "0"})
    )
    r = call(off, "FIF=plain.tif&JTL=2,0")
    assert r.status == 200 and r.body != stored_tile(data["root"] / "plain.tif", 0, 0)
    assert simplejpeg.decode_jpeg(r.body).shape == (256, 256, 3)


def test_jpegtables_are_spliced_in(app, data):
    r = call(app, "FIF=tables.tif&JTL=0,1")
    tables, tile = data["tables"], data["streams"][1]
    assert r.body == tables[:-2] + tile[2:]
    assert r.body.count(b"\xff\xd8") == 1 and r.body.endswith(b"\xff\xd9")
    expected = decoded_tile(data["root"] / "tables.tif", 0, 1)
    assert np.array_equal(simplejpeg.decode_jpeg(r.body), expected)


def test_iiif_and_deepzoom_tiles_pass_through(app, data):
    stored = stored_tile(data["root"] / "tables.tif", 0, 1)
    iiif = call(app, "IIIF=tables.tif/256,0,256,256/256,/0/default.jpg")
    assert iiif.status == 200
    assert iiif.body[-len(stored) + 2 :] == stored[2:]


def test_rgb_coded_jpeg_needs_the_adobe_marker(app, data):
    source = smooth(600, 520)[:256, 256:512]
    with_marker = call(app, "FIF=adobe.tif&JTL=0,1")
    assert with_marker.body == data["adobe"][1]
    without = call(app, "FIF=bare.tif&JTL=0,1")
    assert without.body != stored_tile(data["root"] / "bare.tif", 0, 1)
    for r in (with_marker, without):  # both decode to the picture (not YCbCr-misread colours)
        pixels = simplejpeg.decode_jpeg(r.body).astype(int)
        assert np.abs(pixels - source).mean() < 3


@pytest.fixture(scope="module")
def iipsrv(data: dict, tmp_path_factory: pytest.TempPathFactory):
    if not os.access(IIPSRV, os.X_OK):
        pytest.skip(f"iipsrv 1.1 not installed ({IIPSRV})")
    logs = tmp_path_factory.mktemp("iipsrv-passthrough")
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    env.update(FILESYSTEM_PREFIX=f"{data['root']}/", VERBOSITY="0", OMP_NUM_THREADS="1")
    env["LOGFILE"] = str(logs / "iipsrv.log")
    server = ServerProcess(
        "iipsrv", lambda port: [IIPSRV, "--bind", f"127.0.0.1:{port}"], env, cwd=logs
    )
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize(
    "query",
    ["FIF=plain.tif&JTL=2,0", "FIF=plain.tif&JTL=2,4", "FIF=tables.tif&JTL=0,1",
     "FIF=adobe.tif&JTL=0,3"],
)  # fmt: skip
def test_pixels_agree_with_iipsrv(app, iipsrv, query):
    """1.1 decodes and re-encodes at Q75; the stored tile it started from is what we send."""
    ours = call(app, query)
    theirs = iipsrv.get(query)
    assert theirs.status == 200, theirs.body[:200]
    a = simplejpeg.decode_jpeg(ours.body).astype(int)
    b = simplejpeg.decode_jpeg(theirs.body).astype(int)
    assert a.shape == b.shape
    assert np.abs(a - b).mean() < 2.5, np.abs(a - b).mean()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
