"""The WSGI app end to end, in-process: exact protocol text, headers, statuses, decoded pixels."""

import email.utils
import os

import imagecodecs
import numpy as np
import pytest
import simplejpeg
from images import pyramid_levels, rgb_image, smin_smax_tags, star_field, write_pyramid
from wsgi_client import call

from iipserver import __version__
from iipserver.app import make_app
from iipserver.settings import Settings

MTIME = 1_700_000_000  # fixed file times make Last-Modified predictable


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("app")
    rgb = pyramid_levels(rgb_image())
    write_pyramid(d / "rgb.tif", rgb, photometric="rgb")
    write_pyramid(d / "grey.tif", [lv[:, :, 0] for lv in rgb], photometric="minisblack")
    f2 = pyramid_levels(star_field(300, 200, channels=2))
    write_pyramid(
        d / "f2.tif",
        f2,
        planarconfig="contig",
        extratags=smin_smax_tags([-10, 1000], [189.5, 1598]),
    )
    ramp = np.linspace(0, 1000, 300 * 200, dtype=np.float32).reshape(200, 300)
    write_pyramid(d / "ramp.tif", pyramid_levels(ramp))
    u16 = (np.arange(300 * 200, dtype=np.uint32).reshape(200, 300) % 65536).astype(np.uint16)
    write_pyramid(d / "u16.tif", pyramid_levels(u16), extratags=smin_smax_tags([0], [60000]))
    cube = np.stack([np.full((64, 80), v, np.uint8) for v in (10, 20, 30, 40, 50)], axis=2)
    write_pyramid(d / "cube5.tif", [cube], photometric="minisblack", planarconfig="contig")
    write_pyramid(
        d / "meta.tif",
        [rgb[2]],
        photometric="rgb",
        description="A description",
        extratags=[
            (315, "s", 0, "Ann", True),
            (33432, "s", 0, "CC-BY 4.0", True),
            (305, "s", 0, "stiff", True),
        ],
    )
    (d / "junk.tif").write_bytes(os.urandom(64))
    for p in d.iterdir():
        os.utime(p, (MTIME, MTIME))
    return d


@pytest.fixture(scope="module")
def app(data):
    return make_app(Settings.from_environ({"FILESYSTEM_PREFIX": f"{data}/"}))


LM = email.utils.formatdate(MTIME, usegmt=True)


def test_minmax_changes_advertised_range_for_the_request(app):
    r = call(app, "FIF=rgb.tif&MINMAX=1:0,100&OBJ=Min-Max-sample-values")
    assert r.body == b"\r\nMin-Max-sample-values: 0  100  0  255  0  255\r\n"
    r = call(app, "FIF=rgb.tif&OBJ=Min-Max-sample-values")
    assert r.body == b"\r\nMin-Max-sample-values: 0  255  0  255  0  255\r\n"


def test_float_without_tags_advertises_computed_range(app):
    smallest = pyramid_levels(np.linspace(0, 1000, 300 * 200, dtype=np.float32).reshape(200, 300))[
        -1
    ]
    lo, hi = (f"{float(np.float32(v)):.9g}" for v in (smallest.min(), smallest.max()))
    r = call(app, "FIF=ramp.tif&OBJ=Min-Max-sample-values&OBJ=Bits-per-channel")
    assert r.body == f"\r\nMin-Max-sample-values: {lo}  {hi}\r\nBits-per-channel:32\r\n".encode()
    assert hi != "0"


def test_obj_conformance_case_1(app):
    r = call(app, "FIF=rgb.tif&OBJ=IIP,1.0&OBJ=Max-size&OBJ=Tile-size&OBJ=Resolution-number")
    assert r.status == 200
    assert r.body == b"IIP:1.0\r\nMax-size:1000 750\r\nTile-size:256 256\r\nResolution-number:3\r\n"
    assert r.headers == [
        ("Server", f"iipserver/{__version__}"),
        ("X-Powered-By", "IIPImage"),
        ("Cache-Control", "max-age=86400"),
        ("Last-Modified", LM),
        ("Content-Type", "application/vnd.netfpx"),
        ("Content-Length", str(len(r.body))),
        ("ETag", r.header("ETag")),
    ]
    assert r.header("ETag").startswith('"') and len(r.header("ETag")) == 26


@pytest.mark.parametrize(
    ("query", "body"),
    [
        (
            "FIF=rgb.tif&OBJ=Basic-info",
            b"\r\nIIP-server:3.65\r\nMax-size:1000 750\r\nResolution-number:3\r\nColorspace,0-2,0:0 0 3 3 0 1 2\r\n",
        ),
        (
            "FIF=grey.tif&OBJ=IIP,1.0&OBJ=colorspace&OBJ=Min-Max-sample-values",
            b"IIP:1.0\r\nColorspace,0-2,0:0 0 1 1 0\r\nMin-Max-sample-values: 0  255\r\n",
        ),
        (
            "FIF=rgb.tif&OBJ=Bits-per-channel&OBJ=Min-Max-sample-values&OBJ=Resolutions"
            "&OBJ=Horizontal-views&OBJ=Vertical-views",
            b"\r\nBits-per-channel:8\r\nMin-Max-sample-values: 0  255  0  255  0  255\r\n"
            b"Resolutions:250 187,500 375,1000 750\r\nHorizontal-views:0\r\nVertical-views:90\r\n",
        ),
        (
            "FIF=f2.tif&OBJ=Min-Max-sample-values",
            b"\r\nMin-Max-sample-values: -10  189.5  1000  1598\r\n",
        ),
        ("FIF=rgb.tif&ROT=90&OBJ=Max-size", b"\r\nMax-size:750 1000\r\n"),
        ("OBJ=IIP,1.0", b"IIP:1.0\r\n"),
        (
            "obj=iip,1.0&fif=rgb.tif&Obj=max-size&OBJ=max-size",
            b"IIP:1.0\r\nMax-size:1000 750\r\nMax-size:1000 750\r\n",
        ),
        ("FIF=rgb.tif&&OBJ=Max-size&INV=&=x", b"\r\nMax-size:1000 750\r\n"),
        (
            "FIF=meta.tif&OBJ=subject&OBJ=description",
            b"\r\nsubject/13:A description\r\ndescription/13:A description\r\n",
        ),
        (
            "FIF=meta.tif&OBJ=summary-info",
            b"\r\ncopyright/9:CC-BY 4.0\r\nsubject/13:A description\r\nauthor/3:Ann\r\napp-name/5:stiff\r\n",
        ),
        (
            "FIF=meta.tif&OBJ=copyright&OBJ=author&OBJ=app-name&OBJ=title",
            b"\r\ncopyright/9:CC-BY 4.0\r\nauthor/3:Ann\r\napp-name/5:stiff\r\n",
        ),
        (
            "FIF=cube5.tif&OBJ=Min-Max-sample-values&OBJ=colorspace",
            b"\r\nMin-Max-sample-values: 0  255  0  255  0  255  0  255  0  255\r\nColorspace,0-0,0:0 0 1 1 0\r\n",
        ),
        (
            "OBJ=IIP-server&OBJ=iip-opt-comm",
            b"\r\nIIP-server:3.65\r\nIIP-opt-comm:CVT CNT QLT JTL JTLS WID HEI RGN MINMAX SHD CMP INV CTW\r\n",
        ),
    ],
)
def test_obj_bodies(app, query, body):
    r = call(app, query)
    assert (r.status, r.body) == (200, body)


@pytest.mark.parametrize(
    ("query", "body"),
    [
        ("FIF=rgb.tif&OBJ=foo", b"Error/7:3 2 foo\r\n"),
        ("FOO=1&BAR=2", b"Error/7:2 2 FOO\r\nError/7:2 2 BAR\r\n"),
        ("FIF=rgb.tif", b"Error/15:2 1 FIF=rgb.tif\r\n"),
        ("FIF=rgb.tif&OBJ=subject", b"Error/27:2 1 FIF=rgb.tif&OBJ=subject\r\n"),
        ("OBJ=Max-size", b"Error/12:1 3 max-size\r\n"),
        ("JTL=0,0", b"Error/4:1 3 \r\n"),
        ("FOO&OBJ=Max-size&BAR", b"Error/7:2 2 FOO\r\nError/12:1 3 max-size\r\n"),
        ("FIF=rgb.tif&JTL=x,1", b"Error/11:2 1 JTL=x,1\r\n"),
        ("MINMAX=1:0,1", b"Error/10:1 3 minmax\r\n"),
    ],
)
def test_iip_errors(app, query, body):
    r = call(app, query)
    assert (r.status, r.body) == (400, body)
    assert r.headers == [
        ("Server", f"iipserver/{__version__}"),
        ("Cache-Control", "no-cache"),
        ("Content-Type", "application/vnd.netfpx"),
        ("Content-Disposition", 'inline;filename="IIPisAMadGameClosedToOurUnderstanding.netfpx"'),
        ("Content-Length", str(len(body))),
    ]


@pytest.mark.parametrize(
    ("query", "status", "text"),
    [
        (
            "FIF=nonexist.tif&OBJ=IIP,1.0",
            404,
            b"nonexist.tif is neither a file nor part of an image sequence",
        ),
        ("FIF=rgb.tif&JTL=2,12", 404, b"Asked for non-existent tile: 12"),
        ("FIF=rgb.tif&JTL=3,0", 404, b"TIFFSetDirectory failed"),
        ("FIF=rgb.tif&JTL=4,0", 404, b"TPTImage :: Asked for non-existent resolution: 4"),
        ("FIF=rgb.tif&JTL=129500,1", 404, b"TPTImage :: Asked for non-existent resolution: 129500"),
        ("FIF=rgb.tif&JTL=0,99999999999999", 404, b"Asked for non-existent tile: 99999999999999"),
    ],
)
def test_not_found(app, data, query, status, text):
    r = call(app, query)
    assert (r.status, r.body) == (status, text)
    assert r.header("Content-Type") == "text/plain; charset=utf-8"
    assert str(data).encode() not in r.body


@pytest.mark.parametrize("query", ["", "FIF=rgb.tif&JTL=-1,0", "FIF=junk.tif&OBJ=Max-size"])
def test_banner(app, query):
    r = call(app, query)
    assert r.status == 400
    assert r.header("Content-Type").startswith("text/html")
    assert r.header("Content-Disposition") == 'inline;filename="iipsrv.html"'
    assert b"iipserver" in r.body


def test_tile_headers_and_pixels(app):
    r = call(app, "FIF=rgb.tif&JTL=0,0")
    assert r.status == 200
    assert r.names == [
        "Server",
        "X-Powered-By",
        "Content-Type",
        "Content-Length",
        "Last-Modified",
        "Cache-Control",
        "ETag",
    ]
    assert r.header("Content-Type") == "image/jpeg"
    assert int(r.header("Content-Length")) == len(r.body)
    tile = simplejpeg.decode_jpeg(r.body)
    assert tile.shape == (187, 250, 3)
    expected = pyramid_levels(rgb_image())[2]
    assert np.abs(tile.astype(int) - expected.astype(int)).mean() < 1.5


@pytest.mark.parametrize(("tile", "shape"), [(3, (256, 232)), (11, (238, 232)), (0, (256, 256))])
def test_edge_tiles_are_cropped(app, tile, shape):
    img = simplejpeg.decode_jpeg(call(app, f"FIF=rgb.tif&JTL=2,{tile}").body)
    assert img.shape[:2] == shape


def test_grey_image_gives_grey_jpeg(app):
    img = simplejpeg.decode_jpeg(call(app, "FIF=grey.tif&JTL=2,1").body, colorspace="GRAY")
    assert img.shape == (256, 256, 1)


def test_quality_changes_size(app):
    small = call(app, "FIF=rgb.tif&QLT=10&JTL=2,0").body
    big = call(app, "FIF=rgb.tif&QLT=95&JTL=2,0").body
    assert len(small) < len(big)


def test_float_tile_normalised_with_minmax_and_gamma(app):
    """Same formula as iipsrv 1.1: (v-min)/(max-min) in float32, ^gamma, ×255 truncated."""
    r = call(app, "FIF=ramp.tif&MINMAX=1:0,2000&GAM=0.5&PTL=0,0")
    assert r.header("Content-Type") == "image/png"
    got = imagecodecs.png_decode(r.body)
    level = pyramid_levels(np.linspace(0, 1000, 300 * 200, dtype=np.float32).reshape(200, 300))[1]
    v = (level - np.float32(0)) * np.float32(1 / 2000)
    v = np.power(np.maximum(v, 0), np.float32(0.5), dtype=np.float32)
    expected = np.clip((v.astype(np.float64) * 255.0).astype(np.float32), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(got, expected)


def test_uint16_uses_smax_and_minmax_is_one_based(app):
    base = imagecodecs.png_decode(call(app, "FIF=u16.tif&PTL=1,0").body)
    level = (np.arange(300 * 200, dtype=np.uint32).reshape(200, 300) % 65536).astype(np.uint16)
    expected = np.clip(
        level[:200, :256].astype(np.float32) / np.float32(60000) * 255.0, 0, 255
    ).astype(np.uint8)
    assert np.abs(base[:200, :256].astype(int) - expected.astype(int)).max() <= 1
    changed = imagecodecs.png_decode(call(app, "FIF=u16.tif&MINMAX=1:0,30000&PTL=1,0").body)
    ignored = imagecodecs.png_decode(call(app, "FIF=u16.tif&MINMAX=2:0,30000&PTL=1,0").body)
    assert not np.array_equal(changed, base)
    np.testing.assert_array_equal(ignored, base)


def test_two_band_float_flattens_to_first_band(app):
    r = call(app, "FIF=f2.tif&JTL=0,0")
    img = simplejpeg.decode_jpeg(r.body, colorspace="GRAY")
    assert img.shape == (100, 150, 1)


def test_five_band_cube_keeps_first_three(app):
    img = imagecodecs.png_decode(call(app, "FIF=cube5.tif&PTL=0,0").body)
    assert img.shape == (64, 80, 3)
    assert tuple(img[5, 5]) == (10, 20, 30)


def test_webp_tile(app):
    r = call(app, "FIF=rgb.tif&WTL=0,0")
    assert r.header("Content-Type") == "image/webp"
    assert imagecodecs.webp_decode(r.body).shape[:2] == (187, 250)


def test_colormap_invert_contrast(app):
    hot = imagecodecs.png_decode(call(app, "FIF=ramp.tif&MINMAX=1:0,1000&CMP=hot&PTL=0,0").body)
    assert hot.shape == (100, 150, 3)
    assert hot[0, 0, 0] < 5 and tuple(hot[0, 0, 1:]) == (0, 0)
    assert tuple(hot[-1, -1]) == (255, 255, 255) or hot[-1, -1, 2] > 200
    inv = imagecodecs.png_decode(call(app, "FIF=ramp.tif&MINMAX=1:0,1000&INV&PTL=0,0").body)
    assert inv[0, 0] >= 254 and inv[-1, -1] <= 1
    dim = imagecodecs.png_decode(call(app, "FIF=ramp.tif&MINMAX=1:0,1000&CNT=0.5&PTL=0,0").body)
    full = imagecodecs.png_decode(call(app, "FIF=ramp.tif&MINMAX=1:0,1000&PTL=0,0").body)
    assert dim.max() <= 128 and full.max() > 200


def test_rotation_and_flip(app):
    base = imagecodecs.png_decode(call(app, "FIF=rgb.tif&PTL=0,0").body)
    rot = imagecodecs.png_decode(call(app, "FIF=rgb.tif&ROT=90&PTL=0,0").body)
    flip = imagecodecs.png_decode(call(app, "FIF=rgb.tif&ROT=!0&PTL=0,0").body)
    np.testing.assert_array_equal(rot, np.rot90(base, k=-1))
    np.testing.assert_array_equal(flip, base[:, ::-1])


@pytest.mark.parametrize(
    ("since", "status"),
    [(MTIME, 304), (MTIME - 1, 200), (MTIME + 86400, 304)],
)
def test_if_modified_since(app, since, status):
    stamp = email.utils.formatdate(since, usegmt=True)
    r = call(app, "FIF=rgb.tif&JTL=0,0", headers={"If-Modified-Since": stamp})
    assert r.status == status
    if status == 304:
        assert r.body == b""


def test_unparsable_if_modified_since_is_ignored(app):
    assert call(app, "FIF=rgb.tif&JTL=0,0", headers={"If-Modified-Since": "garbage"}).status == 200


def test_cors_on_every_response(data):
    app = make_app(Settings.from_environ({"FILESYSTEM_PREFIX": f"{data}/", "CORS": "*"}))
    for query in [
        "FIF=rgb.tif&OBJ=Max-size",
        "FIF=rgb.tif&JTL=0,0",
        "FOO",
        "FIF=none.tif&OBJ=x",
        "",
    ]:
        assert call(app, query).header("Access-Control-Allow-Origin") == "*", query
    pre = call(app, "", method="OPTIONS")
    assert pre.status == 204
    assert pre.header("Access-Control-Allow-Methods") == "GET, POST, OPTIONS"


def test_cache_control_setting(data):
    app = make_app(
        Settings.from_environ({"FILESYSTEM_PREFIX": f"{data}/", "CACHE_CONTROL": "no-store"})
    )
    assert call(app, "FIF=rgb.tif&JTL=0,0").header("Cache-Control") == "no-store"
    assert call(app, "FOO").header("Cache-Control") == "no-cache"


def test_methods(app):
    head = call(app, "FIF=rgb.tif&JTL=0,0", method="HEAD")
    get = call(app, "FIF=rgb.tif&JTL=0,0")
    assert head.status == 200 and head.body == b""
    assert head.header("Content-Length") == get.header("Content-Length")
    post = call(app, "", method="POST", body=b"FIF=rgb.tif&OBJ=Max-size")
    assert post.body == b"\r\nMax-size:1000 750\r\n"
    assert call(app, "FIF=rgb.tif&OBJ=Max-size", method="DELETE").status == 405


def test_output_command_answers_and_later_commands_are_ignored(app):
    r = call(app, "FIF=rgb.tif&JTL=0,0&FOO=1&JTL=1,0")
    assert r.status == 200
    assert simplejpeg.decode_jpeg(r.body).shape == (187, 250, 3)


def test_server_fault_is_generic_500(app, monkeypatch, caplog):
    def boom(*args, **kwargs):
        raise RuntimeError("secret internal detail /srv/data")

    monkeypatch.setattr(app.pipeline, "tile", boom)
    r = call(app, "FIF=rgb.tif&JTL=0,0")
    assert r.status == 500
    assert r.body == b"Internal server error"
    assert "RuntimeError" in caplog.text


def test_raw_tile_cache_serves_repeated_reads(data, tmp_path):
    levels = pyramid_levels(rgb_image(300, 200))
    write_pyramid(tmp_path / "deflate.tif", levels, compression="zlib")
    write_pyramid(tmp_path / "plain.tif", levels)
    app = make_app(Settings.from_environ({"FILESYSTEM_PREFIX": f"{tmp_path}/"}))
    call(app, "FIF=deflate.tif&GAM=0.5&JTL=0,0")
    call(app, "FIF=deflate.tif&GAM=2&JTL=0,0")
    assert app.pipeline.raw_tiles.hits == 1
    # uncompressed tiles are read again: a read costs about what a cache entry saves
    call(app, "FIF=plain.tif&GAM=0.5&JTL=0,0")
    call(app, "FIF=plain.tif&GAM=2&JTL=0,0")
    assert app.pipeline.raw_tiles.hits == 1 and len(app.pipeline.raw_tiles) == 1
    app.clear_caches()
    assert len(app.pipeline.raw_tiles) == 0


def test_replaced_file_is_reread(tmp_path):
    levels = pyramid_levels(rgb_image(300, 200))
    write_pyramid(tmp_path / "x.tif", levels, photometric="rgb")
    app = make_app(Settings.from_environ({"FILESYSTEM_PREFIX": f"{tmp_path}/"}))
    assert call(app, "FIF=x.tif&OBJ=Max-size").body == b"\r\nMax-size:300 200\r\n"
    write_pyramid(tmp_path / "x.tif", pyramid_levels(rgb_image(400, 100)), photometric="rgb")
    os.utime(tmp_path / "x.tif", (MTIME, MTIME))
    assert call(app, "FIF=x.tif&OBJ=Max-size").body == b"\r\nMax-size:400 100\r\n"
