"""Watermarks (spec §17): premultiplication, placement, saturation, probability, seeding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from iipserver.errors import ConfigError
from iipserver.watermark import Watermark, as_rgba, premultiply


def test_premultiplied_as_iipsrv_stores_it():
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 128], [255, 255, 255, 0]]], np.uint8)
    out = premultiply(rgba, 0.5)
    # channel · opacity · alpha/255, truncated
    assert out.tolist() == [[[100, 50, 25], [50, 25, 12], [0, 0, 0]]]


@pytest.mark.parametrize(
    "image,first",
    [
        (np.full((2, 3), 40, np.uint8), [40, 40, 40, 255]),
        (np.full((2, 3, 2), (40, 9), np.uint8), [40, 40, 40, 9]),
        (np.full((2, 3, 3), (1, 2, 3), np.uint8), [1, 2, 3, 255]),
        (np.full((2, 3, 4), (1, 2, 3, 4), np.uint8), [1, 2, 3, 4]),
        (np.full((2, 3), 0x1234, np.uint16), [0x12, 0x12, 0x12, 255]),
    ],
)
def test_any_grey_rgb_or_rgba_image(image, first):
    assert as_rgba(image)[0, 0].tolist() == first


def test_unusable_images_are_configuration_errors(tmp_path: Path):
    with pytest.raises(ConfigError):
        as_rgba(np.zeros((4, 4), np.float32))
    (tmp_path / "bad.tif").write_bytes(b"not a tiff")
    with pytest.raises(ConfigError, match="WATERMARK"):
        Watermark.load(str(tmp_path / "bad.tif"), 1.0, 1.0)


def mark(size=(4, 6), value=100) -> Watermark:
    return Watermark(np.full((*size, 3), value, np.uint8), 1.0, seed=7)


def test_added_saturating_inside_the_tile():
    tile = np.full((32, 32, 3), 200, np.uint8)
    out = mark().apply(tile, ("a.tif", 3, 5))
    changed = np.argwhere(np.any(out != tile, axis=2))
    (y0, x0), (y1, x1) = changed.min(axis=0), changed.max(axis=0)
    assert (y1 - y0 + 1, x1 - x0 + 1) == (4, 6)  # the whole watermark, inside the tile
    assert np.all(out[y0 : y1 + 1, x0 : x1 + 1] == 255)  # 200 + 100 saturates
    assert np.array_equal(tile, np.full((32, 32, 3), 200, np.uint8))  # input untouched


def test_grey_output_gets_the_red_plane_and_small_tiles_crop():
    wm = Watermark(np.dstack([np.full((8, 8), v, np.uint8) for v in (10, 20, 30)]), 1.0, seed=1)
    grey = np.zeros((5, 3, 1), np.uint8)
    assert np.all(wm.apply(grey, "x") == 10)  # cropped to the tile, red plane only


def test_seeded_placement_is_a_function_of_what_is_drawn_for():
    tile = np.zeros((64, 64, 3), np.uint8)
    a = mark().apply(tile, ("a.tif", 3, 5))
    assert np.array_equal(a, mark().apply(tile, ("a.tif", 3, 5)))  # another worker: same
    others = [mark().apply(tile, ("a.tif", 3, k)) for k in range(8)]
    assert any(not np.array_equal(a, o) for o in others)  # other tiles: other places


def test_probability():
    tile = np.zeros((16, 16, 3), np.uint8)
    never = Watermark(np.full((2, 2, 3), 9, np.uint8), 0.0, seed=3)
    assert all(never.apply(tile, k) is tile for k in range(50))
    half = Watermark(np.full((2, 2, 3), 9, np.uint8), 0.5, seed=3)
    marked = sum(half.apply(tile, k) is not tile for k in range(400))
    assert 150 < marked < 250


def test_regions_get_one_draw_per_block():
    region = np.zeros((100, 300, 3), np.uint8)
    out = mark(size=(3, 3)).apply_blocks(region, 64, ("a.tif", "region"))
    blocks_marked = {(y // 64, x // 64) for y, x in np.argwhere(np.any(out != 0, axis=2)).tolist()}
    assert len(blocks_marked) == 2 * 5  # every block of the 2×5 grid, once each


def test_load_from_tiff(tmp_path: Path):
    rgba = np.zeros((5, 7, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    tifffile.imwrite(tmp_path / "wm.tif", rgba, photometric="rgb", extrasamples=[2])
    wm = Watermark.load(str(tmp_path / "wm.tif"), 0.5, 1.0, seed=2)
    assert wm.image.shape == (5, 7, 3) and wm.image[0, 0].tolist() == [100, 0, 0]


# --- through the application ----------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from images import pyramid_levels, write_pyramid

    root = tmp_path_factory.mktemp("watermarked")
    y, x = np.mgrid[0:600, 0:700]
    picture = np.dstack([np.full_like(x, 20), x * 255 // 700, y * 255 // 600]).astype(np.uint8)
    write_pyramid(root / "plain.tif", pyramid_levels(picture))
    write_pyramid(root / "jpeg.tif", pyramid_levels(picture), compression="jpeg")
    mark_rgba = np.zeros((20, 30, 4), np.uint8)
    mark_rgba[..., 0], mark_rgba[..., 3] = 180, 255
    tifffile.imwrite(root / "mark.tif", mark_rgba, photometric="rgb", extrasamples=[2])
    return root


def app_for(root: Path, **extra: str):
    from iipserver.app import make_app
    from iipserver.settings import Settings

    env = {"FILESYSTEM_PREFIX": f"{root}/", "QLT": "", "JPEG_QUALITY": "100"}
    env.update(extra)
    return make_app(Settings.from_environ(env))


def pixels(app, query: str) -> np.ndarray:
    import simplejpeg
    from wsgi_client import call

    reply = call(app, query)
    assert reply.status == 200, reply.body[:200]
    if reply.body[:4] == b"\x89PNG":
        import imagecodecs

        return imagecodecs.png_decode(reply.body).astype(int)
    return simplejpeg.decode_jpeg(reply.body).astype(int)


def test_tiles_and_regions_are_watermarked_reproducibly(served: Path):
    mark_path = str(served / "mark.tif")
    plain = app_for(served)
    marked = app_for(served, WATERMARK=mark_path, WATERMARK_SEED="5")
    again = app_for(served, WATERMARK=mark_path, WATERMARK_SEED="5")
    for query in ("FIF=plain.tif&PTL=2,4", "FIF=plain.tif&WID=700&CVT=png"):
        base, out = pixels(plain, query), pixels(marked, query)
        red = out[..., 0] - base[..., 0]
        assert set(np.unique(red)) == {0, 180}  # 20 + 180: added, premultiplied, unsaturated
        assert np.all(out[..., 1:] == base[..., 1:])  # only the red plane: the mark is red
        assert np.count_nonzero(red) % (20 * 30) == 0 and np.count_nonzero(red) > 0
        assert np.array_equal(out, pixels(again, query))  # another process: same places


def test_probability_zero_and_no_passthrough(served: Path):
    mark_path = str(served / "mark.tif")
    never = app_for(served, WATERMARK=mark_path, WATERMARK_PROBABILITY="0", WATERMARK_SEED="1")
    plain = app_for(served)
    q = "FIF=plain.tif&PTL=2,4"
    assert np.array_equal(pixels(never, q), pixels(plain, q))
    from wsgi_client import call

    stored = call(plain, "FIF=jpeg.tif&JTL=2,0").body  # sent as stored without a watermark
    with_mark = call(app_for(served, WATERMARK=mark_path), "FIF=jpeg.tif&JTL=2,0").body
    assert with_mark != stored  # decoded, marked and encoded again


def test_a_bad_watermark_stops_the_server_at_start(served: Path):
    with pytest.raises(ConfigError, match="WATERMARK"):
        app_for(served, WATERMARK=str(served / "missing.tif"))
