"""Sources: every dtype, band count, compression and pyramid layout reads back its pixels."""

import os
import time

import numpy as np
import pytest
import tifffile
from images import pyramid_levels, smin_smax_tags, write_pyramid

from iipserver.errors import ImageReadError, ResolutionNotFound, TileNotFound, UnsupportedImage
from iipserver.sources import detect, open_source
from iipserver.sources.pool import SourcePool
from iipserver.sources.tiff import TiffSource
from iipserver.sources.zarr import ZarrSource

RNG = np.random.default_rng(7)


def make(dtype, bands, size=(300, 420)):
    h, w = size
    shape = (h, w) if bands == 1 else (h, w, bands)
    if np.dtype(dtype).kind == "f":
        return RNG.normal(50, 20, size=shape).astype(dtype)
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


def as3d(a):
    return a[:, :, None] if a.ndim == 2 else a


def check_pixels(source, levels, tolerance=0):
    info = source.info
    assert len(info.levels) == len(levels)
    for r, level in enumerate(levels[::-1]):
        lv = info.levels[r]
        assert (lv.width, lv.height) == (level.shape[1], level.shape[0])
        for index in {0, lv.tile_count - 1}:
            x, y, w, h = lv.tile_box(index)
            tile = source.read_tile(r, index)
            expected = as3d(level)[y : y + h, x : x + w]
            assert tile.shape == expected.shape
            if tolerance:
                diff = np.abs(tile.astype(np.float64) - expected.astype(np.float64))
                assert diff.mean() < tolerance
            else:
                np.testing.assert_array_equal(tile, expected)


@pytest.mark.parametrize(
    "dtype", ["uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64"]
)
@pytest.mark.parametrize("bands", [1, 2, 3, 5])
def test_dtypes_and_bands(tmp_path, dtype, bands):
    levels = pyramid_levels(make(dtype, bands))
    photometric = "rgb" if bands == 3 and dtype == "uint8" else "minisblack"
    path = write_pyramid(tmp_path / "a.tif", levels, photometric=photometric, planarconfig="contig")
    source = TiffSource(str(path))
    assert source.info.channels == bands
    assert source.info.dtype == dtype
    assert source.info.bits_per_sample == np.dtype(dtype).itemsize * 8
    check_pixels(source, levels)


@pytest.mark.parametrize("compression", [None, "zlib", "lzw", "zstd", "packbits"])
@pytest.mark.parametrize("layout", ["ifds", "subifds"])
@pytest.mark.parametrize("planar", ["contig", "separate"])
def test_compressions_layouts_planar(tmp_path, compression, layout, planar):
    levels = pyramid_levels(make("uint16", 3))
    path = write_pyramid(
        tmp_path / "a.tif",
        levels,
        compression=compression,
        layout=layout,
        photometric="rgb",
        planarconfig=planar,
    )
    check_pixels(TiffSource(str(path)), levels)


def test_jpeg_tiles_decode_close_to_the_original(tmp_path):
    x = np.linspace(0, 255, 420)[None, :, None]
    y = np.linspace(0, 255, 300)[:, None, None]
    full = np.concatenate([x + 0 * y, y + 0 * x, np.full((300, 420, 1), 128.0)], axis=2).astype(
        np.uint8
    )
    levels = pyramid_levels(full)
    path = write_pyramid(
        tmp_path / "j.tif",
        levels,
        compression="jpeg",
        compressionargs={"level": 95},
        photometric="rgb",
    )
    check_pixels(TiffSource(str(path)), levels, tolerance=2)


def test_bigtiff_and_non_square_tiles(tmp_path):
    levels = pyramid_levels(make("float32", 1, (200, 600)), tile=128)
    path = write_pyramid(tmp_path / "b.tif", levels, tile=(64, 128), bigtiff=True)
    with open(path, "rb") as f:
        assert f.read(4) == b"II+\x00"
    source = open_source(str(path))
    assert source.info.levels[-1].tile_width == 128
    assert source.info.levels[-1].tile_height == 64
    check_pixels(source, levels)


def test_smin_smax_per_channel(tmp_path):
    levels = pyramid_levels(make("float32", 2))
    path = write_pyramid(
        tmp_path / "f2.tif",
        levels,
        extratags=smin_smax_tags([-10, 1000], [189.5, 1598]),
        planarconfig="contig",
    )
    info = TiffSource(str(path)).info
    assert info.min_values == (-10.0, 1000.0)
    assert info.max_values == (189.5, 1598.0)


def test_float_without_tags_gets_range_of_smallest_level(tmp_path):
    full = make("float32", 1)
    full[0, 0] = np.nan
    full[1, 1] = np.inf
    levels = pyramid_levels(full)
    smallest = levels[-1]
    info = TiffSource(str(write_pyramid(tmp_path / "f.tif", levels))).info
    finite = smallest[np.isfinite(smallest)]
    assert info.min_values == (pytest.approx(float(finite.min())),)
    assert info.max_values == (pytest.approx(float(finite.max())),)


@pytest.mark.parametrize(
    ("dtype", "maximum"), [("uint8", 255.0), ("uint16", 65535.0), ("uint32", 4294967295.0)]
)
def test_integer_default_ranges(tmp_path, dtype, maximum):
    info = TiffSource(str(write_pyramid(tmp_path / "i.tif", pyramid_levels(make(dtype, 1))))).info
    assert info.min_values == (0.0,)
    assert info.max_values == (maximum,)


def test_metadata_tags_and_colorspaces(tmp_path):
    levels = pyramid_levels(make("uint8", 1))
    path = write_pyramid(
        tmp_path / "m.tif",
        levels,
        description="SIMPLE  =                    T",
        photometric="minisblack",
        extratags=[(315, "s", 0, "Ann Author", True), (33432, "s", 0, "CC-BY", True)],
    )
    info = TiffSource(str(path)).info
    assert info.metadata["description"].startswith("SIMPLE  =")
    assert info.metadata["artist"] == "Ann Author"
    assert info.metadata["copyright"] == "CC-BY"
    assert info.colorspace == "GREYSCALE"


def test_thumbnail_and_mask_pages_are_not_levels(tmp_path):
    full = make("uint8", 3, (600, 600))
    levels = pyramid_levels(full)
    path = tmp_path / "t.tif"
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate(levels):
            tif.write(
                level,
                tile=(256, 256),
                photometric="rgb",
                metadata=None,
                software=False,
                subfiletype=0 if i == 0 else 1,
            )
        tif.write(
            full[::8, ::8].copy(), photometric="rgb", metadata=None, software=False, subfiletype=1
        )
        tif.write(
            np.zeros((300, 300), bool),
            photometric="minisblack",
            metadata=None,
            software=False,
            subfiletype=4,
        )
    source = TiffSource(str(path))
    assert len(source.info.levels) == len(levels)
    check_pixels(source, levels)


def test_untiled_image_is_served_in_virtual_tiles(tmp_path):
    full = make("uint16", 1, (300, 400))
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, full, rowsperstrip=16, metadata=None, software=False)
    source = TiffSource(str(path))
    lv = source.info.levels[-1]
    assert (lv.tile_width, lv.tile_height) == (256, 256)
    np.testing.assert_array_equal(source.read_tile(0, 3)[:, :, 0], full[256:300, 256:400])


def test_out_of_range_requests(tmp_path):
    source = TiffSource(str(write_pyramid(tmp_path / "a.tif", pyramid_levels(make("uint8", 1)))))
    with pytest.raises(
        ResolutionNotFound, match="TPTImage :: Asked for non-existent resolution: 9"
    ):
        source.read_tile(9, 0)
    with pytest.raises(TileNotFound, match="non-existent tile: 6"):
        source.read_tile(1, 6)
    with pytest.raises(TileNotFound):
        source.read_tile(1, 10**12)


def test_region_composited_from_tiles(tmp_path):
    levels = pyramid_levels(make("int16", 3))
    source = TiffSource(
        str(write_pyramid(tmp_path / "a.tif", levels, photometric="rgb", planarconfig="contig"))
    )
    np.testing.assert_array_equal(
        source.read_region(1, 200, 100, 150, 180), levels[0][100:280, 200:350]
    )
    assert source.read_region(1, 500, 500, 10, 10).shape[:2] == (0, 0)


def test_detect_rejects_unknown_and_short_files(tmp_path):
    (tmp_path / "junk.tif").write_bytes(os.urandom(100))
    (tmp_path / "tiny.tif").write_bytes(b"II*\x00")
    with pytest.raises(UnsupportedImage):
        detect(str(tmp_path / "junk.tif"))
    with pytest.raises(ImageReadError):
        detect(str(tmp_path / "tiny.tif"))


def test_truncated_tiff_is_a_read_error(tmp_path):
    path = write_pyramid(tmp_path / "a.tif", pyramid_levels(make("uint8", 3)), compression="zlib")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError):
        source = open_source(str(path))
        for r, lv in enumerate(source.info.levels):
            for i in range(lv.tile_count):
                source.read_tile(r, i)


def test_ome_zarr_multiscale_source(tmp_path):
    zarr = pytest.importorskip("zarr")
    full = make("uint16", 3, (300, 420))
    levels = pyramid_levels(full)
    root = zarr.open_group(str(tmp_path / "img.zarr"), mode="w")
    datasets = []
    for i, level in enumerate(levels):
        arr = root.create_array(
            str(i), shape=(3, *level.shape[:2]), chunks=(3, 128, 128), dtype="uint16"
        )
        arr[:] = np.moveaxis(level, 2, 0)
        datasets.append({"path": str(i)})
    root.attrs["multiscales"] = [
        {
            "version": "0.4",
            "datasets": datasets,
            "axes": [{"name": "c"}, {"name": "y"}, {"name": "x"}],
        }
    ]
    source = detect(str(tmp_path / "img.zarr"))(str(tmp_path / "img.zarr"))
    assert isinstance(source, ZarrSource)
    assert source.info.levels[-1].tile_width == 128
    check_pixels(source, levels)


def test_pool_reuses_and_revalidates_by_mtime(tmp_path):
    path = write_pyramid(tmp_path / "a.tif", pyramid_levels(make("uint8", 1)))
    pool = SourcePool(max_entries=10, max_open=2)
    first = pool.get(str(path))
    assert pool.get(str(path)) is first
    later = time.time() + 5
    os.utime(path, (later, later))
    again = pool.get(str(path))
    assert again is not first
    assert again.stamp.mtime == pytest.approx(later)


def test_pool_is_bounded(tmp_path):
    pool = SourcePool(max_entries=2, max_open=1)
    paths = [
        write_pyramid(tmp_path / f"{i}.tif", pyramid_levels(make("uint8", 1, (50, 50))))
        for i in range(4)
    ]
    for p in paths:
        pool.get(str(p))
        pool.get(str(p)).source.read_tile(0, 0)
    assert len(pool) == 2
    pool.clear()
    assert len(pool) == 0
