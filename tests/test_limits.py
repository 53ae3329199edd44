"""Request limits (issue 9): each a setting, each answered in the dialect's own error format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from images import pyramid_levels, rgb_image, star_field, write_pyramid
from wsgi_client import call

from iipserver.app import make_app
from iipserver.settings import Settings

V3 = "/api"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("limits")
    write_pyramid(d / "rgb.tif", pyramid_levels(rgb_image(900, 700)))
    write_pyramid(d / "sky.tif", pyramid_levels(star_field(900, 700)))
    return d


def app(root: Path, **limits: str):
    return make_app(Settings.from_environ({"FILESYSTEM_PREFIX": f"{root}/", **limits}))


def text_400(reply, *words: str) -> None:
    assert reply.status == 400, (reply.status, reply.body[:200])
    assert reply.header("Content-Type").startswith("text/plain")
    for word in words:
        assert word.encode() in reply.body, reply.body


def json_error(reply, status: int, loc: str | None = None) -> dict:
    assert reply.status == status, (reply.status, reply.body[:200])
    assert reply.header("Content-Type") == "application/json"
    detail = json.loads(reply.body)["detail"][0]
    if loc is not None:
        assert detail["loc"][-1] == loc
    return detail


def test_request_length(root: Path):
    a = app(root, MAX_REQUEST_LENGTH="100")
    ok = "FIF=rgb.tif&OBJ=Max-size"
    assert call(a, ok).status == 200
    text_400(call(a, ok + "&OBJ=Tile-size" * 10), "longer than 100 bytes")
    detail = json_error(call(a, "FIF=sky.tif&INFO&" + "CHAN=1&" * 20, path=V3), 400)
    assert "Request too large" in detail["msg"]
    # a POST body is a request string too
    body = ("FIF=rgb.tif&" + "OBJ=Max-size&" * 20).encode()
    text_400(call(a, "", method="POST", body=body), "longer than 100 bytes")


def test_command_count(root: Path):
    a = app(root, MAX_COMMANDS="3")
    assert call(a, "FIF=rgb.tif&OBJ=Max-size&OBJ=Tile-size").status == 200
    text_400(call(a, "FIF=rgb.tif&OBJ=Max-size&OBJ=Tile-size&OBJ=Resolution-number"), "3 commands")


def test_til_tiles(root: Path):
    a = app(root, MAX_TIL_TILES="2")
    assert call(a, "FIF=rgb.tif&TIL=2,0-1").status == 200
    text_400(call(a, "FIF=rgb.tif&TIL=2,0-2"), "MAX_TIL_TILES")


def test_channels(root: Path):
    a = app(root, MAX_CHANNELS="2")
    assert call(a, "FIF=sky.tif&MINMAX=2:0,10&JTL=0,0").status == 200
    text_400(call(a, "FIF=sky.tif&MINMAX=3:0,10&JTL=0,0"), "MAX_CHANNELS")
    text_400(call(a, "FIF=sky.tif&CTW=[1,0,0;0,1,0;0,0,1]&JTL=0,0"), "MAX_CHANNELS")
    json_error(call(a, "FIF=sky.tif&CHAN=1&CHAN=1&CHAN=1&JTL=0,0", path=V3), 400, "CHAN")
    mix = "&".join(f"MIX={c}:1,1,1" for c in (1, 2, 3))
    json_error(call(a, f"FIF=sky.tif&{mix}&JTL=0,0", path=V3), 400, "MIX")


def test_region_budget(root: Path):
    a = app(root, MAX_REGION_MB="1")
    assert call(a, "FIF=rgb.tif&WID=400&CVT=jpeg").status == 200
    text_400(call(a, "FIF=rgb.tif&WID=900&CVT=jpeg"), "MAX_REGION_MB")
    text_400(call(a, "IIIF=rgb.tif/full/max/0/default.jpg"), "MAX_REGION_MB")
    json_error(call(a, "FIF=sky.tif&RGN=1,1:900,700&BIN=1", path=V3), 400)
    # VisiOmatic INFO reads whole-width bands for its background: not a client's region
    assert call(a, "FIF=sky.tif&INFO", path=V3).status == 200


def test_profile_length(root: Path):
    a = app(root, MAX_PROFILE_LENGTH="10")
    assert call(a, "FIF=sky.tif&PFL=2:0,0-9,0").status == 200
    text_400(call(a, "FIF=sky.tif&PFL=2:0,0-50,0"), "MAX_PROFILE_LENGTH")
    json_error(call(a, "FIF=sky.tif&PFL=1,1:60,1", path=V3), 422, "PFL")


@pytest.mark.parametrize(
    "name,value",
    [("MAX_REQUEST_LENGTH", "10"), ("MAX_COMMANDS", "0"), ("MAX_CHANNELS", "-1"),
     ("MAX_REGION_MB", "0"), ("MAX_PROFILE_LENGTH", "x")],
)  # fmt: skip
def test_nonsense_limits_stop_the_server(name: str, value: str):
    from iipserver.errors import ConfigError

    with pytest.raises(ConfigError, match=name):
        Settings.from_environ({name: value})


def test_background_statistics_of_large_images_fit_the_budget(tmp_path: Path):
    """VisiOmatic INFO samples every 16th row: a reduced level when the full one would not fit
    MAX_REGION_MB, a JSON 400 when none fits (a hostile file may declare any size)."""
    sky = star_field(1200, 1200)
    write_pyramid(tmp_path / "pyramid.tif", pyramid_levels(sky))
    write_pyramid(tmp_path / "single.tif", [sky])
    a = app(tmp_path, MAX_REGION_MB="1")  # a full-width band of 256 rows is 1.2 MB
    info = json.loads(call(a, "FIF=pyramid.tif&INFO", path=V3).body)["images"][0]
    assert len(info["background_level"]) == 1 and len(info["min_max"]) == 1
    json_error(call(a, "FIF=single.tif&INFO", path=V3), 400)
    whole = json.loads(call(app(tmp_path), "FIF=single.tif&INFO", path=V3).body)["images"][0]
    assert abs(whole["background_level"][0] - info["background_level"][0]) < 1.0


def test_distinct_missing_paths_leave_nothing_behind(root: Path):
    """Each request for a missing image looks for an image sequence: no per-path state (a
    glob pattern per path was compiled and cached: ~1 KiB per distinct path, found by fuzzing)."""
    import tracemalloc

    a = app(root)
    for k in range(200):  # warm every cache that is meant to exist
        call(a, f"FIF=missing-{k}.tif&OBJ=Max-size")
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for k in range(3000):
        assert call(a, f"FIF=gone-{k}-x.tif&OBJ=Max-size").status == 404
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown < 600_000, grown  # the 2 s path cache holds ~100 B per path, nothing else
