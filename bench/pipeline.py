"""Pipeline micro-benchmark: microseconds per 256×256 tile for each stage and common chains.

    python bench/pipeline.py [--repeat 7] [--json out.json]

Each figure is the median over ``--repeat`` runs of the mean time of a batch of calls on one
256×256 tile (float32 star field, uint16, 8-bit RGB). "read" reads a tile from a tiled TIFF on
disk (one pread + decode, page cache warm); "encode" is JPEG quality 75. Chains are full
``pipeline.develop`` + ``finish`` calls with the Rendering a request would produce, [direct]
computing every stage, [table] through the lookup table the server builds (in the background)
once a chain has served a few tiles: the whole chain from the stored float32 values when it is
one per-value function, else the stages after CTW (same bytes either way).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from images import pyramid_levels, star_field, write_pyramid

from iipserver import transforms as t
from iipserver.encoders import OutputFormat, encode
from iipserver.pipeline import build_table, curve_of, develop, finish
from iipserver.sources.tiff import TiffSource
from iipserver.view import Rendering


def timeit(fn: Callable[[], object], repeat: int, budget: float = 0.2) -> float:
    """Median over ``repeat`` batches of the mean µs per call."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    number = max(1, int(budget / once))
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - start) / number * 1e6)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    sky = star_field(256, 256, seed=3)
    sky3 = star_field(256, 256, seed=4, channels=3)
    u16 = np.random.default_rng(1).integers(0, 65535, (256, 256, 1), dtype=np.uint16)
    rgb = np.random.default_rng(2).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    lo, hi = float(sky.min()), float(np.percentile(sky, 99.5))
    f1 = sky[:, :, None]
    norm = t.normalise(f1, [lo], [hi])
    norm3 = t.normalise(sky3, [lo] * 3, [hi] * 3)
    rows: dict[str, float] = {}

    with tempfile.TemporaryDirectory() as tmp:
        tiff = write_pyramid(Path(tmp) / "sky.tif", pyramid_levels(star_field(1024, 1024, seed=5)))
        jpeg = write_pyramid(
            Path(tmp) / "rgb.tif",
            pyramid_levels(np.ascontiguousarray(np.repeat(rgb, 4, axis=0).repeat(4, axis=1))),
            compression="jpeg",
            photometric="ycbcr",
        )
        sky_source, rgb_source = TiffSource(str(tiff)), TiffSource(str(jpeg))
        top = len(sky_source.info.levels) - 1
        rows["read float32 tile (uncompressed)"] = timeit(
            lambda: sky_source.read_tile(top, 5), args.repeat
        )
        rows["read RGB tile (JPEG-in-TIFF decode)"] = timeit(
            lambda: rgb_source.read_tile(len(rgb_source.info.levels) - 1, 5), args.repeat
        )
        rows["read RGB tile as stored (pass-through, no decode)"] = timeit(
            lambda: rgb_source.stored_jpeg(len(rgb_source.info.levels) - 1, 5), args.repeat
        )
        sky_source.close()
        rgb_source.close()

    rows["normalise float32"] = timeit(lambda: t.normalise(f1, [lo], [hi]), args.repeat)
    rows["normalise uint16"] = timeit(lambda: t.normalise(u16, [0], [65535]), args.repeat)
    rows["gamma 0.4545"] = timeit(lambda: t.gamma(norm, 0.4545), args.repeat)
    rows["log"] = timeit(lambda: t.log_gamma(norm), args.repeat)
    rows["invert"] = timeit(lambda: t.invert(norm), args.repeat)
    for name in ("hot", "cold", "jet", "red"):
        rows[f"colormap {name}"] = timeit(lambda name=name: t.colormap(norm, name), args.repeat)
    rows["twist 3x3 (3 bands)"] = timeit(
        lambda: t.twist(norm3, [(1, 0.5, 0), (0, 1, 0.5), (0.5, 0, 1)]), args.repeat
    )
    rows["shade (3 bands)"] = timeit(lambda: t.shade(norm3, 30, 45), args.repeat)
    rows["quantise"] = timeit(lambda: t.quantise(norm), args.repeat)
    q = t.quantise(norm3)
    hist = t.histogram(q)
    rows["greyscale (RGB)"] = timeit(lambda: t.greyscale(rgb), args.repeat)
    rows["equalise (RGB)"] = timeit(lambda: t.equalise(rgb, hist), args.repeat)
    rows["binarise (RGB)"] = timeit(lambda: t.binarise(rgb, 128), args.repeat)
    rows["resize bilinear 256->200"] = timeit(lambda: t.resize_bilinear(rgb, 200, 200), args.repeat)
    rows["resize nearest 256->200"] = timeit(lambda: t.resize_nearest(rgb, 200, 200), args.repeat)
    rows["encode JPEG RGB q75"] = timeit(lambda: encode(q, OutputFormat.JPEG, 75), args.repeat)
    grey = t.quantise(norm)
    rows["encode JPEG grey q75"] = timeit(lambda: encode(grey, OutputFormat.JPEG, 75), args.repeat)

    from iipserver.sources.base import Level, SourceInfo

    def info(channels: int, dtype: str, bits: int) -> SourceInfo:
        fmt = "float" if dtype.startswith("float") else "uint"
        return SourceInfo(
            levels=(Level(256, 256, 256, 256),),
            channels=channels,
            bits_per_sample=bits,
            sample_format=fmt,
            dtype=dtype,
            min_values=(lo,) * channels,
            max_values=(hi,) * channels,
            colorspace="GREYSCALE" if channels == 1 else "sRGB",
        )

    f_info, f3_info = info(1, "float32", 32), info(3, "float32", 32)
    chains = {
        "chain: float32 default (normalise+quantise)": (f1, f_info, Rendering((lo,), (hi,))),
        "chain: VisiOmatic MINMAX+GAM+CTW (1 band)": (
            f1,
            f_info,
            Rendering((lo,), (hi,), gamma=0.4545, twist=((1.0,), (1.0,), (1.0,))),
        ),
        "chain: VisiOmatic MINMAX+GAM+CTW (3 bands)": (
            sky3,
            f3_info,
            Rendering((lo,) * 3, (hi,) * 3, gamma=0.4545, twist=((1, 0, 0), (0, 1, 0), (0, 0, 1))),
        ),
        "chain: VisiOmatic MINMAX+GAM+CTW+CMP=jet": (
            f1,
            f_info,
            Rendering((lo,), (hi,), gamma=0.4545, twist=((1.0,), (1.0,), (1.0,)), colormap="jet"),
        ),
        "chain: CMP=jet&INV&CNT=2.5": (
            f1,
            f_info,
            Rendering((lo,), (hi,), colormap="jet", invert=True, contrast=2.5),
        ),
    }
    for name, (tile, tile_info, rendering) in chains.items():
        table = build_table(curve_of(tile_info, rendering, tile.dtype))
        for label, use in (("direct", False), ("table", True)):
            rows[f"{name} [{label}]"] = timeit(
                lambda tile=tile, tile_info=tile_info, rendering=rendering, use=use, table=table: (
                    finish(
                        develop(tile, tile_info, rendering, use, table if use else None),
                        tile_info,
                        rendering,
                        None,
                    )
                ),
                args.repeat,
            )

    width = max(len(k) for k in rows)
    print(f"{'stage (256x256 tile)':<{width}}  µs/tile")
    for name, value in rows.items():
        print(f"{name:<{width}}  {value:8.0f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": platform.platform(), "python": sys.version.split()[0], "us": rows},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
