"""Faults under load (issue 9): memcached killed and restarted, a worker killed, the data
directory gone for a moment — while loopback clients keep asking through nginx.

Every answer is checked against the in-process application's bytes for the same request: no
wrong answer is allowed at any time; failures are allowed only inside an injected outage and
only as clean errors (nginx's 502 for the request the killed worker was serving; the IIP 404
text while the images are away). Afterwards the daemon has all its workers and uses memcached
again.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass

import pytest
from images import pyramid_levels, rgb_image, star_field, write_pyramid
from nginx_site import NGINX, site_config
from processes import children
from test_nginx import Nginx, Process, clean_env, free_port, short_tempdir
from wsgi_client import call

from iipserver.app import make_app
from iipserver.settings import Settings

MEMCACHED = shutil.which("memcached") or shutil.which("memcached", path="/usr/bin:/usr/sbin")
ENDPOINT = "/fcgi-bin/iipsrv.fcgi"
QUERIES = [
    *(f"FIF=rgb.tif&JTL=2,{i}" for i in range(12)),
    *(f"FIF=sky.tif&MINMAX=1:95,900&GAM=0.5&JTL=2,{i}" for i in range(12)),
    "FIF=rgb.tif&WID=300&CVT=jpeg",
    "FIF=sky.tif&OBJ=IIP,1.0&OBJ=Max-size&OBJ=Resolution-number",
]


@dataclass
class Answer:
    at: float
    query: str
    status: int
    body: bytes


def load(port: int, stop: threading.Event, answers: list[Answer], started: float, k: int) -> None:
    """One client: keep-alive requests in rotation until ``stop``; errors are answers too."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    i = k * 7
    while not stop.is_set():
        query = QUERIES[i % len(QUERIES)]
        i += 1
        try:
            conn.request("GET", f"{ENDPOINT}?{query}")
            resp = conn.getresponse()
            answers.append(Answer(time.monotonic() - started, query, resp.status, resp.read()))
        except (OSError, http.client.HTTPException) as exc:
            answers.append(Answer(time.monotonic() - started, query, -1, repr(exc).encode()))
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    conn.close()


@pytest.mark.slow
def test_faults_under_load(tmp_path_factory: pytest.TempPathFactory) -> None:
    if not NGINX or not MEMCACHED:
        pytest.skip("nginx and memcached are needed (scripts/test.sh installs them)")
    work = short_tempdir(tmp_path_factory, "faults")
    data = work / "images"
    data.mkdir()
    write_pyramid(data / "rgb.tif", pyramid_levels(rgb_image(900, 700)), compression="zlib")
    write_pyramid(data / "sky.tif", pyramid_levels(star_field(900, 700)))
    expected_app = make_app(Settings.from_environ({"FILESYSTEM_PREFIX": f"{data}/"}))
    expected = {q: call(expected_app, q).body for q in QUERIES}

    mc_port = free_port()
    mc_argv = [MEMCACHED, "-l", "127.0.0.1", "-p", str(mc_port), "-U", "0", "-m", "32"]
    if os.geteuid() == 0:
        mc_argv += ["-u", "root"]
    memcached = Process("memcached", mc_argv, env=clean_env(), cwd=work)
    memcached.wait_ready(f"127.0.0.1:{mc_port}")
    address = f"unix:{work}/iipserver.sock"
    env = clean_env(
        FILESYSTEM_PREFIX=f"{data}/", MEMCACHED_SERVERS=f"127.0.0.1:{mc_port}",
        STATUS_ENDPOINT="1", VERBOSITY="1", LOGFILE=str(work / "iipserver.log"),
    )  # fmt: skip
    argv = [sys.executable, "-m", "iipserver", "fcgi", "--bind", address, "--workers", "2"]
    daemon = Process("iipserver", argv, env=env, cwd=work)
    daemon.wait_ready(address, log=work / "iipserver.log")
    port = free_port()
    (work / "nginx").mkdir()
    nginx = Nginx(work / "nginx", site_config(port, address), port)
    answers: list[Answer] = []
    stop = threading.Event()
    started = time.monotonic()
    clients = [
        threading.Thread(target=load, args=(port, stop, answers, started, k)) for k in range(4)
    ]
    windows: dict[str, tuple[float, float]] = {}
    try:
        workers_before = sorted(children(daemon.proc.pid))
        assert len(workers_before) == 2
        for client in clients:
            client.start()
        time.sleep(1.0)
        t = time.monotonic() - started
        memcached.proc.kill()  # memcached dies: every lookup and store fails
        memcached.proc.wait()
        time.sleep(1.5)
        memcached = Process("memcached", mc_argv, env=clean_env(), cwd=work)
        memcached.wait_ready(f"127.0.0.1:{mc_port}")
        windows["memcached"] = (t, time.monotonic() - started)
        time.sleep(1.5)
        t = time.monotonic() - started
        os.kill(workers_before[0], signal.SIGKILL)  # a worker dies mid-load
        time.sleep(1.0)
        windows["worker"] = (t, time.monotonic() - started)
        t = time.monotonic() - started
        aside = work / "images-away"
        data.rename(aside)  # the data directory disappears for a moment
        time.sleep(1.0)
        aside.rename(data)
        windows["data"] = (t, time.monotonic() - started + 2.5)  # + path-cache TTL
        time.sleep(4.0)  # the pool keeps serving: memcached is back, the data is back
    finally:
        stop.set()
        for client in clients:
            client.join(30)
        status = None
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", f"{ENDPOINT}?STATUS")
            status = conn.getresponse().read()
        except OSError:
            pass
        workers_after = children(daemon.proc.pid)
        nginx.stop()
        daemon.stop()
        memcached.stop()

    assert len(answers) > 300, len(answers)
    wrong, failures = [], []
    for a in answers:
        if a.status == 200:
            if a.body != expected[a.query]:
                wrong.append(a)
        else:
            failures.append(a)
    assert not wrong, [(a.at, a.query, a.body[:80]) for a in wrong[:5]]
    for a in failures:
        inside = [name for name, (lo, hi) in windows.items() if lo <= a.at <= hi + 0.5]
        assert inside, f"failure outside any outage: {a}"
        if "data" in inside and a.status == 404:
            assert b"neither a file" in a.body or b"Unable to open" in a.body or b"not" in a.body
            assert str(work).encode() not in a.body  # never the server's paths
        else:
            assert a.status == 502 and "worker" in inside, a  # nginx: the killed worker's request
    assert sum(1 for a in failures if a.status == 502) <= 4  # one per client at most
    lo, hi = windows["data"]
    assert any(a.status == 404 and lo <= a.at <= hi for a in failures)  # the outage was real
    lo, hi = windows["memcached"]
    assert sum(1 for a in answers if a.status == 200 and lo <= a.at <= hi) > 50  # served on
    assert not any(a.status == -1 for a in answers)  # nginx never dropped a connection
    assert len(workers_after) == 2 and workers_before[0] not in workers_after
    assert status is not None
    shared = json.loads(status)["shared_cache"]
    assert shared["errors"] >= 1  # the outage was seen ...
    assert shared["hits"] > 0  # ... and memcached is used again after it
