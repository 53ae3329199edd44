"""Pure transforms on tiny arrays, against values computed by hand (spec §10)."""

import numpy as np
import pytest

from iipserver import transforms as t


def test_normalise_per_channel_and_non_finite():
    tile = np.array([[[0.0, 1000.0], [np.nan, 1598.0], [189.5, np.inf]]], dtype=np.float32)
    out = t.normalise(tile, [-10, 1000], [189.5, 1598])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, 0], [10 / 199.5, 0.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(out[0, :, 1], [0.0, 1.0, 0.0], rtol=1e-6)


def test_normalise_zero_range_uses_huge_inverse():
    out = t.normalise(np.array([[[5.0]]], dtype=np.float32), [5], [5])
    assert out[0, 0, 0] == 0
    out = t.normalise(np.array([[[6.0]]], dtype=np.float32), [5], [5])
    assert out[0, 0, 0] == np.float32(1e30)


def test_normalise_integers():
    out = t.normalise(np.array([[[0], [32768], [65535]]], dtype=np.uint16), [0], [65535])
    np.testing.assert_allclose(out[0, :, 0], [0, 32768 / 65535, 1], rtol=1e-6)


def test_quantise_truncates_clips_and_maps_nan_to_white():
    tile = np.array([[[-0.5], [0.0], [0.5], [0.9999], [1.0], [7.0], [np.nan]]], dtype=np.float32)
    assert t.quantise(tile)[0, :, 0].tolist() == [0, 0, 127, 254, 255, 255, 255]
    assert t.quantise(tile, 2.0)[0, :, 0].tolist() == [0, 0, 255, 255, 255, 255, 255]


def test_gamma_and_log():
    tile = np.array([[[-1.0], [0.25], [1.0]]], dtype=np.float32)
    np.testing.assert_allclose(t.gamma(tile, 0.5)[0, :, 0], [0, 0.5, 1])
    assert t.gamma(tile, 1.0) is tile
    np.testing.assert_allclose(
        t.log_gamma(np.array([[[0.0], [1.0]]], np.float32))[0, :, 0], [0, 1], atol=1e-6
    )


def test_invert():
    np.testing.assert_allclose(
        t.invert(np.array([[[0.25], [2.0]]], np.float32))[0, :, 0], [0.75, -1]
    )


@pytest.mark.parametrize(
    ("name", "value", "rgb"),
    [
        ("hot", 0.1, (0.3, 0, 0)),
        ("hot", 0.5, (1, 0.5, 0)),
        ("hot", 0.9, (1, 1, 0.7)),
        ("hot", 1.5, (1, 1, 1)),
        ("hot", -1, (0, 0, 0)),
        ("hot", np.nan, (1, 1, 1)),
        ("cold", 0.1, (0, 0, 0.3)),
        ("cold", 0.5, (0, 0.5, 1)),
        ("jet", 0.0, (0, 0, 0.5)),
        ("jet", 0.25, (0, 0.5, 1)),
        ("jet", 0.5, (0.5, 1, 0.5)),
        ("jet", 0.75, (1, 0.5, 0)),
        ("jet", 0.9, (0.9, 0, 0)),
        ("jet", 2.0, (0.5, 0, 0)),
        ("jet", -0.1, (0, 0, 0)),
        ("red", 0.4, (0.4, 0, 0)),
        ("blue", 0.4, (0, 0, 0.4)),
    ],
)
def test_colormaps(name, value, rgb):
    out = t.colormap(np.array([[[value, 0.9]]], dtype=np.float32), name)
    np.testing.assert_allclose(out[0, 0], rgb, atol=1e-6)


def test_unknown_colormap_is_identity():
    tile = np.zeros((1, 1, 1), np.float32)
    assert t.colormap(tile, "grey") is tile


def test_twist_keeps_channel_count_and_ignores_extra_columns():
    tile = np.array([[[0.1, 0.2]]], dtype=np.float32)
    out = t.twist(tile, [(1, 1, 5), (0, 2), (3, 3)])
    assert out.shape == (1, 1, 2)
    np.testing.assert_allclose(out[0, 0], [0.3, 0.4], rtol=1e-6)
    grey = t.twist(np.array([[[0.5]]], np.float32), [(1,), (1,), (1,)])
    assert grey.shape == (1, 1, 1) and grey[0, 0, 0] == np.float32(0.5)
    short = t.twist(np.array([[[0.1, 0.2, 0.3]]], np.float32), [(0, 0, 1)])
    np.testing.assert_allclose(short[0, 0], [0.3, 0, 0], rtol=1e-6)


def test_shade_light_from_above():
    # light s = (0, 1, -1)/sqrt(2); normals o = -(p - 0.5)·2
    tile = np.array([[[0.5, 0.0, 0.5], [0.5, 0.5, 0.0], [0, 0, 0]]], dtype=np.float32)
    out = t.shade(tile, 0, 90)
    assert out.shape == (1, 3, 1)
    assert out[0, 0, 0] == pytest.approx(0.5 / np.sqrt(2), abs=1e-6)  # o = (0, 1, 0)
    assert out[0, 1, 0] == 0  # o = (0, 0, 1): facing away, clamped
    assert out[0, 2, 0] == 0  # all-zero pixel: no normal


def test_flatten_and_greyscale():
    assert t.flatten(np.zeros((2, 2, 2))).shape == (2, 2, 1)
    assert t.flatten(np.zeros((2, 2, 5))).shape == (2, 2, 3)
    assert t.flatten(np.zeros((2, 2, 3))).shape == (2, 2, 3)
    grey = t.greyscale(
        np.array([[[255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8)
    )
    assert grey[0, :, 0].tolist() == [255, 76, 149, 29]


def test_orient():
    tile = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
    np.testing.assert_array_equal(t.orient(tile, 90, 0)[:, :, 0], [[3, 0], [4, 1], [5, 2]])
    np.testing.assert_array_equal(t.orient(tile, 180, 0)[:, :, 0], [[5, 4, 3], [2, 1, 0]])
    np.testing.assert_array_equal(t.orient(tile, 270, 0)[:, :, 0], [[2, 5], [1, 4], [0, 3]])
    np.testing.assert_array_equal(t.orient(tile, 0, 1)[:, :, 0], [[2, 1, 0], [5, 4, 3]])
    np.testing.assert_array_equal(t.orient(tile, 0, 2)[:, :, 0], [[3, 4, 5], [0, 1, 2]])
    assert t.orient(tile, 45, 0) is tile


def test_constant_image_min_equals_max():
    tile = np.full((2, 2, 1), 7.0, dtype=np.float32)
    out = t.quantise(t.normalise(tile, [7.0], [7.0]))
    assert out.ravel().tolist() == [0, 0, 0, 0]
    brighter = t.quantise(t.normalise(tile + 1, [7.0], [7.0]))
    assert brighter.ravel().tolist() == [255, 255, 255, 255]


def test_out_of_range_minmax_clips():
    tile = np.array([[[0.0], [50.0], [100.0]]], dtype=np.float32)
    assert t.quantise(t.normalise(tile, [25.0], [75.0]))[0, :, 0].tolist() == [0, 127, 255]


def test_resize_nearest():
    tile = np.arange(16, dtype=np.uint8).reshape(4, 4, 1)
    np.testing.assert_array_equal(t.resize_nearest(tile, 2, 2)[:, :, 0], [[0, 2], [8, 10]])
    np.testing.assert_array_equal(t.resize_nearest(tile[:2, :2], 4, 1)[:, :, 0], [[0, 0, 1, 1]])


def test_resize_bilinear_halves_by_sampling_the_grid():
    # scale 2: source positions 0 and 2 exactly, weights (1, 0)
    tile = np.arange(16, dtype=np.uint8).reshape(4, 4, 1) * 10
    np.testing.assert_array_equal(t.resize_bilinear(tile, 2, 2)[:, :, 0], [[0, 20], [80, 100]])


def test_resize_bilinear_upscale_interpolates_and_wraps_like_iipsrv():
    tile = np.array([[[0], [100]], [[200], [50]]], dtype=np.uint8)
    out = t.resize_bilinear(tile, 4, 2)[:, :, 0]
    # x scale 0.5: positions 0, 0.5, 1, 1.5; the last column blends in the next row's first pixel
    assert out[0].tolist() == [0, 50, 100, 150]
    # last source row: the row below is clamped to the last pixel instead of read past the end
    assert out[1].tolist() == [200, 125, 50, 50]


def test_histogram_equalise_otsu_binarise():
    tile = np.array([[[10], [10], [200], [250]]], dtype=np.uint8)
    hist = t.histogram(tile)
    assert hist[10] == 2 and hist[200] == 1 and hist[250] == 1 and hist.sum() == 4
    eq = t.equalise(tile, hist)[0, :, 0].tolist()
    # cdf 2,3,4 of 4 pixels; cdfmin = 2/4: round(63.75·(cdf - 0.5))
    assert eq == [96, 96, 159, 223]
    assert t.otsu(hist) == 10
    assert t.binarise(tile, 11)[0, :, 0].tolist() == [0, 0, 255, 255]
    rgb = np.array([[[255, 0, 0], [0, 255, 0]]], dtype=np.uint8)
    assert t.binarise(rgb, 100)[0, :, 0].tolist() == [0, 255]


def test_histogram_rounds_channel_average():
    tile = np.array([[[1, 2, 2], [0, 0, 1]]], dtype=np.uint8)  # averages 1.667 and 0.333
    hist = t.histogram(tile)
    assert hist[2] == 1 and hist[0] == 1


def test_stretch_range():
    hist = np.zeros(256, dtype=np.int64)
    hist[3] = hist[179] = 5
    assert t.stretch_range(hist, 8, True) == (3.0, 179.0)
    assert t.stretch_range(hist, 16, True) == (768.0, 45824.0)
    assert t.stretch_range(hist, 32, False) == (3.0, 179.0)


def test_lab_to_srgb_white_black_and_red():
    lab = np.array([[[255, 0, 0], [0, 0, 0], [136, 80, 67]]], dtype=np.uint8)
    out = t.lab_to_srgb(lab)[0]
    assert out[0].tolist() == [255, 255, 255] or min(out[0]) >= 254
    assert out[1].tolist() == [0, 0, 0]
    assert out[2][0] > 200 and out[2][1] < 60 and out[2][2] < 60


TONES = [
    t.Tone(),
    t.Tone(gamma=0.4545),
    t.Tone(gamma=2.2, contrast=1.7),
    t.Tone(log=True),
    t.Tone(invert=True, contrast=2.5, colormap="jet"),
    t.Tone(colormap="hot"),
    t.Tone(colormap="cold", gamma=0.6),
    t.Tone(colormap="blue", contrast=0.3),
    t.Tone(gamma=0.5, invert=True, contrast=-1.0),
    t.Tone(log=True, invert=True, colormap="jet"),
]


@pytest.mark.parametrize("tone", TONES, ids=repr)
def test_tone_table_gives_exactly_the_direct_result(tone):
    rng = np.random.default_rng(11)
    special = np.array(
        [
            np.nan,
            np.inf,
            -np.inf,
            -1 / 255,
            0,
            -0.0,
            1,
            0.125,
            1 / 3,
            2 / 3,
            0.875,
            1e-30,
            -1e-30,
            1e30,
            3.0e38,
        ],
        dtype=np.float32,
    )
    edges = np.arange(0, 1 << 20, 97, dtype=np.uint32) << 12
    values = np.concatenate(
        [
            rng.normal(0.2, 0.6, 40000).astype(np.float32),
            rng.random(40000, dtype=np.float32),
            special,
            edges.view(np.float32),
            (edges | 0xFFF).view(np.float32),
            (edges | 0x800).view(np.float32),
        ]
    )
    data = values[: (values.size // 3) * 3].reshape(-1, 3, 1)
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(t.apply_tone(data, tone), tone.exact(data))
        three = data.reshape(-1, 1, 3)
        np.testing.assert_array_equal(t.apply_tone(three, tone), tone.exact(three))


LEVELS = [
    t.Levels(95.0, 900.0, None, t.Tone(gamma=0.4545)),
    t.Levels(95.0, 900.0, ((1.0, 1.0, 1.0),), t.Tone(gamma=0.4545)),  # VisiOmatic's CTW=1;1;1
    t.Levels(-50.0, 3000.0, ((0.5,),), t.Tone(gamma=2.2, contrast=1.7)),
    t.Levels(900.0, 95.0, None, t.Tone(log=True)),  # inverted range
    t.Levels(100.0, 100.0, None, t.Tone()),  # empty range: 1e30 scale
    t.Levels(0.0, 1000.0, ((-2.0,),), t.Tone(invert=True, colormap="jet")),
    t.Levels(10.0, 60000.0, ((0.0,),), t.Tone(colormap="hot")),
    t.Levels(90.0, 1500.0, None, t.Tone(colormap="cold", gamma=0.6)),
    t.Levels(-3.0e38, 3.0e38, None, t.Tone(gamma=0.5, invert=True, contrast=-1.0)),
]


@pytest.mark.parametrize("levels", LEVELS, ids=repr)
def test_levels_table_gives_exactly_the_direct_result(levels):
    """The whole chain tabulated over stored values: same bytes as normalise → CTW → tone."""
    rng = np.random.default_rng(12)
    special = np.array(
        [np.nan, np.inf, -np.inf, 0, -0.0, 95, 900, 100, 1e-30, 1e30, -3.0e38, 3.0e38],
        dtype=np.float32,
    )
    edges = np.arange(0, 1 << 20, 97, dtype=np.uint32) << 12
    floats = np.concatenate(
        [
            rng.normal(100, 5, 30000).astype(np.float32),
            rng.uniform(-100, 5000, 30000).astype(np.float32),
            special,
            edges.view(np.float32),
            (edges | 0xFFF).view(np.float32),
            (edges | 0x800).view(np.float32),
        ]
    )
    with np.errstate(all="ignore"):
        one = floats.reshape(-1, 1, 1)
        np.testing.assert_array_equal(t.apply_levels(one, levels), levels.exact(one))
        for dtype in ("uint8", "int8", "uint16", "int16"):
            info = np.iinfo(dtype)
            ints = rng.integers(info.min, info.max + 1, size=(300, 7, 1)).astype(dtype)
            ints[0, :2, 0] = (info.min, info.max)
            np.testing.assert_array_equal(t.apply_levels(ints, levels), levels.exact(ints))
        if levels.tone.colormap is None and levels.twist is None:
            three = floats[: (floats.size // 3) * 3].reshape(-1, 1, 3)
            np.testing.assert_array_equal(t.apply_levels(three, levels), levels.exact(three))


def test_table_and_direct_paths_render_the_same_tiles():
    """Pipeline level: a tile rendered after the table is built equals the direct rendering."""
    from iipserver.pipeline import build_table, curve_of, develop, levels_of
    from iipserver.sources.base import Level, SourceInfo
    from iipserver.view import Rendering

    rng = np.random.default_rng(4)
    cases = [
        (np.float32, 1, dict(mins=(95.0,), maxs=(900.0,), gamma=0.4545, twist=((1.0, 1.0),))),
        (np.float32, 3, dict(mins=(90.0,) * 3, maxs=(1500.0,) * 3, gamma=0.5)),
        (np.float32, 3, dict(mins=(90.0, 80, 70), maxs=(1500.0,) * 3, gamma=0.5)),  # no levels
        (np.float32, 3, dict(mins=(0.0,) * 3, maxs=(1.0,) * 3, twist=((1, 0.5, 0), (0, 1, 0)))),
        (np.uint16, 1, dict(mins=(0.0,), maxs=(65535.0,), colormap="jet", invert=True)),
        (np.int16, 1, dict(mins=(-100.0,), maxs=(3000.0,), gamma=2.0)),
    ]
    for dtype, channels, fields in cases:
        raw = (rng.normal(300, 200, (64, 48, channels))).astype(dtype)
        info = SourceInfo(
            levels=(Level(48, 64, 256, 256),), channels=channels,
            bits_per_sample=np.dtype(dtype).itemsize * 8,
            sample_format="float" if dtype == np.float32 else "int",
            dtype=np.dtype(dtype).name, min_values=(0.0,) * channels,
            max_values=(1.0,) * channels, colorspace="GREYSCALE" if channels == 1 else "sRGB",
        )  # fmt: skip
        rendering = Rendering(**fields)
        table = build_table(curve_of(info, rendering, raw.dtype))
        with np.errstate(all="ignore"):
            np.testing.assert_array_equal(
                develop(raw, info, rendering, True, table), develop(raw, info, rendering)
            )
            assert (
                develop(raw, info, rendering, True).tobytes()
                == develop(raw, info, rendering).tobytes()
            )
        expect_levels = not (channels == 3 and (len(set(fields["mins"])) > 1 or "twist" in fields))
        assert (levels_of(info, rendering) is not None) == expect_levels


def test_tables_are_built_once_in_the_background(monkeypatch):
    """Many request threads asking for one chain's table: one build, then the table."""
    import threading
    import time

    from iipserver import pipeline

    builds = []

    def slow_build(curve):
        builds.append(curve)
        time.sleep(0.2)
        return t.tone_table.__wrapped__(curve)

    monkeypatch.setattr(pipeline, "build_table", slow_build)
    tables = pipeline.Tables()
    tone = t.Tone(gamma=0.7)
    seen = []

    def ask():
        for _ in range(50):
            seen.append(tables.get(tone))
            time.sleep(0.01)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert builds == [tone]
    assert seen[0] is None and seen[-1] is not None  # requests never waited for the build
    data = np.linspace(-0.5, 1.5, 999, dtype=np.float32).reshape(-1, 1, 1)
    np.testing.assert_array_equal(t.apply_tone(data, tone, seen[-1]), tone.exact(data))
