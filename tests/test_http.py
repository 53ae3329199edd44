"""HTTP semantics on every response type: validators, conditional requests, CORS, HEAD, OPTIONS."""

import email.utils
import os

import numpy as np
import pytest
from images import pyramid_levels, rgb_image, star_field, write_pyramid
from wsgi_client import call

from iipserver.app import make_app
from iipserver.settings import Settings

MTIME = 1_700_000_000
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Accept, Content-Type, X-Requested-With, If-Modified-Since, If-None-Match",
    "Access-Control-Max-Age": "86400",
}

SUCCESSES = {
    "tile": "FIF=rgb.tif&JTL=1,0",
    "png tile": "FIF=rgb.tif&PTL=1,0",
    "cvt": "FIF=rgb.tif&WID=100&CVT=jpeg",
    "obj": "FIF=rgb.tif&OBJ=IIP,1.0&OBJ=Max-size",
    "pfl": "FIF=rgb.tif&PFL=1:0,0-4,0",
    "til": "FIF=rgb.tif&TIL=1,0",
    "visiomatic info": "FIF=sky.tif&INFO",
    "visiomatic tile": "FIF=sky.tif&CHAN=1&JTL=0,0",
}
ERRORS = {
    "iip error": ("FOO=1", 400),
    "missing image": ("FIF=none.tif&OBJ=Max-size", 404),
    "missing tile": ("FIF=rgb.tif&JTL=1,99", 404),
    "banner": ("", 400),
    "visiomatic error": ("FIF=sky.tif&CNT=5000&CHAN=1&JTL=0,0", 422),
}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    d = tmp_path_factory.mktemp("http")
    write_pyramid(d / "rgb.tif", pyramid_levels(rgb_image(500, 300)), photometric="rgb")
    write_pyramid(d / "sky.tif", pyramid_levels(star_field(300, 200)))
    for p in d.iterdir():
        os.utime(p, (MTIME, MTIME))
    return make_app(
        Settings.from_environ(
            {"FILESYSTEM_PREFIX": f"{d}/", "CORS": "*", "CACHE_CONTROL": "max-age=60"}
        )
    )


@pytest.mark.parametrize("query", SUCCESSES.values(), ids=SUCCESSES.keys())
def test_success_has_validators_cache_control_and_cors(app, query):
    r = call(app, query)
    assert r.status == 200
    assert r.header("Last-Modified") == email.utils.formatdate(MTIME, usegmt=True)
    assert r.header("Cache-Control") == "max-age=60"
    assert r.header("ETag").startswith('"')
    assert r.header("Content-Length") == str(len(r.body))
    for name, value in CORS.items():
        assert r.header(name) == value
    again = call(app, query)
    assert again.header("ETag") == r.header("ETag") and again.body == r.body


@pytest.mark.parametrize("query", SUCCESSES.values(), ids=SUCCESSES.keys())
def test_if_none_match(app, query):
    etag = call(app, query).header("ETag")
    r = call(app, query, headers={"If-None-Match": etag})
    assert (r.status, r.body) == (304, b"")
    assert r.header("ETag") == etag and r.header("Cache-Control") == "max-age=60"
    assert r.header("Access-Control-Allow-Origin") == "*"
    assert call(app, query, headers={"If-None-Match": f'"x", {etag}'}).status == 304
    assert call(app, query, headers={"If-None-Match": "*"}).status == 304
    assert call(app, query, headers={"If-None-Match": '"other"'}).status == 200


@pytest.mark.parametrize(
    "query", [q for q in SUCCESSES.values() if "INFO" not in q and "CHAN" not in q]
)
def test_if_modified_since(app, query):
    same = email.utils.formatdate(MTIME, usegmt=True)
    before = email.utils.formatdate(MTIME - 1, usegmt=True)
    assert call(app, query, headers={"If-Modified-Since": same}).status == 304
    assert call(app, query, headers={"If-Modified-Since": before}).status == 200


@pytest.mark.parametrize("query", SUCCESSES.values(), ids=SUCCESSES.keys())
def test_head_is_get_without_a_body(app, query):
    get, head = call(app, query), call(app, query, method="HEAD")
    assert head.status == 200 and head.body == b""
    assert head.headers == get.headers


@pytest.mark.parametrize(("query", "status"), ERRORS.values(), ids=ERRORS.keys())
def test_errors_carry_cors_and_no_cache_and_no_validators(app, query, status):
    r = call(app, query)
    assert r.status == status
    assert r.header("Cache-Control") == "no-cache"
    assert r.header("ETag") is None
    for name, value in CORS.items():
        assert r.header(name) == value
    head = call(app, query, method="HEAD")
    assert head.status == status and head.body == b""


def test_options_preflight(app):
    r = call(app, "FIF=rgb.tif&JTL=1,0", method="OPTIONS")
    assert (r.status, r.body) == (204, b"")
    assert r.header("Allow") == "GET, HEAD, POST, OPTIONS"
    for name, value in CORS.items():
        assert r.header(name) == value


def test_no_cors_unless_set(tmp_path):
    write_pyramid(tmp_path / "a.tif", [np.zeros((10, 10), np.uint8)], photometric="minisblack")
    plain = make_app(Settings.from_environ({"FILESYSTEM_PREFIX": f"{tmp_path}/"}))
    for query in ("FIF=a.tif&JTL=0,0", "FOO", "FIF=a.tif&INFO"):
        assert not any(k.startswith("Access-Control") for k, _ in call(plain, query).headers)


def test_status_endpoint(tmp_path):
    write_pyramid(
        tmp_path / "a.tif", [np.zeros((10, 10), np.uint8)], photometric="minisblack",
        compression="zlib",
    )  # fmt: skip
    on = make_app(
        Settings.from_environ({"FILESYSTEM_PREFIX": f"{tmp_path}/", "STATUS_ENDPOINT": "1"})
    )
    call(on, "FIF=a.tif&JTL=0,0")
    call(on, "FIF=a.tif&GAM=2&JTL=0,0")
    import json

    status = json.loads(call(on, "STATUS").body)
    assert status["tile_cache"]["hits"] == 1 and status["tile_cache"]["misses"] == 1
    assert status["encoded_tile_cache"]["entries"] == 2
    assert status["metadata_cache"]["entries"] == 1
    assert status["requests"] == 3
    off = make_app(Settings.from_environ({"FILESYSTEM_PREFIX": f"{tmp_path}/"}))
    assert call(off, "STATUS").body == b"Error/10:2 2 STATUS\r\n"
