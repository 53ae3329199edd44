"""bench/make_data.py (seeded BigTIFF pyramids, tile URLs) and bench/locustfile.py (a short run).

The locust run starts ``python -m iipserver serve`` on small generated data and drives it with
the three simulated browsers for a few seconds in a subprocess (locust patches the standard
library with gevent, so it never runs inside pytest's process).
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import tifffile
from images import pyramid_levels, write_pyramid

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
BANNER = re.compile(r"server on http://127\.0\.0\.1:(?P<port>\d+)/")
START_TIMEOUT = 30.0


def _load_make_data() -> ModuleType:
    """bench/make_data.py as a module (bench/ is not a package and must not go on sys.path)."""
    spec = importlib.util.spec_from_file_location("bench_make_data", BENCH / "make_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


md = _load_make_data()


def _levels_in_file(path: Path) -> list[tuple[int, int]]:
    """(width, height) of every top-level IFD, straight from tifffile."""
    with tifffile.TiffFile(path) as tif:
        return [(int(p.imagewidth), int(p.imagelength)) for p in _pages(tif)]


def _pages(tif: tifffile.TiffFile) -> list[tifffile.TiffPage]:
    pages = list(tif.pages)
    assert all(isinstance(p, tifffile.TiffPage) for p in pages)
    return [p for p in pages if isinstance(p, tifffile.TiffPage)]


# -- make_data ------------------------------------------------------------------------------


EXPECTED = {
    # name: (dtype, samples per pixel, photometric, compression, has SMin/SMax)
    "sky.tif": ("float32", 1, tifffile.PHOTOMETRIC.MINISBLACK, tifffile.COMPRESSION.NONE, True),
    "rgb.tif": ("uint8", 3, tifffile.PHOTOMETRIC.YCBCR, tifffile.COMPRESSION.JPEG, False),
    "cube.tif": ("float32", 3, tifffile.PHOTOMETRIC.MINISBLACK, tifffile.COMPRESSION.NONE, True),
}


def test_make_data_writes_bigtiff_pyramids(tmp_path: Path) -> None:
    files = md.make_data(tmp_path, size=512)
    assert set(files) == set(EXPECTED)
    for name, (dtype, spp, photometric, compression, smin_smax) in EXPECTED.items():
        data = files[name]
        with tifffile.TiffFile(tmp_path / name) as tif:
            assert tif.is_bigtiff, name
            pages = _pages(tif)
            assert len(pages) == data.levels
            for page in pages:
                assert (page.tilewidth, page.tilelength) == (256, 256), name
                assert str(page.dtype) == dtype, name
                assert page.samplesperpixel == spp, name
                assert page.photometric == photometric, name
                assert page.compression == compression, name
                assert page.planarconfig == tifffile.PLANARCONFIG.CONTIG, name
            first = pages[0]
            if smin_smax:
                smin = np.atleast_1d(first.tags[340].value)
                smax = np.atleast_1d(first.tags[341].value)
                assert smin.shape == smax.shape == (spp,)
                assert np.all(smin < smax)
                header = first.description  # tifffile strips the padding after END
                assert header.startswith("SIMPLE  =") and header.endswith("END")
                assert "CD1_1   =" in header and "CTYPE1  = 'RA---TAN'" in header
            pixels = first.asarray()
        assert pixels.dtype == np.dtype(dtype)
        sizes = _levels_in_file(tmp_path / name)
        assert sizes == list(data.level_sizes)
        assert (data.width, data.height) == sizes[0]
        # iipsrv's layout: halvings (floor) until a level fits in one tile.
        assert [(w // 2, h // 2) for w, h in sizes[:-1]] == sizes[1:]
        assert max(sizes[-1]) <= 256 and (len(sizes) == 1 or max(sizes[-2]) > 256)
    assert (files["sky.tif"].width, files["sky.tif"].height) == (512, 512)
    assert (files["cube.tif"].width, files["cube.tif"].height) == (256, 192)
    sky = tifffile.imread(tmp_path / "sky.tif", key=0)
    assert 95 < float(np.median(sky)) < 105 and float(sky.max()) > 150  # background and stars


def test_make_data_is_seeded_and_cached(tmp_path: Path) -> None:
    first = md.make_data(tmp_path / "a", size=512)
    again = md.make_data(tmp_path / "b", size=512)
    for name in first:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    stamps = {name: (tmp_path / "a" / name).stat().st_mtime_ns for name in first}
    assert md.make_data(tmp_path / "a", size=512) == first  # from the manifest, no rewrite
    assert {n: (tmp_path / "a" / n).stat().st_mtime_ns for n in first} == stamps
    assert again == first
    # Another size, or a file gone, regenerates.
    bigger = md.make_data(tmp_path / "a", size=600)
    assert bigger["sky.tif"].width == 600
    (tmp_path / "a" / "rgb.tif").unlink()
    assert md.make_data(tmp_path / "a", size=600) == bigger
    assert (tmp_path / "a" / "rgb.tif").exists()
    with pytest.raises(ValueError):
        md.make_data(tmp_path / "c", size=16)


# -- tile_urls ------------------------------------------------------------------------------


def _check_urls(urls: list[str], path: Path, endpoint: str, fif: str) -> set[int]:
    """Every URL names a tile that exists in the file; returns the resolutions seen."""
    sizes = _levels_in_file(path)[::-1]  # IIP resolution 0 = smallest
    seen = set()
    for url in urls:
        m = re.fullmatch(rf"{re.escape(endpoint)}\?FIF={re.escape(fif)}&JTL=(\d+),(\d+)", url)
        assert m, url
        r, i = int(m[1]), int(m[2])
        assert 0 <= r < len(sizes), url
        w, h = sizes[r]
        assert 0 <= i < -(-w // 256) * -(-h // 256), (url, sizes[r])
        seen.add(r)
    return seen


def test_tile_urls_non_square(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, size=(600, 1100), dtype=np.uint8)
    path = write_pyramid(tmp_path / "wide.tif", pyramid_levels(image), bigtiff=True)
    data = md.describe(path)
    assert data.level_sizes == ((1100, 600), (550, 300), (275, 150), (137, 75))
    assert [data.grid(r) for r in range(data.levels)] == [(1, 1), (2, 1), (3, 2), (5, 3)]
    urls = md.tile_urls("/iip", "FIF=wide.tif&JTL={r},{i}", data, 3000, seed=5)
    assert len(urls) == 3000
    assert _check_urls(urls, path, "/iip", "wide.tif") == {0, 1, 2, 3}
    # Every tile of the full level shows up, its last (bottom-right) one included.
    assert {u.rsplit("=", 1)[1] for u in urls if "JTL=3," in u} == {f"3,{i}" for i in range(15)}
    assert md.tile_urls("/iip", "FIF=wide.tif&JTL={r},{i}", data, 3000, seed=5) == urls
    assert md.tile_urls("/iip", "FIF=wide.tif&JTL={r},{i}", data, 3000, seed=6) != urls


def test_tile_urls_on_make_data_cube(tmp_path: Path) -> None:
    files = md.make_data(tmp_path, size=1024)
    cube = files["cube.tif"]
    assert (cube.width, cube.height) == (512, 384)
    urls = md.tile_urls(md.ENDPOINT, "FIF=cube.tif&JTL={r},{i}", cube, 500, seed=1)
    assert _check_urls(urls, tmp_path / "cube.tif", md.ENDPOINT, "cube.tif") == {0, 1}
    sky = files["sky.tif"]
    urls = md.tile_urls(md.ENDPOINT, "FIF=sky.tif&JTL={r},{i}", sky, 500, seed=1)
    assert _check_urls(urls, tmp_path / "sky.tif", md.ENDPOINT, "sky.tif") == {0, 1, 2}


# -- locust ---------------------------------------------------------------------------------


def _server_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "VIRTUAL_ENV", "TMPDIR")
    env = {k: v for k, v in os.environ.items() if k in keep or k.startswith("PYENV")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env.update(VERBOSITY="1", OMP_NUM_THREADS="1")
    return env


@contextlib.contextmanager
def _serve(images: Path, workdir: Path) -> Iterator[int]:
    """``python -m iipserver serve --port 0`` over ``images``; yields its port, kills it after."""
    out_path, err_path = workdir / "serve.out", workdir / "serve.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "iipserver", "serve", "--port", "0", "--workers", "2",
             str(images)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=_server_env(), cwd=workdir,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (match := BANNER.search(out_path.read_text(errors="replace"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"iipserver serve did not start:\n{err_path.read_text()}")
            time.sleep(0.05)
        yield int(match["port"])
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
                break


@pytest.mark.slow
def test_locust_browsers_against_serve(tmp_path: Path) -> None:
    if importlib.util.find_spec("locust") is None:
        pytest.skip("locust is not installed")
    md.make_data(tmp_path / "images", size=1024)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IIP_", "IIIF_", "LOCUST_"))}
    with _serve(tmp_path / "images", tmp_path) as port:
        run = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(BENCH / "locustfile.py"), "--headless",
             "-u", "20", "-r", "20", "-t", "8s", "--host", f"http://127.0.0.1:{port}",
             "--only-summary", "--csv", str(tmp_path / "locust"), "--loglevel", "WARNING"],
            capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path, check=False,
        )  # fmt: skip
    report = f"locust exit {run.returncode}\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    with open(tmp_path / "locust_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    failures = (tmp_path / "locust_failures.csv").read_text()
    total = rows.pop("Aggregated")
    assert int(total["Failure Count"]) == 0, f"{failures}\n{report}"
    assert int(total["Request Count"]) >= 100, report
    counts = {name: int(row["Request Count"]) for name, row in rows.items()}
    for name in ("visiomatic open", "visiomatic tile", "iiif info", "iiif tile"):
        assert counts.get(name, 0) > 0, (name, counts)
    assert sum(n for name, n in counts.items() if name.startswith("cvt ")) > 0, counts
    assert counts["visiomatic tile"] >= 50 and counts["iiif tile"] >= 50, counts
    assert run.returncode == 0, report
