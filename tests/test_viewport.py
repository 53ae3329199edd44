"""CVT geometry: iipsrv 1.1's level choice, region and output size (observed outputs)."""

import pytest

from iipserver.viewport import Region, c_round, plan

LEVELS = [(250, 187), (500, 375), (1000, 750)]

# MAX_CVT, ALLOW_UPSCALING, query, 1.1 output (observed on the Debian binary), level, region
OBSERVED = [
    (5000, 1, "(none)", "1000x750", 2, (0, 0, 1000, 750)),
    (5000, 1, "WID=200", "200x150", 0, (0, 0, 250, 187)),
    (5000, 1, "HEI=100", "133x99", 0, (0, 0, 250, 187)),
    (5000, 1, "WID=200&HEI=200", "200x150", 0, (0, 0, 250, 187)),
    (5000, 1, "WID=333", "333x250", 1, (0, 0, 500, 375)),
    (5000, 1, "WID=6000", "5000x3750", 2, (0, 0, 1000, 750)),
    (5000, 1, "RGN=0,0,0.5,0.25", "1000x376", 2, (0, 0, 500, 188)),
    (5000, 1, "RGN=0,0,0.5,0.25&WID=200", "199x75", 1, (0, 0, 250, 94)),
    (5000, 1, "RGN=0.9,0.9,0.5,0.5", "1000x750", 2, (900, 675, 100, 75)),
    (5000, 1, "WID=1", "1x1", 0, (0, 0, 250, 187)),
    (5000, 1, "WID=0", "1000x750", 2, (0, 0, 1000, 750)),
    (5000, 1, "WID=250", "250x187", 0, (0, 0, 250, 187)),
    (5000, 1, "WID=251", "251x188", 1, (0, 0, 500, 375)),
    (5000, 1, "WID=500", "500x375", 1, (0, 0, 500, 375)),
    (5000, 1, "WID=501", "501x376", 2, (0, 0, 1000, 750)),
    (5000, 1, "HEI=187", "249x186", 0, (0, 0, 250, 187)),
    (5000, 1, "HEI=188", "251x188", 1, (0, 0, 500, 375)),
    (5000, 1, "WID=300&HEI=100", "134x100", 0, (0, 0, 250, 187)),
    (5000, 1, "WID=100&HEI=300", "100x75", 0, (0, 0, 250, 187)),
    (5000, 1, "WID=640&HEI=480", "640x480", 2, (0, 0, 1000, 750)),
    (5000, 1, "HEI=5000", "5000x3750", 2, (0, 0, 1000, 750)),
    (5000, 1, "RGN=0.1,0.2,0.3,0.4", "750x750", 2, (100, 150, 300, 300)),
    (5000, 1, "RGN=0.123,0.456,0.333,0.222", "1000x502", 2, (123, 342, 333, 167)),
    (5000, 1, "RGN=0.3333,0.3333,0.3333,0.3333", "999x750", 2, (333, 250, 333, 250)),
    (5000, 1, "RGN=0.1,0.1,0.3,0.3&WID=100", "100x75", 1, (50, 38, 150, 113)),
    (5000, 1, "RGN=0.1,0.1,0.3,0.3&HEI=100", "133x100", 1, (50, 38, 150, 113)),
    (5000, 1, "RGN=0.25,0.25,0.5,0.5&WID=300&HEI=300", "300x225", 2, (250, 188, 500, 375)),
    (5000, 1, "RGN=0.777,0.05,0.5,0.2&WID=128", "128x86", 2, (777, 38, 223, 150)),
    (5000, 1, "RGN=0,0,1,0.1&WID=999", "999x75", 2, (0, 0, 1000, 75)),
    (5000, 1, "RGN=0.5,0.5,0.5,0.5&WID=2000", "2000x1500", 2, (500, 375, 500, 375)),
    (5000, 1, "RGN=0.001,0.001,0.01,0.01", "938x750", 2, (1, 1, 10, 8)),
    (5000, 1, "RGN=0,0,0.5,0.5&WID=250&HEI=10", "13x10", 0, (0, 0, 125, 94)),
    (5000, 1, "WID=-1", "5000x3740", 0, (0, 0, 250, 187)),
    (5000, 1, "HEI=-5", "5000x3740", 0, (0, 0, 250, 187)),
    (5000, 1, "RGN=0.5,0.5,0,0.5", "1000x750", 2, (0, 0, 1000, 750)),
    (300, 1, "(none)", "300x224", 0, (0, 0, 250, 187)),
    (300, 1, "WID=400", "300x225", 1, (0, 0, 500, 375)),
    (300, 1, "HEI=400", "300x225", 1, (0, 0, 500, 375)),
    (300, 1, "RGN=0,0,0.5,0.5", "300x226", 1, (0, 0, 250, 188)),
    (300, 1, "RGN=0,0,0.2,0.2&WID=1000", "300x225", 2, (0, 0, 200, 150)),
    (300, 1, "WID=299", "299x224", 1, (0, 0, 500, 375)),
    (300, 1, "WID=301", "300x225", 1, (0, 0, 500, 375)),
    (300, 0, "(none)", "250x187", 0, (0, 0, 250, 187)),
    (300, 0, "WID=2000", "250x187", 0, (0, 0, 250, 187)),
    (300, 0, "RGN=0,0,0.5,0.25", "300x113", 1, (0, 0, 250, 94)),
    (300, 0, "RGN=0,0,0.1,0.1&WID=1000", "300x225", 2, (0, 0, 100, 75)),
    (300, 0, "HEI=1000", "250x187", 0, (0, 0, 250, 187)),
]


def _request(query):
    wid = hei = 0
    region = Region()
    for part in query.split("&"):
        if part.startswith("WID="):
            wid = int(part[4:]) % (1 << 32)
        elif part.startswith("HEI="):
            hei = int(part[4:]) % (1 << 32)
        elif part.startswith("RGN="):
            x, y, w, h = (float(v) for v in part[4:].split(","))
            if w > 0 and h > 0:
                region = Region.from_fractions(x, y, w, h)
    return (wid, hei), region


@pytest.mark.parametrize(("max_cvt", "upscaling", "query", "output", "level", "box"), OBSERVED)
def test_matches_iipsrv_1_1(max_cvt, upscaling, query, output, level, box):
    requested, region = _request(query)
    p = plan((1000, 750), LEVELS, region, requested, max_cvt, bool(upscaling))
    assert f"{p.out_width}x{p.out_height}" == output
    assert (p.resolution, (p.x, p.y, p.width, p.height)) == (level, box)


def test_level_never_goes_below_zero():
    # 1.1 reads past its level list here (a 2-level 300x1200 image with MAX_CVT=300)
    p = plan((300, 1200), [(150, 600), (300, 1200)], Region(), (0, 0), 300, True)
    assert p.resolution == 0
    assert p.out_width >= 1 and p.out_height >= 1


def test_region_at_the_edge_is_not_empty():
    # 1.1 crashes when the rounded left edge reaches the level's width
    p = plan(
        (1000, 750), LEVELS, Region.from_fractions(0.9999, 0.9999, 0.5, 0.5), (0, 0), 5000, True
    )
    assert p.width >= 1 and p.height >= 1
    assert p.x + p.width <= 1000 and p.y + p.height <= 750


def test_unlimited_max_cvt():
    p = plan((1000, 750), LEVELS, Region(), (6000, 0), -1, True)
    assert (p.out_width, p.out_height) == (6000, 4500)


def test_region_width_is_shrunk_to_the_right_edge():
    r = Region.from_fractions(0.9, 0.9, 0.5, 0.5)
    assert r.width == pytest.approx(0.1, abs=1e-6)
    assert r.height == 0.5


def test_c_round():
    assert [c_round(v) for v in (0.5, 1.5, 2.5, -0.5, 187.5, 2.4999)] == [1, 2, 3, -1, 188, 2]
