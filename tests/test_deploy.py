"""The deployment as docs/deploy.md describes it, run for real.

A real nginx with the shipped site (``nginx/iipserver.conf``, only the listen port and the
socket substituted, as in ``test_nginx.py``) in front of
``python -m iipserver fcgi --bind unix:<tmp>/s.sock --workers 2``:

- IIP, IIIF (path style, ``URI_MAP=iiif=>IIIF`` as the site's comment asks) and DeepZoom;
- a worker killed with SIGKILL during a burst of concurrent requests: the only request allowed
  to fail is the one that worker was serving at that moment (nginx answers it 502: the site has
  a single upstream server, so ``fastcgi_next_upstream error`` has nowhere else to send it); the
  client retries it once and it succeeds; the dead worker is replaced and every request started
  after the replacement is up succeeds at the first try;
- SIGHUP during traffic: no failed request, same workers (they empty their caches in place);
- SIGTERM: a request the worker has already accepted is answered, the daemon exits 0 within a
  few seconds and removes its socket file.

``systemd-analyze verify`` checks ``systemd/iipserver.service``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import simplejpeg
from fcgi_client import FCGI_BEGIN_REQUEST, FCGI_PARAMS, FCGI_STDIN, cgi_params, encode_params
from fcgi_client import record as fcgi_record
from fcgi_client import stream as fcgi_stream
from images import pyramid_levels, rgb_image, write_pyramid
from processes import children, wait_for
from test_nginx import (
    NGINX,
    OBJ_BODY,
    OBJ_QUERY,
    HTTPResponse,
    Nginx,
    Process,
    clean_env,
    fetch,
    free_port,
    short_tempdir,
    site_config,
)

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "iipserver.service"
UNIT_EXEC = "/opt/iipserver/bin/iipserver"

#: A mix of cheap and less cheap requests (tiles of every level, CVT exports, OBJ, IIIF, DZ).
BURST_TARGETS = [
    "/fcgi-bin/iipsrv.fcgi?FIF=rgb.tif&JTL=2,{i12}",
    "/iip?FIF=rgb.tif&JTL=1,{i4}",
    "/iip?FIF=rgb.tif&WID={w}&CVT=jpeg",
    f"/iip?{OBJ_QUERY}",
    "/iiif/rgb.tif/full/{w},/0/default.jpg",
    "/fcgi-bin/iipsrv.fcgi?DeepZoom=rgb.tif_files/10/{i4}_{i3}.jpg",
]
BURST = 200
THREADS = 16


# --------------------------------------------------------------------------------------------
# The stack


@dataclass
class Deployment:
    """nginx (shipped site) in front of ``iipserver fcgi`` on a Unix socket."""

    daemon: Process
    nginx: Nginx | None
    socket_path: Path
    log: Path

    @property
    def pid(self) -> int:
        return self.daemon.proc.pid

    def get(self, target: str, timeout: float = 15.0) -> HTTPResponse:
        assert self.nginx is not None
        return fetch(self.nginx.port, target, timeout=timeout)

    def workers(self) -> set[int]:
        return children(self.pid)

    def stop(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
        self.daemon.stop()


def start_daemon(image_dir: Path, workdir: Path) -> tuple[Process, Path, Path]:
    sock = workdir / "s.sock"
    log = workdir / "iipserver.log"
    env = clean_env(
        FILESYSTEM_PREFIX=f"{image_dir}/",
        URI_MAP="iiif=>IIIF",  # the site's /iiif/ location relies on it
        VERBOSITY="2",
        LOGFILE=str(log),
    )
    argv = [sys.executable, "-m", "iipserver", "fcgi", "--bind", f"unix:{sock}", "--workers", "2"]
    daemon = Process("iipserver", argv, env=env, cwd=workdir)
    daemon.wait_ready(f"unix:{sock}", log=log)
    wait_for(lambda: len(children(daemon.proc.pid)) == 2, 10, "two workers")
    return daemon, sock, log


def start_deployment(image_dir: Path, workdir: Path, *, with_nginx: bool = True) -> Deployment:
    daemon, sock, log = start_daemon(image_dir, workdir)
    if not with_nginx:
        return Deployment(daemon, None, sock, log)
    try:
        port = free_port()
        (workdir / "nginx").mkdir()
        nginx = Nginx(workdir / "nginx", site_config(port, f"unix:{sock}"), port)
    except BaseException:
        daemon.stop()
        raise
    return Deployment(daemon, nginx, sock, log)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deploy-images")
    write_pyramid(root / "rgb.tif", pyramid_levels(rgb_image()), photometric="rgb")
    return root


@pytest.fixture(scope="module")
def deployment(image_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    if not NGINX:
        pytest.skip("nginx is not installed (apt-get install nginx-light; scripts/test.sh does)")
    dep = start_deployment(image_dir, short_tempdir(tmp_path_factory, "deploy"))
    try:
        yield dep
    finally:
        dep.stop()


# --------------------------------------------------------------------------------------------
# Requests and bursts


@dataclass
class Outcome:
    """One request of a burst: its first attempt and, if that failed, the retry."""

    target: str
    started: float
    ended: float
    first: int | str  # HTTP status, or the connection error's name
    retry: int | str | None = None

    @property
    def final(self) -> int | str:
        return self.first if self.retry is None else self.retry


def burst_target(i: int) -> str:
    template = BURST_TARGETS[i % len(BURST_TARGETS)]
    return template.format(i12=i % 12, i4=i % 4, i3=i % 3, w=200 + 7 * (i % 100))


def attempt(dep: Deployment, target: str) -> int | str:
    try:
        resp = dep.get(target, timeout=10)
    except OSError as exc:
        return type(exc).__name__
    if resp.status == 200 and (target.endswith(".jpg") or "JTL" in target or "CVT" in target):
        simplejpeg.decode_jpeg_header(resp.body)  # a whole image, not a truncated one
    return resp.status


def run_burst(dep: Deployment, during: threading.Event, after: int) -> list[Outcome]:
    """Send BURST requests from THREADS threads; set ``during`` once ``after`` have ended.

    A request whose first attempt fails is retried once (what a viewer does for a tile).
    """
    lock = threading.Lock()
    done = 0

    def one(i: int) -> Outcome:
        nonlocal done
        target = burst_target(i)
        started = time.monotonic()
        first = attempt(dep, target)
        ended = time.monotonic()
        outcome = Outcome(target, started, ended, first)
        if first != 200:
            outcome.retry = attempt(dep, target)
        with lock:
            done += 1
            if done == after:
                during.set()
        return outcome

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(one, range(BURST)))


def error_lines(dep: Deployment) -> str:
    nginx = dep.nginx.error_log() if dep.nginx else ""
    return "\n".join(line for line in nginx.splitlines() if "[error]" in line)


# --------------------------------------------------------------------------------------------
# Through nginx: the three protocols


def test_iip(deployment: Deployment) -> None:
    resp = deployment.get(f"/fcgi-bin/iipsrv.fcgi?{OBJ_QUERY}")
    assert resp.status == 200 and resp.body == OBJ_BODY
    resp = deployment.get("/fcgi-bin/iipsrv.fcgi?FIF=rgb.tif&JTL=2,5")
    assert resp.status == 200 and resp.header("Content-Type") == "image/jpeg"
    assert simplejpeg.decode_jpeg(resp.body).shape == (256, 256, 3)


def test_iiif(deployment: Deployment) -> None:
    resp = deployment.get("/iiif/rgb.tif/info.json")
    assert resp.status == 200, resp
    info = json.loads(resp.body)
    assert (info["width"], info["height"]) == (1000, 750)
    assert info["id"].endswith("/iiif/rgb.tif")
    resp = deployment.get("/iiif/rgb.tif/256,0,256,256/256,/0/default.jpg")
    assert resp.status == 200 and resp.header("Content-Type") == "image/jpeg"
    assert simplejpeg.decode_jpeg(resp.body).shape == (256, 256, 3)


def test_deepzoom(deployment: Deployment) -> None:
    resp = deployment.get("/fcgi-bin/iipsrv.fcgi?DeepZoom=rgb.tif.dzi")
    assert resp.status == 200, resp
    assert b'Width="1000"' in resp.body and b'Height="750"' in resp.body
    resp = deployment.get("/fcgi-bin/iipsrv.fcgi?DeepZoom=rgb.tif_files/10/1_2.jpg")
    assert resp.status == 200 and resp.header("Content-Type") == "image/jpeg"
    assert simplejpeg.decode_jpeg(resp.body).shape[:2] == (750 - 512, 256)


# --------------------------------------------------------------------------------------------
# Signals during traffic


def test_sighup_during_traffic(deployment: Deployment) -> None:
    """SIGHUP empties every worker's caches in place: same pids, not one failed request."""
    before = deployment.workers()
    assert len(before) == 2
    cleared_before = deployment.log.read_text().count("caches cleared (SIGHUP)")
    midway = threading.Event()

    def hup() -> None:
        midway.wait(20)
        os.kill(deployment.pid, signal.SIGHUP)

    sender = threading.Thread(target=hup)
    sender.start()
    outcomes = run_burst(deployment, midway, after=BURST // 3)
    sender.join()
    failed = [o for o in outcomes if o.first != 200]
    assert not failed, f"{failed[:5]}\n{error_lines(deployment)}"
    assert deployment.daemon.proc.poll() is None
    assert deployment.workers() == before
    wait_for(
        lambda: deployment.log.read_text().count("caches cleared (SIGHUP)") >= cleared_before + 2,
        5,
        "both workers to log that they cleared their caches",
    )


def test_worker_killed_during_burst(deployment: Deployment) -> None:
    """SIGKILL one worker mid-burst: it is replaced, and only its own request may fail (502).

    That request was inside the dead process; nginx has no other upstream to send it to (one
    ``server`` line, and a FastCGI request is not retried once sent), so it answers 502 and the
    client retries. Queued connections wait in the listening socket, which the supervisor
    keeps open, and go to the other worker or to the replacement.
    """
    before = deployment.workers()
    assert len(before) == 2
    victim = min(before)
    midway = threading.Event()
    times: dict[str, float] = {}

    def kill_and_watch() -> None:
        midway.wait(20)
        times["kill"] = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: victim not in deployment.workers() and len(deployment.workers()) == 2,
            5,
            "the killed worker's replacement",
        )
        times["replaced"] = time.monotonic()

    watcher = threading.Thread(target=kill_and_watch)
    watcher.start()
    outcomes = run_burst(deployment, midway, after=BURST // 3)
    watcher.join()
    errors = error_lines(deployment)
    assert "replaced" in times, errors

    after = deployment.workers()
    assert victim not in after and len(after) == 2 and before - {victim} <= after
    assert deployment.daemon.proc.poll() is None

    # Every request ends 200, at the latest after one retry.
    assert [o for o in outcomes if o.final != 200] == [], errors
    # At most the one request the dead worker was serving failed, and it had started before
    # the kill; a failure is a 502 from nginx or a connection error, never another status.
    failed = [o for o in outcomes if o.first != 200]
    assert len(failed) <= 1, f"{failed}\n{errors}"
    for o in failed:
        assert o.first == 502 or isinstance(o.first, str), o
        assert o.started < times["kill"], (o, times)
    # Once the replacement is up, everything succeeds at the first try.
    late = [o for o in outcomes if o.started >= times["replaced"]]
    assert all(o.first == 200 for o in late), late
    log = deployment.log.read_text()
    assert f"worker {victim} died (signal {signal.SIGKILL.value})" in log


# --------------------------------------------------------------------------------------------
# SIGTERM


def test_sigterm_finishes_the_request_in_progress_and_exits(
    image_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A request a worker has accepted is answered; the daemon exits 0 and unlinks its socket.

    The request is held "in progress" deterministically: a FastCGI client sends half of it,
    SIGTERM arrives, then the client sends the rest.
    """
    dep = start_deployment(
        image_dir, short_tempdir(tmp_path_factory, "deploy-term"), with_nginx=False
    )
    try:
        # Split between two name-value pairs: flup decodes each PARAMS record on its own.
        pairs = cgi_params(OBJ_QUERY)
        head, tail = encode_params(pairs[:3]), encode_params(pairs[3:])
        begin = fcgi_record(FCGI_BEGIN_REQUEST, 1, b"\x00\x01\x00\x00\x00\x00\x00\x00")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(10)
            conn.connect(str(dep.socket_path))
            conn.sendall(begin + fcgi_record(FCGI_PARAMS, 1, head))
            time.sleep(0.3)  # a worker accepts it and waits for the rest
            os.kill(dep.pid, signal.SIGTERM)
            time.sleep(0.3)
            assert dep.daemon.proc.poll() is None, "the daemon did not wait for the request"
            conn.sendall(
                fcgi_record(FCGI_PARAMS, 1, tail)
                + fcgi_record(FCGI_PARAMS, 1)
                + fcgi_stream(FCGI_STDIN, 1, b"")
            )
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        assert b"Status: 200" in data or b"Status:" not in data, data[:300]
        assert OBJ_BODY in data, data[:300]
        started = time.monotonic()
        assert dep.daemon.proc.wait(timeout=5) == 0
        assert time.monotonic() - started < 5
        assert not dep.socket_path.exists()
        wait_for(lambda: not children(dep.pid), 2, "the workers to be gone")
    finally:
        dep.stop()


# --------------------------------------------------------------------------------------------
# systemd


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """``systemd-analyze verify`` accepts the unit, with ExecStart pointing at a real script."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    script = Path(sys.executable).parent / "iipserver"
    if not script.exists():
        pytest.skip(f"no iipserver script next to {sys.executable} (pip install -e .)")
    text = UNIT.read_text()
    assert UNIT_EXEC in text
    unit = tmp_path / "iipserver.service"
    unit.write_text(text.replace(UNIT_EXEC, str(script)))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "iipserver.service" not in result.stderr, result.stderr  # no warnings about it
    if not Path(UNIT_EXEC).exists():  # the check is real: a missing ExecStart fails it
        unit.write_text(text)
        result = subprocess.run(
            [analyze, "verify", str(unit)], capture_output=True, text=True, check=False
        )
        assert result.returncode != 0 and UNIT_EXEC in result.stderr, result


def test_worker_killed_with_the_retry_variant(
    image_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The variant docs/deploy.md gives: the same socket twice in the upstream, max_fails=0.

    ``fastcgi_next_upstream error`` (in the shipped site) then sends the request whose worker
    died to the "second" server, i.e. to another worker: no request fails at all.
    """
    if not NGINX:
        pytest.skip("nginx is not installed (apt-get install nginx-light; scripts/test.sh does)")
    workdir = short_tempdir(tmp_path_factory, "deploy-retry")
    daemon, sock, log = start_daemon(image_dir, workdir)
    line = f"server unix:{sock} max_fails=0;"
    site = site_config(free_port(), f"unix:{sock} max_fails=0").replace(line, f"{line}\n    {line}")
    port = int(re.search(r"listen 127\.0\.0\.1:(\d+);", site).group(1))  # type: ignore[union-attr]
    (workdir / "nginx").mkdir()
    try:
        dep = Deployment(daemon, Nginx(workdir / "nginx", site, port), sock, log)
    except BaseException:
        daemon.stop()
        raise
    try:
        victim = min(dep.workers())
        midway = threading.Event()

        def kill() -> None:
            midway.wait(20)
            os.kill(victim, signal.SIGKILL)

        killer = threading.Thread(target=kill)
        killer.start()
        outcomes = run_burst(dep, midway, after=BURST // 3)
        killer.join()
        failed = [o for o in outcomes if o.first != 200]
        assert not failed, f"{failed}\n{error_lines(dep)}"
        wait_for(lambda: victim not in dep.workers() and len(dep.workers()) == 2, 5, "replacement")
    finally:
        dep.stop()
