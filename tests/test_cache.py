"""The shared memcached cache with real memcached servers and real daemon processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from images import pyramid_levels, rgb_image, write_pyramid
from processes import wait_for
from reference import ServerProcess, free_port

from iipserver.cache import EntryLRU, MemcachedCache, NoSharedCache, parse_servers, shared_key
from iipserver.protocol.responses import Response

MEMCACHED = shutil.which("memcached") or "/usr/bin/memcached"
pytestmark = pytest.mark.skipif(
    not os.path.exists(MEMCACHED), reason="memcached not installed (Debian package memcached)"
)
REPO = Path(__file__).resolve().parent.parent


class Memcached:
    """A real memcached on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [MEMCACHED, "-l", "127.0.0.1", "-p", str(self.port), "-U", "0", "-m", "64", "-u", "root"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        import socket

        def up() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_for(up, 10, f"memcached on {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def items(self) -> int:
        import pylibmc

        client = pylibmc.Client([self.address], binary=True)
        return sum(int(stats.get("curr_items", 0)) for _, stats in client.get_stats())


@pytest.fixture
def memcached() -> Iterator[Memcached]:
    server = Memcached()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    write_pyramid(root / "rgb.tif", pyramid_levels(rgb_image(600, 400)), photometric="rgb")
    noise = np.random.default_rng(3).integers(0, 255, (1500, 1500, 3), dtype=np.uint8)
    write_pyramid(root / "noise.tif", pyramid_levels(noise), photometric="rgb")
    return root


def daemon(tmp_path: Path, data: Path, servers: str, name: str) -> ServerProcess:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "VIRTUAL_ENV")}
    env.update(
        PYTHONPATH=str(REPO), FILESYSTEM_PREFIX=f"{data}/", MEMCACHED_SERVERS=servers,
        STATUS_ENDPOINT="1", VERBOSITY="0", MAX_IMAGE_CACHE_SIZE="0",
    )  # fmt: skip
    proc = ServerProcess(
        name,
        lambda port: [sys.executable, "-m", "iipserver", "fcgi", "--bind", f"127.0.0.1:{port}",
                      "--workers", "1"],
        env,
        cwd=tmp_path,
    )  # fmt: skip
    proc.start()
    return proc


def status(server: ServerProcess) -> dict:
    return json.loads(server.get("STATUS").body)["shared_cache"]


def test_second_process_answers_from_the_first_ones_entries(tmp_path, data, memcached):
    a = daemon(tmp_path, data, memcached.address, "a")
    b = daemon(tmp_path, data, memcached.address, "b")
    try:
        first = a.get("FIF=rgb.tif&GAM=0.5&JTL=1,0")
        assert first.status == 200 and status(a)["stores"] == 1
        second = b.get("FIF=rgb.tif&GAM=0.5&JTL=1,0")
        assert second.status == 200 and status(b)["hits"] == 1
        assert second.body == first.body
        assert second.header("ETag") == first.header("ETag")
        assert memcached.items() == 1
        # an error is never stored
        assert b.get("FIF=rgb.tif&JTL=9,0").status == 404
        assert b.get("FIF=missing.tif&OBJ=Max-size").status == 404
        assert memcached.items() == 1
        # a conditional request answered from the shared cache
        etag = first.header("ETag")
        assert b.get("FIF=rgb.tif&GAM=0.5&JTL=1,0", {"If-None-Match": etag}).status == 304
        since = first.header("Last-Modified")
        assert b.get("FIF=rgb.tif&GAM=0.5&JTL=1,0", {"If-Modified-Since": since}).status == 304
    finally:
        a.stop()
        b.stop()


def test_touching_the_image_invalidates(tmp_path, data, memcached):
    a = daemon(tmp_path, data, memcached.address, "a")
    try:
        before = a.get("FIF=rgb.tif&OBJ=Max-size")
        assert before.body == b"\r\nMax-size:600 400\r\n"
        write_pyramid(data / "rgb.tif", pyramid_levels(rgb_image(500, 300)), photometric="rgb")
        later = time.time() + 10
        os.utime(data / "rgb.tif", (later, later))
        after = a.get("FIF=rgb.tif&OBJ=Max-size")
        assert after.body == b"\r\nMax-size:500 300\r\n"
        assert after.header("ETag") != before.header("ETag")
        assert status(a)["hits"] == 0
    finally:
        a.stop()


def test_memcached_outage_costs_no_request(tmp_path, data, memcached):
    a = daemon(tmp_path, data, memcached.address, "a")
    try:
        queries = [f"FIF=rgb.tif&CNT={1 + i / 10}&JTL=2,{i % 6}" for i in range(12)]
        for q in queries:
            assert a.get(q).status == 200
        memcached.stop()
        started = time.monotonic()
        for q in queries:
            r = a.get(q)
            assert r.status == 200 and r.body.startswith(b"\xff\xd8")
        assert time.monotonic() - started < 5
        down = status(a)
        assert down["errors"] >= 1 and down["errors"] + down["skipped"] >= len(queries)
        memcached.start()  # same port
        time.sleep(1.2)  # pylibmc retries a failed server after a second
        for q in queries:
            assert a.get(q).status == 200
        hits = status(a)["hits"]
        for q in queries:
            assert a.get(q).status == 200
        assert status(a)["hits"] >= hits + len(queries) - 1
    finally:
        a.stop()


def test_oversized_value_is_skipped(tmp_path, data, memcached):
    a = daemon(tmp_path, data, memcached.address, "a")
    try:
        r = a.get("FIF=noise.tif&WID=1500&CVT=png")
        assert r.status == 200 and len(r.body) > 1024 * 1024
        assert status(a)["too_big"] == 1
        assert a.get("FIF=noise.tif&WID=1500&CVT=png").status == 200
    finally:
        a.stop()


def test_consistent_hashing_over_two_servers(tmp_path, data):
    one, two = Memcached(), Memcached()
    one.start()
    two.start()
    a = daemon(tmp_path, data, f"{one.address},{two.address}", "a")
    b = daemon(tmp_path, data, f"{one.address} {two.address}", "b")
    try:
        queries = [f"FIF=rgb.tif&QLT={q}&JTL=2,{t}" for q in (50, 60, 70, 80) for t in range(6)]
        for q in queries:
            assert a.get(q).status == 200
        assert one.items() > 0 and two.items() > 0
        assert one.items() + two.items() == len(queries)
        for q in queries:
            img = b.get(q)
            assert simplejpeg.decode_jpeg(img.body).ndim == 3
        assert status(b)["hits"] == len(queries)
    finally:
        a.stop()
        b.stop()
        one.stop()
        two.stop()


def test_shared_cache_off_by_default_and_keys():
    assert parse_servers("") == []
    assert parse_servers("a, b:1234 [::1]:99") == ["a:11211", "b:1234", "[::1]:99"]
    key = shared_key("iipserver", "abc:FIF=x.tif&JTL=0,0")
    assert key == "iipserver:abc:FIF=x.tif&JTL=0,0"
    long = shared_key("iipserver", "x" * 400)
    assert long.startswith("iipserver:sha256:") and len(long) <= 250
    assert shared_key("p", "a b").startswith("p:sha256:")  # spaces are not allowed in keys
    assert NoSharedCache().get("k") is None


def test_unreachable_memcached_is_a_fast_miss():
    cache = MemcachedCache([f"127.0.0.1:{free_port()}"], 60)
    started = time.monotonic()
    for _ in range(20):
        assert cache.get("k") is None
        cache.set("k", b"v")
    assert time.monotonic() - started < 1.0
    stats = cache.stats()
    assert stats["errors"] == 1 and stats["skipped"] == 39  # one failure, then a second off


def test_packed_responses_round_trip():
    r = Response(200, [("Content-Type", "image/jpeg"), ("X", "é")], b"\xff\xd8data")
    back = Response.unpack(r.pack())
    assert (back.status, back.headers, back.body) == (r.status, r.headers, r.body)
    assert Response.unpack(b"garbage") is None


def test_entry_lru():
    lru: EntryLRU[str, int] = EntryLRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1
    lru.put("c", 3)
    assert lru.get("b") is None and lru.get("a") == 1 and len(lru) == 2
