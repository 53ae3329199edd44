"""FITS files served by several FastCGI workers at once over one shared on-disk pyramid cache.

The daemon (``python -m iipserver fcgi --workers 4``) serves a fresh 3000x2500 float32 FITS file
whose smallest level has a footprint larger than ``DIRECT_PIXELS``, so that its tile waits for
the level build while the tiles of the other reduced levels are computed from their footprints
and a background build runs. Eight clients start together (a barrier) and ask for every tile of
every level. Every answer must be byte for byte what the in-process application gives with the
pyramid cache off (every reduced tile computed from full resolution: an oracle that shares
nothing with the cache under test), and afterwards the cache must hold one complete entry whose
zarr levels are ``pyramid.reduce`` of the image exactly, each level built once by one process.

Also: a build killed mid-way (SIGKILL) leaves nothing that a later build or a reader trusts,
and its lock is free; rewriting the file while the daemon runs serves the new pixels from a
new entry and removes the old one; a build waiting for an entry's lock while the entry is
evicted still answers.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fcgi_client
import numpy as np
import pytest
import zarr
from fits_images import pyramid_sizes
from processes import children, wait_for
from reference import ServerProcess
from wsgi_client import call

from iipserver.app import make_app
from iipserver.settings import Settings
from iipserver.sources import PyramidCache, pyramid
from iipserver.sources.fits import DIRECT_PIXELS, FitsSource

fits = pytest.importorskip("astropy.io.fits")

REPO = Path(__file__).resolve().parent.parent
TILE = 256
#: Large enough that the smallest level's footprint (the whole image) exceeds DIRECT_PIXELS.
WIDTH, HEIGHT = 3000, 2500
WORKERS = 4
CLIENTS = 8
#: The FITS files' modification time (then one more second per rewrite).
MTIME = 1_700_000_000

# -- images ------------------------------------------------------------------------------------


def sky(width: int, height: int, seed: int, channels: int = 1) -> np.ndarray:
    """A seeded float32 sky ``(h, w, c)``, row 0 at the top: noise, stars drawn as small
    stamps, scattered NaN pixels and an aligned 64x64 NaN block (whose reduced pixels are NaN
    at every level of this test)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(100.0, 5.0, size=(height, width, channels)).astype(np.float32)
    yy, xx = np.mgrid[-7:8, -7:8]
    for _ in range(width * height // 4000):
        cx, cy = int(rng.integers(7, width - 8)), int(rng.integers(7, height - 8))
        sigma, flux = rng.uniform(0.8, 2.5), rng.uniform(50.0, 5000.0)
        stamp = flux * np.exp(-(xx**2 + yy**2) / (2 * sigma**2))
        colours = rng.uniform(0.5, 1.5, size=channels)
        img[cy - 7 : cy + 8, cx - 7 : cx + 8] += (stamp[..., None] * colours).astype(np.float32)
    img[rng.integers(0, height, 400), rng.integers(0, width, 400)] = np.nan
    img[512:576, 1024:1088] = np.nan
    return img


def fits_bytes(img: np.ndarray) -> bytes:
    """A FITS file of ``img`` ``(h, w, c)``: image row 0 is the top, the last FITS row."""
    planes = np.moveaxis(img, 2, 0)[:, ::-1]
    data = planes[0] if planes.shape[0] == 1 else planes
    out = io.BytesIO()
    hdu = fits.PrimaryHDU(np.ascontiguousarray(data))
    hdu.header["OBJECT"] = "CONCURRENCY"
    hdu.writeto(out)
    return out.getvalue()


def write_fits(path: Path, img: np.ndarray, mtime: int) -> None:
    path.write_bytes(fits_bytes(img))
    os.utime(path, (mtime, mtime))


def tile_queries(name: str, width: int, height: int) -> list[str]:
    """``JTL`` requests for every tile of every level (IIP numbering: 0 = smallest)."""
    sizes = pyramid_sizes(width, height)
    queries = []
    for r, (w, h) in enumerate(reversed(sizes)):
        count = -(-w // TILE) * -(-h // TILE)
        queries += [f"FIF={name}&JTL={r},{i}" for i in range(count)]
    return queries


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return sky(WIDTH, HEIGHT, seed=61)


def test_smallest_level_needs_a_build() -> None:
    """The premise of this file: the smallest level's tile is too large a footprint to compute
    while a request waits, the next level's tiles are not."""
    sizes = pyramid_sizes(WIDTH, HEIGHT)
    assert len(sizes) == 5
    assert WIDTH * HEIGHT > DIRECT_PIXELS >= (TILE << 3) ** 2


# -- the oracle and the daemon -----------------------------------------------------------------


def oracle(data: Path, queries: list[str]) -> dict[str, bytes]:
    """The in-process application's answers with the pyramid cache off: every reduced tile is
    computed from its full-resolution footprint."""
    app = make_app(
        Settings.from_environ({"FILESYSTEM_PREFIX": f"{data}/", "PYRAMID_CACHE_MB": "0"})
    )
    answers = {}
    for q in queries:
        reply = call(app, q)
        assert reply.status == 200 and reply.header("Content-Type") == "image/jpeg", (q, reply)
        answers[q] = reply.body
    return answers


@contextlib.contextmanager
def daemon(data: Path, cache: Path, work: Path) -> Iterator[ServerProcess]:
    """``iipserver fcgi`` with WORKERS pre-forked workers over ``data``, its pyramid cache in
    ``cache``, every request logged (with the worker's pid) to ``work/iipserver.log``."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "VIRTUAL_ENV", "TMPDIR")
    env = {k: v for k, v in os.environ.items() if k in keep or k.startswith("PYENV")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env.update(
        FILESYSTEM_PREFIX=f"{data}/",
        PYRAMID_CACHE_DIR=str(cache),
        VERBOSITY="2",
        LOGFILE=str(work / "iipserver.log"),
        OMP_NUM_THREADS="1",
        TZ="UTC",
    )
    argv = [sys.executable, "-m", "iipserver", "fcgi", "--workers", str(WORKERS), "--bind"]
    server = ServerProcess(
        "iipserver", lambda port: [*argv, f"127.0.0.1:{port}"], env, cwd=work, request_timeout=120
    )
    server.start()
    try:
        wait_for(lambda: len(workers(server)) == WORKERS, 30, "the workers")
        yield server
    finally:
        server.stop()


def workers(server: ServerProcess) -> set[int]:
    """The daemon's live worker pids."""
    assert server.proc is not None
    return children(server.proc.pid)


def fetch_together(address: str, orders: list[list[str]]) -> list[tuple[str, fcgi_client.Response]]:
    """One client thread per list of queries, all released at once, each asking in order."""
    barrier = threading.Barrier(len(orders), timeout=30)

    def client(queries: list[str]) -> list[tuple[str, fcgi_client.Response]]:
        barrier.wait()
        return [(q, fcgi_client.get(address, q, timeout=120)) for q in queries]

    with ThreadPoolExecutor(len(orders)) as pool:
        futures = [pool.submit(client, queries) for queries in orders]
        return [answer for future in futures for answer in future.result()]


def client_orders(queries: list[str], seed: int) -> list[list[str]]:
    """CLIENTS shuffled copies of ``queries``; half the clients start with the smallest level's
    tile (the one that waits for the build), so that several workers wait for it at once."""
    rng = random.Random(seed)
    first = next(q for q in queries if q.endswith("&JTL=0,0"))
    orders = []
    for k in range(CLIENTS):
        order = list(queries)
        rng.shuffle(order)
        if k % 2 == 0:
            order.remove(first)
            order.insert(0, first)
        orders.append(order)
    return orders


def assert_answers(
    answers: list[tuple[str, fcgi_client.Response]], expected: dict[str, bytes]
) -> None:
    wrong = [
        f"{q}: {r.status} {r.header('Content-Type')} {len(r.body)} bytes"
        + (f" {r.body[:120]!r}" if r.status != 200 else ", not the oracle's bytes")
        for q, r in answers
        if r.status != 200 or r.header("Content-Type") != "image/jpeg" or r.body != expected[q]
    ]
    assert not wrong, f"{len(wrong)} of {len(answers)} answers wrong: {wrong[:10]}"


LOGGED_TILE = re.compile(r"\[(\d+)\] INFO: GET FIF=[^&\s]+&JTL=\d+,\d+ -> 200 ")


def serving_pids(log: Path) -> collections.Counter[int]:
    """Tile requests answered 200, per worker pid (from the VERBOSITY=2 request log)."""
    return collections.Counter(int(m[1]) for m in LOGGED_TILE.finditer(log.read_text()))


def assert_clean_log(log: Path) -> None:
    text = log.read_text()
    bad = [line for line in text.splitlines() if " ERROR" in line or "Traceback" in line]
    assert not bad, bad[:10]


# -- the cache, as found on disk ---------------------------------------------------------------


def entries(cache: Path) -> list[Path]:
    """Entry directories of the cache (lock files aside)."""
    return sorted(p for p in cache.iterdir() if p.is_dir())


def builds(entry: Path) -> list[tuple[int, int]]:
    """``builds.log`` as (level, pid) lines."""
    lines = (entry / "builds.log").read_text().splitlines()
    return [(int(r), int(pid)) for r, pid in (line.split() for line in lines)]


def lock_is_free(lock: Path) -> bool:
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # releases the lock if it was taken
    return True


def assert_complete_entry(cache: Path, img: np.ndarray) -> tuple[Path, list[tuple[int, int]]]:
    """The cache holds exactly one entry (and its lock), complete, without leftovers, whose
    levels are ``pyramid.reduce`` of ``img`` exactly; returns it and its builds."""
    (entry,) = entries(cache)
    names = sorted(p.name for p in cache.iterdir())
    # an evicted entry's lock file may stay (removing a lock file others may open is racy)
    assert all(n == entry.name or n.endswith(".lock") for n in names), names
    assert lock_is_free(cache / (entry.name + ".lock"))
    top = len(pyramid_sizes(img.shape[1], img.shape[0])) - 1
    inside = sorted(p.name for p in entry.iterdir())
    assert [n for n in inside if n.startswith("tmp") or n.endswith(".tmp")] == [], inside
    assert sorted(n for n in inside if n.startswith("L")) == [f"L{r}" for r in range(top)], inside
    assert {"builds.log", "meta.json", "cuts.json"} <= set(inside), inside
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["levels"] == [list(s) for s in pyramid_sizes(img.shape[1], img.shape[0])], meta
    for r in range(top):
        level = zarr.open_array(str(entry / f"L{r}"), mode="r")[:]
        expected = pyramid.reduce(img, top - r)
        assert level.dtype == np.float32 and level.shape == expected.shape, (r, level.shape)
        np.testing.assert_array_equal(level, expected, err_msg=f"cached level {r}")
    assert np.isnan(level).any()  # the NaN block survives to the smallest level
    built = builds(entry)
    assert sorted(r for r, _ in built) == list(range(top)), f"each level once: {built}"
    assert len({pid for _, pid in built}) == 1, built
    return entry, built


# -- the tests ---------------------------------------------------------------------------------


def test_workers_share_one_build(image: np.ndarray, tmp_path: Path) -> None:
    data, cache, work = tmp_path / "data", tmp_path / "pyramids", tmp_path / "work"
    for d in (data, cache, work):
        d.mkdir()
    write_fits(data / "sky.fits", image, MTIME)
    queries = tile_queries("sky.fits", WIDTH, HEIGHT)
    assert len(queries) == 1 + 4 + 9 + 30 + 120
    expected = oracle(data, queries)
    with daemon(data, cache, work) as server:
        pids = workers(server)
        answers = fetch_together(server.address, client_orders(queries, seed=3))
        assert len(answers) == CLIENTS * len(queries)
        assert_answers(answers, expected)
        entry, built = assert_complete_entry(cache, image)
        assert sorted(p.name for p in cache.iterdir()) == [entry.name, entry.name + ".lock"]
        log = work / "iipserver.log"
        served = serving_pids(log)
        assert built[0][1] in pids, (built, pids)
        assert set(served) <= pids and len(served) >= 2, (served, pids)
        assert sum(served.values()) == len(answers), served
        assert_clean_log(log)
        assert workers(server) == pids  # none died


BUILDER = """
import os, sys, time
from iipserver.sources import pyramid, pyramids
from iipserver.sources.fits import FitsData, TILE

path, directory = sys.argv[1], sys.argv[2]
data = FitsData(path)
pyramids.BAND_BYTES = TILE * data.width * data.channels * 4  # one band = one row of tiles
sizes = pyramid.level_sizes(data.width, data.height, TILE)
entry = pyramids.PyramidCache(directory, 1 << 40).entry(path, os.stat(path), sizes, data.channels)


class Slow:
    width, height, channels = data.width, data.height, data.channels

    def region(self, x, y, w, h):
        time.sleep(0.25)
        return data.region(x, y, w, h)


entry.build(Slow(), sizes, progress=lambda rows: print("band", rows, flush=True))
print("finished", flush=True)
"""


def test_killed_build_leaves_nothing_trusted(image: np.ndarray, tmp_path: Path) -> None:
    data, cache, work = tmp_path / "data", tmp_path / "pyramids", tmp_path / "work"
    for d in (data, cache, work):
        d.mkdir()
    path = data / "killed.fits"
    write_fits(path, image, MTIME)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    builder = subprocess.Popen(
        [sys.executable, "-c", BUILDER, os.path.realpath(path), str(cache)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert builder.stdout is not None
        for _ in range(3):  # three of the ten bands pushed: every level half written
            line = builder.stdout.readline()
            if not line.startswith("band"):
                builder.kill()
                raise AssertionError(f"builder said {line!r}: {builder.communicate(timeout=10)}")
        (entry,) = entries(cache)
        lock = cache / (entry.name + ".lock")
        assert not lock_is_free(lock)  # the builder holds it
        builder.send_signal(signal.SIGKILL)
        builder.wait(10)
    finally:
        if builder.poll() is None:
            builder.kill()
            builder.wait(10)
        for stream in (builder.stdout, builder.stderr):
            if stream is not None:
                stream.close()
    assert builder.returncode == -signal.SIGKILL
    left = sorted(p.name for p in entry.iterdir())
    assert [n for n in left if n.startswith("tmp-")], left  # the half-written levels
    assert not [n for n in left if n.startswith("L")] and "builds.log" not in left, left
    assert "meta.json" not in left, left
    assert lock_is_free(lock)  # the kernel released the dead holder's flock

    queries = tile_queries("killed.fits", WIDTH, HEIGHT)
    expected = oracle(data, queries)
    with daemon(data, cache, work) as server:
        orders = [queries[: len(queries) // 2], queries[len(queries) // 2 :][::-1]]
        answers = fetch_together(server.address, orders)
        assert_answers(answers, expected)
        again, built = assert_complete_entry(cache, image)
        assert again == entry
        assert builder.pid not in {pid for _, pid in built}
        assert built[0][1] in workers(server)
        assert_clean_log(work / "iipserver.log")


@pytest.mark.parametrize("how", ["replaced", "in-place"])
def test_rewritten_file_gets_a_new_entry(how: str, image: np.ndarray, tmp_path: Path) -> None:
    data, cache, work = tmp_path / "data", tmp_path / "pyramids", tmp_path / "work"
    oracle_v1, oracle_v2 = tmp_path / "oracle-v1", tmp_path / "oracle-v2"
    for d in (data, cache, work, oracle_v1, oracle_v2):
        d.mkdir()
    newer = sky(WIDTH, HEIGHT, seed=67)
    write_fits(oracle_v1 / "sky.fits", image, MTIME)
    write_fits(oracle_v2 / "sky.fits", newer, MTIME)
    queries = tile_queries("sky.fits", WIDTH, HEIGHT)
    expected_v1, expected_v2 = oracle(oracle_v1, queries), oracle(oracle_v2, queries)
    changed = [q for q in queries if expected_v1[q] != expected_v2[q]]
    assert len(changed) == len(queries)  # every tile tells the versions apart

    path = data / "sky.fits"
    write_fits(path, image, MTIME)
    with daemon(data, cache, work) as server:
        assert_answers(fetch_together(server.address, client_orders(queries, 5)[:4]), expected_v1)
        old, _ = assert_complete_entry(cache, image)

        content = fits_bytes(newer)
        if how == "replaced":  # a new file renamed over the old one (new inode)
            (data / "sky.fits.new").write_bytes(content)
            os.replace(data / "sky.fits.new", path)
        else:  # the same file overwritten (same inode and size): only the mtime tells
            assert len(content) == path.stat().st_size
            with open(path, "r+b") as f:
                f.write(content)
        os.utime(path, (MTIME + 1, MTIME + 1))

        assert_answers(fetch_together(server.address, client_orders(queries, 7)[:4]), expected_v2)
        wait_for(lambda: not old.exists(), 10, "the old entry to be removed")
        new, _ = assert_complete_entry(cache, newer)
        assert new != old
        # the old version's lock file goes with it: none accumulate, one per live entry
        assert sorted(p.name for p in cache.iterdir()) == [new.name, new.name + ".lock"]
        assert_clean_log(work / "iipserver.log")


def _waiting_for_flock(lock: Path) -> bool:
    """Someone is blocked in ``flock`` on ``lock`` (a ``->`` line of /proc/locks)."""
    inode = f":{lock.stat().st_ino} "
    with open("/proc/locks") as f:
        return any("->" in line and "FLOCK" in line and inode in line for line in f)


@pytest.mark.parametrize("unlink_lock", [False, True], ids=["lock-kept", "lock-unlinked"])
def test_build_waiting_for_an_evicted_entry(
    image: np.ndarray, tmp_path: Path, unlink_lock: bool
) -> None:
    """Eviction removes an entry while holding its lock (``PyramidCache._remove``). A request
    whose tile waits for the build, blocked on that lock meanwhile, must still be answered
    (the entry rebuilt, or the tile computed), not fail because the directory went away."""
    if not os.path.exists("/proc/locks"):
        pytest.skip("needs /proc/locks to see the waiting build")
    cache = tmp_path / "pyramids"
    path = tmp_path / "sky.fits"
    write_fits(path, image, MTIME)
    source = FitsSource(str(path), PyramidCache(str(cache), 1 << 40))
    try:
        (entry,) = entries(cache)
        lock = cache / (entry.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)  # the evictor
        with ThreadPoolExecutor(1) as pool:
            try:
                tile = pool.submit(source.read_tile, 0, 0)  # a footprint larger than DIRECT_PIXELS
                wait_for(lambda: _waiting_for_flock(lock), 10, "the build to wait for the lock")
                shutil.rmtree(entry)  # what eviction does under the lock
                if unlink_lock:
                    os.unlink(lock)
            finally:
                os.close(fd)
            got = tile.result(60)
    finally:
        source.close()
        source.data.release()
    np.testing.assert_array_equal(got, pyramid.reduce(image, 4))
    wait_for(lambda: (entry / "meta.json").exists(), 30, "the background build to finish")
    assert lock.exists()
    assert sorted(r for r, _ in builds(entry)) == [0, 1, 2, 3]  # each level built once
