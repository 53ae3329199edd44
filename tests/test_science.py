"""CVT, PFL, SPECTRA, TIL and image sequences through the WSGI app (in-process)."""

import json
import os

import imagecodecs
import numpy as np
import pytest
import simplejpeg
from images import pyramid_levels, rgb_image, write_pyramid
from wsgi_client import call

from iipserver.app import make_app
from iipserver.settings import Settings


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("science")
    write_pyramid(d / "rgb.tif", pyramid_levels(rgb_image()), photometric="rgb")
    f = np.arange(40 * 30, dtype=np.float32).reshape(30, 40) / 7
    f[0, 3] = np.nan
    f[0, 4] = np.inf
    write_pyramid(d / "f.tif", [f])
    u16 = (np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50).astype(np.uint16)
    write_pyramid(d / "u16.tif", [u16])
    noise = np.random.default_rng(5).integers(0, 255, (60, 80), dtype=np.uint8)
    write_pyramid(d / "noise.tif", [noise], photometric="minisblack")
    for x in (0, 10, 20):
        for y in (80, 90):
            level = np.full((20, 30), x + y, dtype=np.uint8)
            write_pyramid(d / f"seq_pyr_{x:03d}_{y:03d}.tif", [level])
    return d


@pytest.fixture(scope="module")
def app(data):
    return make_app(Settings.from_environ({"FILESYSTEM_PREFIX": f"{data}/"}))


def test_cvt_size_headers_and_pixels(app):
    r = call(app, "FIF=rgb.tif&WID=200&CVT=jpeg")
    assert r.status == 200
    assert r.header("Content-Disposition") == 'inline;filename="rgb.jpg"'
    assert r.header("Content-Type") == "image/jpeg"
    img = simplejpeg.decode_jpeg(r.body)
    assert img.shape == (150, 200, 3)
    expected = rgb_image()[::5, ::5][:150, :200]
    assert np.abs(img.astype(int) - expected.astype(int)).mean() < 3


@pytest.mark.parametrize(
    ("query", "size"),
    [
        ("HEI=100", (133, 99)),
        ("RGN=0,0,0.5,0.25&WID=200", (199, 75)),
        ("WID=6000", (5000, 3750)),
        ("RGN=0,0,0.5,0.25", (1000, 376)),
        ("CVT=jpeg&WID=100", (1000, 750)),
    ],
)
def test_cvt_sizes(app, query, size):
    r = call(app, f"FIF=rgb.tif&{query}&CVT=jpeg" if "CVT" not in query else f"FIF=rgb.tif&{query}")
    assert simplejpeg.decode_jpeg(r.body).shape[1::-1] == size


def test_cvt_png_region_is_exact_at_level_scale(app):
    r = call(app, "FIF=rgb.tif&RGN=0.5,0.5,0.25,0.25&WID=250&CVT=png")
    assert r.header("Content-Type") == "image/png"
    img = imagecodecs.png_decode(r.body)
    expected = rgb_image()[375 : 375 + 188, 500:750]
    assert img.shape[:2] == (188, 250)
    np.testing.assert_array_equal(img, expected)


def test_cvt_rotation_swaps_size(app):
    img = simplejpeg.decode_jpeg(call(app, "FIF=rgb.tif&ROT=90&WID=200&CVT=jpeg").body)
    assert img.shape[:2] == (200, 150)


def test_cvt_without_image_and_hostile_names(app, data):
    assert call(app, "CVT=jpeg").body == b"Error/4:1 3 \r\n"
    (data / 'a"b\r\nX-Evil: 1.tif').write_bytes((data / "rgb.tif").read_bytes())
    r = call(app, "FIF=a%22b%0D%0AX-Evil:%201.tif&WID=10&CVT=jpeg")
    assert r.status == 200
    assert r.header("X-Evil") is None
    assert r.header("Content-Disposition") == 'inline;filename="a_b__X-Evil: 1.jpg"'


def test_cvt_interpolation_setting(data):
    nearest = make_app(
        Settings.from_environ({"FILESYSTEM_PREFIX": f"{data}/", "INTERPOLATION": "0"})
    )
    a = imagecodecs.png_decode(call(nearest, "FIF=noise.tif&WID=53&CVT=png").body)
    b = imagecodecs.png_decode(
        call(
            make_app(Settings.from_environ({"FILESYSTEM_PREFIX": f"{data}/"})),
            "FIF=noise.tif&WID=53&CVT=png",
        ).body
    )
    assert a.shape == b.shape == (40, 53)
    noise = np.random.default_rng(5).integers(0, 255, (60, 80), dtype=np.uint8)
    rows = np.floor(np.arange(40, dtype=np.float32) * np.float32(60 / 40)).astype(int)
    cols = np.floor(np.arange(53, dtype=np.float32) * (np.float32(80) / np.float32(53))).astype(int)
    np.testing.assert_array_equal(a, noise[rows][:, cols])
    assert not np.array_equal(a, b)


def test_profile_line_point_and_nan(app):
    r = call(app, "FIF=u16.tif&PFL=0:2,1-5,1")
    assert r.header("Content-Type") == "application/json"
    assert r.body == b'{\n\t"profile": [2100,2150,2200]\n}'
    assert json.loads(call(app, "FIF=u16.tif&PFL=0:2,1-2,4").body)["profile"] == [2100, 4100, 6100]
    assert json.loads(call(app, "FIF=u16.tif&PFL=0:2,1").body)["profile"] == [2100]
    body = call(app, "FIF=f.tif&PFL=0:2,0-6,0").body
    assert body == b'{\n\t"profile": [0.285714298,null,null,0.714285731]\n}'
    assert json.loads(body)["profile"][1] is None
    rgb = json.loads(call(app, "FIF=rgb.tif&PFL=2:10,10-12,10").body)["profile"]
    assert len(rgb) == 6


@pytest.mark.parametrize("query", ["PFL=5:0,0-1,0", "PFL=0:40,0", "PFL=0:-1,0-3,0", "PFL=0:0,30"])
def test_profile_errors(app, query):
    r = call(app, f"FIF=u16.tif&{query}")
    assert r.status == 400
    assert call(app, "PFL=0:0,0-10,0").body == b"Error/4:1 3 \r\n"


def test_spectra(app):
    # iipsrv indexes samples with the nominal tile width (256) as the row stride: (1, 2) is
    # sample 258 of this 40-wide edge tile, value (6·40 + 18)·50 = 12900
    r = call(app, "FIF=u16.tif&SPECTRA=0,0,2,1")
    assert r.header("Content-Type") == "application/xml"
    assert r.body == (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<spectra>\n\t<point>\n\t\t<wavelength>0'
        b"</wavelength>\n\t\t<reflectance>0.196841</reflectance>\n\t</point>\n</spectra>"
    )
    bad = call(app, "FIF=u16.tif&SPECTRA=0,0,300,1")
    assert (bad.status, bad.body) == (
        400,
        b"SPECTRA :: Error: x,y coordinates outside of tile boundaries",
    )
    assert call(app, "FIF=u16.tif&SPECTRA=0,0,50,25").body.endswith(b"<spectra>\n</spectra>")
    assert call(app, "SPECTRA=0,0,0,0").status == 400


def test_til_records(app):
    r = call(app, "FIF=u16.tif&TIL=0,0")
    assert r.header("Content-Type") == "application/vnd.netfpx"
    head = b"Tile,0,0,0/%d:" % (40 * 30 * 2 + 8)
    assert r.body.startswith(head + b"\x03\x00\x00\x00\x00\x11\x00\x00")
    data = r.body[len(head) + 8 : -2]
    np.testing.assert_array_equal(
        np.frombuffer(data, "<u2").reshape(30, 40), np.arange(1200).reshape(30, 40) * 50
    )
    multi = call(app, "FIF=rgb.tif&TIL=2,2-5").body
    assert [int(x) for x in __import__("re").findall(rb"Tile,2,(\d+),0/", multi)] == [1, 5, 2, 6]
    assert call(app, "FIF=rgb.tif&TIL=2,3-0").body.count(b"Tile,") == 1
    assert call(app, "FIF=rgb.tif&TIL=9,0").status == 404


def test_sequences(app):
    r = call(app, "FIF=seq&OBJ=Horizontal-views&OBJ=Vertical-views&OBJ=Max-size")
    assert r.body == b"\r\nHorizontal-views:0 10 20\r\nVertical-views:80 90\r\nMax-size:30 20\r\n"

    def pixel(query):
        return imagecodecs.png_decode(call(app, query).body).ravel()[0]

    assert pixel("FIF=seq&PTL=0,0") == 90
    assert pixel("FIF=seq&SDS=10,80&PTL=0,0") == 90
    assert pixel("FIF=seq&SDS=20,90&PTL=0,0") == 110
    jtls = simplejpeg.decode_jpeg(call(app, "FIF=seq&JTLS=10,0,0,80").body, colorspace="GRAY")
    assert abs(int(jtls[0, 0, 0]) - 90) <= 1
    missing = call(app, "FIF=seq&SDS=5,90&JTL=0,0")
    assert missing.status == 404
    assert b"seq_pyr_005_090.tif" in missing.body and os.sep + "tmp" not in missing.body.decode()
    profile = json.loads(call(app, "FIF=seq&SDS=0,80&PFL=0:1,1-3,1").body)["profile"]
    assert profile == {"0": [80, 80], "10": [90, 90], "20": [100, 100]}
