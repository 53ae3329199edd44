"""The VisiOmatic 3 dialect against values recorded from VisiOmatic 3.0.7's own server.

The images are regenerated exactly as the recording's FITS files were (seeded numpy: a
2000×1500 float32 sky, then a 3-band cube), stored as TIFF with the rows flipped (TIFF's first
row is the top, FITS's the bottom), and the server's answers must equal the recorded ones:
pixel values, profiles and region sizes exactly; background statistics and default cuts to
float32 rounding (VisiOmatic pins numpy 1.x, whose float32 sums run in another order than
numpy 2's; iipserver accumulates its means in double).
Rendering formulas are checked against a direct numpy transcription of visiomatic.md §3.
"""

import hashlib
import json

import numpy as np
import pytest
import simplejpeg
from images import pyramid_levels, write_pyramid
from wsgi_client import call

from iipserver import colormaps
from iipserver import display as d
from iipserver.app import make_app
from iipserver.settings import Settings


def _sky(rng, h, w, bg=100.0, sig=3.0, scale=1.0):
    img = rng.normal(bg * scale, sig * np.sqrt(scale), size=(h, w)).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(60):
        x0, y0, f = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(100, 5000)
        img += (f * scale * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * 2.0**2))).astype(
            np.float32
        )
    return img


def _card(key, value):
    if isinstance(value, str):
        value = f"'{value:<8}'"
    return f"{key:<8}= {value:>20}".ljust(80)


HEADER = (
    "".join(
        _card(k, v)
        for k, v in [
            ("SIMPLE", "T"),
            ("BITPIX", -32),
            ("NAXIS", 2),
            ("NAXIS1", 2000),
            ("NAXIS2", 1500),
            ("OBJECT", "TESTFIELD"),
            ("FILTER", "r"),
            ("CTYPE1", "RA---TAN"),
            ("CTYPE2", "DEC--TAN"),
            ("CRPIX1", 1000.5),
            ("CRPIX2", 750.5),
            ("CRVAL1", 150.1),
            ("CRVAL2", 2.2),
            ("CDELT1", -5.6e-05),
            ("CDELT2", 5.6e-05),
        ]
    )
    + "COMMENT   a comment".ljust(80)
    + "END".ljust(80)
).ljust(2880)


@pytest.fixture(scope="module")
def fits_like(tmp_path_factory):
    """(app, single, cube) with the FITS-orientation arrays for direct checks."""
    rng = np.random.default_rng(42)
    single = _sky(rng, 1500, 2000)
    cube = np.stack([_sky(rng, 1500, 2000, scale=s) for s in (0.5, 1.0, 1.5)], axis=2)
    root = tmp_path_factory.mktemp("v3")
    write_pyramid(root / "single.tif", pyramid_levels(np.flipud(single)), description=HEADER)
    write_pyramid(
        root / "cube3.tif",
        pyramid_levels(np.flipud(cube)),
        photometric="minisblack",
        planarconfig="contig",
    )
    app = make_app(Settings.from_environ({"FILESYSTEM_PREFIX": f"{root}/"}))
    return app, single, cube


def get(app, query):
    return call(app, query, path="/api")


def test_info_matches_the_recorded_statistics(fits_like):
    app, _, _ = fits_like
    r = get(app, "FIF=single.tif&INFO")
    assert (r.status, r.header("Content-Type")) == (200, "application/json")
    info = json.loads(r.body)
    assert list(info)[:15] == [
        "type",
        "version",
        "image_name",
        "object_name",
        "full_size",
        "tile_size",
        "tile_levels",
        "channels",
        "bits_per_channel",
        "brightness",
        "contrast",
        "color_saturation",
        "gamma",
        "quality",
        "header",
    ]
    assert info["type"] == "visiomatic" and info["version"] == "3.0"
    assert (info["image_name"], info["object_name"]) == ("single.tif", "TESTFIELD")
    assert (info["full_size"], info["tile_size"], info["tile_levels"]) == (
        [2000, 1500],
        [256, 256],
        4,
    )
    assert (
        info["brightness"],
        info["contrast"],
        info["color_saturation"],
        info["gamma"],
        info["quality"],
    ) == (0.0, 1.0, 1.5, 2.2, 95)
    image = info["images"][0]
    assert image["background_level"] == pytest.approx([100.00918579101562], rel=3e-7)
    assert image["background_mad"] == pytest.approx([1.9193369150161743], rel=3e-7)
    assert image["min_max"][0] == pytest.approx([96.1705093383789, 867.743896484375], rel=3e-7)
    assert image["size"] == [2000, 1500, 1]
    assert image["dataslice"] == [[1, 2000, 1], [1, 1500, 1]]
    header = info["header"]
    assert header["CD1_1"] == -5.6e-05 and header["CD2_2"] == 5.6e-05 and header["CD1_2"] == 0.0
    assert "CDELT1" not in header and header["NAXIS3"] == 1
    assert header["COMMENT"] == "a comment"
    assert image["header"]["CDELT1"] == -5.6e-05  # per-image headers stay as stored


def test_cube_statistics(fits_like):
    app, _, _ = fits_like
    image = json.loads(get(app, "FIF=cube3.tif&INFO").body)["images"][0]
    levels = [49.99187469482422, 100.01131439208984, 150.0047149658203]
    assert image["background_level"] == pytest.approx(levels, rel=3e-7)
    mads = [1.3554656505584717, 1.9154763221740723, 2.355243444442749]
    assert image["background_mad"] == pytest.approx(mads, rel=3e-7)
    cuts = [
        [47.28094482421875, 592.1781616210938],
        [96.18035888671875, 866.2018432617188],
        [145.2942352294922, 1092.10205078125],
    ]
    for got, want in zip(image["min_max"], cuts, strict=True):
        assert got == pytest.approx(want, rel=3e-7)


@pytest.mark.parametrize(
    ("query", "values"),
    [
        ("CHAN=1&VAL=1001,749", [98.00273132324219]),
        ("CHAN=1&VAL=0,1", [None]),
        ("CHAN=1&VAL=2000,1500", [96.34326171875]),
        ("CHAN=1&VAL=2001,1500", [None]),
        ("CHAN=1&CHAN=2&VAL=1,1", [None, None]),
    ],
)
def test_pixel_values(fits_like, query, values):
    app, single, _ = fits_like
    r = get(app, f"FIF=single.tif&{query}")
    if query == "CHAN=1&CHAN=2&VAL=1,1":  # a channel the image lacks is null
        values = [float(single[0, 0]), None]
    assert json.loads(r.body) == {"values": values}


def test_profiles(fits_like):
    app, _, cube = fits_like
    r = get(app, "FIF=cube3.tif&PFL=1481,753:1481,753")
    assert json.loads(r.body) == {
        "profile": [
            {
                "x": 1480,
                "y": 752,
                "values": [48.4420280456543, 101.07311248779297, 154.7358856201172],
            }
        ]
    }
    line = json.loads(get(app, "FIF=cube3.tif&CHAN=3&CHAN=1&PFL=3,2:1,1").body)["profile"]
    assert [(p["x"], p["y"]) for p in line] == [(2, 1), (1, 0), (0, 0)]
    assert line[0]["values"] == [float(cube[1, 2, 2]), float(cube[1, 2, 0])]
    long = json.loads(get(app, "FIF=cube3.tif&CHAN=1&PFL=7,4:106,34").body)["profile"]
    assert len(long) == 100 and [(p["x"], p["y"]) for p in long[:3]] == [(6, 3), (7, 3), (8, 4)]
    outside = json.loads(get(app, "FIF=cube3.tif&CHAN=1&PFL=-1,1:2,1").body)["profile"]
    assert [p["values"] for p in outside[:2]] == [[None], [None]] and outside[2]["values"][
        0
    ] is not None


@pytest.mark.parametrize(
    ("rgn", "size"),
    [
        ("-568,-648:3528,2152&BIN=4", (500, 375)),
        ("1,1:257,257&BIN=1", (256, 256)),
        ("100,200:300,250&BIN=1", (200, 50)),
        ("100,200:300,250&BIN=3", (100, 25)),
        ("0,0:2000,1500&BIN=2", (999, 749)),
        ("1500,1000:2100,1600", (501, 501)),
    ],
)
def test_region_sizes(fits_like, rgn, size):
    app, _, _ = fits_like
    r = get(app, f"FIF=single.tif&CHAN=1&RGN={rgn}")
    assert r.status == 200, r.body
    img = simplejpeg.decode_jpeg(r.body, colorspace="GRAY")
    assert img.shape[1::-1] == size


def _mono(x, lo, hi, cnt=1.0, brt=0.0, gam=2.2, inv=False):
    fac = cnt / (hi - lo)
    v = np.nan_to_num(x - lo, nan=0.0) * fac + 0.01 * cnt * brt
    v = np.clip(v, 0, 1).astype(np.float32)
    out = (255.49 * np.power(v, np.float32(1 / gam))).astype(np.uint8)
    return 255 - out if inv else out


def test_mono_tile_formula(fits_like):
    app, single, _ = fits_like
    top = np.flipud(single)[:256, :256]
    lo, hi = 96.1705093383789, 867.743896484375
    r = get(app, "FIF=single.tif&CHAN=1&QLT=100&JTL=3,0")
    tile = simplejpeg.decode_jpeg(r.body, colorspace="GRAY")[:, :, 0].astype(int)
    assert np.abs(tile - _mono(top, np.float32(lo), np.float32(hi)).astype(int)).max() <= 2
    r = get(
        app, "FIF=single.tif&CHAN=1&CNT=2.5&BRT=5&GAM=1.5&INV&MINMAX=1:90,500.5&QLT=100&JTL=3,0"
    )
    tile = simplejpeg.decode_jpeg(r.body, colorspace="GRAY")[:, :, 0].astype(int)
    expected = _mono(top, 90.0, 500.5, cnt=2.5, brt=5, gam=1.5, inv=True).astype(int)
    assert np.abs(tile - expected).max() <= 2


def test_colour_tile_mix_interpolation(fits_like):
    app, _, cube = fits_like
    q = "FIF=cube3.tif&MIX=1:0,0,1&MIX=3:1,0,0&QLT=100&JTL=3,0"
    tile = simplejpeg.decode_jpeg(get(app, q).body).astype(int)
    top = np.flipud(cube)[:256, :256].astype(np.float32)
    cuts = np.array(
        [
            [47.28094482421875, 592.1781616210938],
            [96.18035888671875, 866.2018432617188],
            [145.2942352294922, 1092.10205078125],
        ],
        np.float32,
    )
    matrix = np.array([[0, 0.5, 1], [0, 0, 0], [1, 0.5, 0]], np.float32)  # channel 2 interpolated
    np.testing.assert_allclose(d.mix_matrix(3, [(1, 0, 0, 1), (3, 1, 0, 0)]), matrix, atol=1e-7)
    v = (top - cuts[:, 0]) * (1 / (cuts[:, 1] - cuts[:, 0]))
    rgb = np.clip(v @ matrix.T, 0, 1).astype(np.float32)
    expected = (255.49 * np.power(rgb, np.float32(1 / 2.2))).astype(np.uint8).astype(int)
    diff = np.abs(tile - expected)
    assert diff.max() <= 5 and diff.mean() < 1  # JPEG q100 4:4:4 colour rounding


def test_colormap_tiles_are_rgb(fits_like):
    app, _, _ = fits_like
    for name in ("jet", "cold", "cool", "hot"):
        img = simplejpeg.decode_jpeg(get(app, f"FIF=single.tif&CHAN=1&CMP={name}&JTL=1,0").body)
        assert img.shape == (256, 256, 3)


def test_colormap_tables_equal_opencvs():
    # sha256 of the 256×3 RGB tables dumped from OpenCV 4.11 / 5.0 (cv2.applyColorMap, BGR→RGB)
    expected = {
        "jet": "661fa696672fecb0ffa3e76bff80e0119d8308227c361c0043f705d8c867faad",
        "cool": "8359bf7127b4de4f276ad8853e3553b7ac51597617cb0cbd9a9b26ea8cc9660a",
        "hot": "46fc296710558f0dd28c7a8c198518b3b47752e1a7d910a8b36cb7d841275747",
    }
    for name, digest in expected.items():
        assert hashlib.sha256(colormaps.table(name).tobytes()).hexdigest() == digest
    assert colormaps.table("jet")[[0, 128, 255]].tolist() == [
        [0, 0, 128],
        [130, 255, 126],
        [128, 0, 0],
    ]


def test_background_statistic_on_a_hand_example():
    x = np.array([[1.0, 2.0, 3.0, 4.0, 100.0]], dtype=np.float32)
    level, mad = d.background(x)
    # norm = mean = 22; clipped at 3·MAD removes 100; med = 2.5/22, mad = 1/22
    assert mad[0] == pytest.approx(1.0, rel=1e-6)
    assert level[0] == pytest.approx(3.5 * 2.5 - 2.5 * 2.5, rel=1e-6)


def test_bresenham_line():
    xs, ys = d.line(0, 0, 5, 2)
    assert list(zip(xs.tolist(), ys.tolist(), strict=True)) == [
        (0, 0),
        (1, 0),
        (2, 1),
        (3, 1),
        (4, 2),
        (5, 2),
    ]
    xs, ys = d.line(2, 5, 2, 5)
    assert (xs.tolist(), ys.tolist()) == ([2], [5])


@pytest.mark.parametrize(
    ("query", "status", "loc"),
    [
        ("FIF=single.tif&CHAN=1&CNT=1001&JTL=0,0", 422, "CNT"),
        ("FIF=single.tif&CHAN=1&GAM=0.1&JTL=0,0", 422, "GAM"),
        ("FIF=single.tif&CHAN=1&BRT=101&JTL=0,0", 422, "BRT"),
        ("FIF=single.tif&CHAN=1&QLT=50.5&JTL=0,0", 422, "QLT"),
        ("FIF=single.tif&CHAN=1&CMP=viridis&JTL=0,0", 422, "CMP"),
        ("FIF=single.tif&CHAN=a&JTL=0,0", 422, "CHAN"),
        ("FIF=single.tif&BIN=0&RGN=1,1:2,2", 422, "BIN"),
        ("FIF=single.tif&MINMAX=1:a,b&CHAN=1&JTL=0,0", 422, "MINMAX"),
        ("FIF=nope.tif&INFO", 404, "FIF"),
        ("FIF=../../etc/passwd&INFO", 404, "FIF"),
        ("FIF=single.tif&CHAN=1&RGN=5,5:1,1", 400, "RGN"),
        ("INFO", 422, "FIF"),
    ],
)
def test_errors_are_json_with_a_4xx_status(fits_like, query, status, loc):
    app, _, _ = fits_like
    r = get(app, query)
    assert (r.status, r.header("Content-Type")) == (status, "application/json")
    detail = json.loads(r.body)["detail"][0]
    assert detail["loc"] == ["query", loc] and detail["msg"]
    assert b"/tmp" not in r.body


def test_iip_dialect_is_unchanged_on_the_same_endpoint(fits_like):
    app, _, _ = fits_like
    body = get(app, "FIF=single.tif&obj=IIP,1.0&obj=max-size&obj=subject").body
    assert body.startswith(b"IIP:1.0\r\nMax-size:2000 1500\r\nsubject/")
    assert b"CD1_1   =" in body
