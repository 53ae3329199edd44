"""IIIF Image API 3/2 parsing and answers, DeepZoom and Zoomify, in-process."""

import json

import imagecodecs
import numpy as np
import pytest
import simplejpeg
from images import pyramid_levels, rgb_image, write_pyramid
from wsgi_client import call

from iipserver.app import make_app
from iipserver.errors import BadRequest, NotImplementedCommand
from iipserver.protocol.iiif import (
    Box,
    parse_quality_format,
    parse_region,
    parse_rotation,
    parse_size,
)
from iipserver.settings import Settings

LIMITS = (5000, 5000)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("iiif")
    write_pyramid(d / "rgb.tif", pyramid_levels(rgb_image()), photometric="rgb")
    (d / "sub dir").mkdir()
    write_pyramid(
        d / "sub dir" / "grey.tif",
        pyramid_levels(rgb_image(300, 200)[:, :, 0]),
        photometric="minisblack",
    )
    return d


def app_for(root, **env):
    return make_app(Settings.from_environ({"FILESYSTEM_PREFIX": f"{root}/", **env}))


@pytest.mark.parametrize(
    ("text", "box"),
    [
        ("full", Box(0, 0, 1000, 750)),
        ("square", Box(125, 0, 750, 750)),
        ("10,20,30,40", Box(10, 20, 30, 40)),
        ("900,700,500,500", Box(900, 700, 100, 50)),
        ("pct:10,20,50,50", Box(100, 150, 500, 375)),
        ("pct:0,0,100,100", Box(0, 0, 1000, 750)),
    ],
)
def test_regions(text, box):
    import dataclasses

    assert dataclasses.replace(parse_region(text, 1000, 750), fractions=None) == box


@pytest.mark.parametrize(
    "text",
    ["0,0,0,10", "1000,0,10,10", "0,750,5,5", "a,b,c,d", "1,2,3", "pct:1,2,3", "full,1,2,3,4"],
)
def test_bad_regions(text):
    with pytest.raises(BadRequest):
        parse_region(text, 1000, 750)


@pytest.mark.parametrize(
    ("text", "version", "size"),
    [
        ("max", 3, (1000, 750)),
        ("full", 2, (1000, 750)),
        ("500,", 3, (500, 375)),
        (",375", 3, (500, 375)),
        ("400,100", 3, (400, 100)),
        ("!400,400", 3, (400, 300)),
        ("pct:50", 3, (500, 375)),
        ("^2000,", 3, (2000, 1500)),
        ("2000,", 2, (2000, 1500)),
        ("^max", 3, (5000, 3750)),
    ],
)
def test_sizes(text, version, size):
    assert parse_size(text, Box(0, 0, 1000, 750), version, LIMITS, True) == size


@pytest.mark.parametrize(
    ("text", "version", "upscaling"),
    [
        ("2000,", 3, True),
        ("^2000,", 3, False),
        ("0,", 3, True),
        (",0", 3, True),
        ("full", 3, True),
        ("^500,", 2, True),
        ("6000,", 2, True),
        ("a,", 3, True),
        (",", 3, True),
        ("pct:0", 3, True),
        ("!0,5", 3, True),
    ],
)
def test_bad_sizes(text, version, upscaling):
    with pytest.raises(BadRequest):
        parse_size(text, Box(0, 0, 1000, 750), version, LIMITS, upscaling)


def test_max_is_limited_by_max_cvt():
    assert parse_size("max", Box(0, 0, 1000, 750), 3, (500, 500), True) == (500, 375)


def test_rotation_quality_format():
    assert (
        parse_rotation("0") == (0, 0)
        and parse_rotation("!90") == (90, 1)
        and parse_rotation("360") == (0, 0)
    )
    with pytest.raises(NotImplementedCommand):
        parse_rotation("45")
    with pytest.raises(BadRequest):
        parse_rotation("-90")
    assert parse_quality_format("gray.png")[0] == "grey"
    with pytest.raises(NotImplementedCommand):
        parse_quality_format("default.tif")
    with pytest.raises(BadRequest):
        parse_quality_format("fancy.jpg")
    with pytest.raises(BadRequest):
        parse_quality_format("default.xyz")


def test_info_json_v3(root):
    app = app_for(root, CORS="*", COPYRIGHT="http://rightsstatements.org/vocab/InC/1.0/")
    r = call(app, "IIIF=rgb.tif/info.json", headers={"Host": "img.example:8080"})
    assert r.status == 200
    assert (
        r.header("Content-Type")
        == 'application/ld+json;profile="http://iiif.io/api/image/3/context.json"'
    )
    assert r.header("Access-Control-Allow-Origin") == "*"
    info = json.loads(r.body)
    assert info["id"] == "http://img.example:8080/fcgi-bin/iipsrv.fcgi?IIIF=rgb.tif"
    assert (info["type"], info["profile"], info["width"], info["height"]) == (
        "ImageService3",
        "level2",
        1000,
        750,
    )
    assert info["sizes"] == [{"width": 250, "height": 187}, {"width": 500, "height": 375}]
    assert info["tiles"] == [{"width": 256, "height": 256, "scaleFactors": [1, 2, 4]}]
    assert (info["maxWidth"], info["maxHeight"]) == (5000, 5000)
    assert "color" in info["extraQualities"] and "sizeUpscaling" in info["extraFeatures"]
    assert info["rights"] == "http://rightsstatements.org/vocab/InC/1.0/"


def test_info_json_v2_by_setting_and_by_accept(root):
    v2 = json.loads(call(app_for(root, IIIF_VERSION="2"), "IIIF=rgb.tif/info.json").body)
    assert v2["@context"] == "http://iiif.io/api/image/2/context.json"
    assert v2["profile"][0] == "http://iiif.io/api/image/2/level2.json"
    accept = {"Accept": 'application/ld+json;profile="http://iiif.io/api/image/2/context.json"'}
    r = call(app_for(root), "IIIF=rgb.tif/info.json", headers=accept)
    assert (
        json.loads(r.body)["@id"].endswith("IIIF=rgb.tif")
        and r.header("Content-Type") == "application/ld+json"
    )


def test_ids_behind_a_proxy_and_with_base_url(root):
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "iiif.example.org"}
    r = call(
        app_for(root, URI_MAP="iiif=>IIIF"), "", path="/iiif/rgb.tif/info.json", headers=headers
    )
    assert json.loads(r.body)["id"] == "https://iiif.example.org/iiif/rgb.tif"
    based = call(app_for(root, BASE_URL="https://cdn.example/iiif/"), "IIIF=rgb.tif/info.json")
    assert json.loads(based.body)["id"] == "https://cdn.example/iiif/rgb.tif"


def test_path_style_with_an_encoded_identifier(root):
    app = app_for(root, URI_MAP="iiif=>IIIF")
    r = call(app, "", path="/iiif/sub%20dir%2Fgrey.tif/full/max/0/default.png")
    assert r.status == 200 and imagecodecs.png_decode(r.body).shape == (200, 300)
    assert call(app, "", path="/iiif/..%2F..%2Fetc%2Fpasswd/info.json").status == 404
    assert call(app, "", path="/iiif/%2Fetc%2Fpasswd/info.json").status == 404


def test_redirect(root):
    r = call(app_for(root), "IIIF=rgb.tif", headers={"Host": "localhost"})
    assert r.status == 303
    assert r.header("Location") == "http://localhost/fcgi-bin/iipsrv.fcgi?IIIF=rgb.tif/info.json"


def test_aligned_tile_goes_through_the_tile_path(root):
    app = app_for(root)
    tile = call(app, "IIIF=rgb.tif/0,0,512,512/256,/0/default.jpg")
    jtl = call(app, "FIF=rgb.tif&JTL=1,0")
    assert tile.body == jtl.body
    edge = call(app, "IIIF=rgb.tif/768,0,232,256/232,/0/default.jpg")
    assert edge.body == call(app, "FIF=rgb.tif&JTL=2,3").body
    assert tile.header("Link") == '<http://iiif.io/api/image/3/level2.json>;rel="profile"'


def test_region_pixels(root):
    img = imagecodecs.png_decode(
        call(app_for(root), "IIIF=rgb.tif/100,200,300,100/max/0/default.png").body
    )
    np.testing.assert_array_equal(img, rgb_image()[200:300, 100:400])
    rot = imagecodecs.png_decode(
        call(app_for(root), "IIIF=rgb.tif/100,200,300,100/max/!90/default.png").body
    )
    np.testing.assert_array_equal(rot, np.rot90(rgb_image()[200:300, 100:400][:, ::-1], k=-1))
    grey = imagecodecs.png_decode(call(app_for(root), "IIIF=rgb.tif/0,0,10,10/max/0/gray.png").body)
    assert grey.shape == (10, 10)
    bitonal = imagecodecs.png_decode(
        call(app_for(root), "IIIF=rgb.tif/full/100,/0/bitonal.png").body
    )
    assert set(np.unique(bitonal)) <= {0, 255}


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("IIIF=rgb.tif/full/max/0/default.tif", 501),
        ("IIIF=rgb.tif/full/max/22.5/default.jpg", 501),
        ("IIIF=rgb.tif/full/max/0/foo.jpg", 400),
        ("IIIF=rgb.tif/nope/max/0/default.jpg", 400),
        ("IIIF=rgb.tif/full/0", 400),
        ("IIIF=missing.tif/info.json", 404),
        ("IIIF=missing.tif/full/max/0/default.jpg", 404),
        ("IIIF=rgb.tif/full,32912,500,500/max/0/default.jpg", 400),
        ("IIIF=rgb.tif/full/999999,/0/default.jpg", 400),
    ],
)
def test_error_statuses(root, query, status):
    r = call(app_for(root), query)
    assert r.status == status and r.header("Content-Type").startswith("text/plain")
    assert str(root).encode() not in r.body


def test_deepzoom_and_zoomify(root):
    app = app_for(root)
    dzi = call(app, "DeepZoom=rgb.tif.dzi")
    assert dzi.body == (
        b'<?xml version="1.0" encoding="UTF-8"?>\r\n<Image xmlns="http://schemas.microsoft.com/'
        b'deepzoom/2008"\r\nTileSize="256" Overlap="0" Format="jpg"><Size Width="1000" '
        b'Height="750"/></Image>'
    )
    assert (
        call(app, "DeepZoom=rgb.tif_files/10/0_0.jpg").body == call(app, "FIF=rgb.tif&JTL=2,0").body
    )
    assert (
        call(app, "DeepZoom=rgb.tif_files/0/0_0.jpg").body == call(app, "FIF=rgb.tif&JTL=0,0").body
    )
    assert call(app, "DeepZoom=rgb.tif_files/10/9_9.jpg").status == 404
    props = call(app, "Zoomify=rgb.tif/ImageProperties.xml")
    assert props.body == (
        b'<IMAGE_PROPERTIES WIDTH="1000" HEIGHT="750" NUMTILES="12" NUMIMAGES="1" '
        b'VERSION="1.8" TILESIZE="256" />'
    )
    assert (
        call(app, "Zoomify=rgb.tif/TileGroup0/2-3-2.jpg").body
        == call(app, "FIF=rgb.tif&JTL=2,11").body
    )
    assert simplejpeg.decode_jpeg(call(app, "Zoomify=rgb.tif/TileGroup0/0-0-0.jpg").body).shape == (
        187,
        250,
        3,
    )
