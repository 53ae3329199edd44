"""Process-level tests of the runners: ``iipserver serve`` (HTTP) and ``iipserver fcgi``.

Every server is a real ``python -m iipserver`` subprocess on a port the kernel picks (``--port 0``
/ ``--bind 127.0.0.1:0``; the banner says which). Its stdout and stderr go to files, never to
pipes that could fill up, and teardown kills it and its workers whatever happened.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import tifffile
from processes import children as _children
from processes import wait_for as _wait_for

from iipserver import __version__, demo, logs
from iipserver.errors import ConfigError
from iipserver.serve import Dispatcher
from iipserver.settings import Settings

REPO = Path(__file__).resolve().parent.parent
BANNER = re.compile(r"server on (?:http|fastcgi)://(?:fd 0 \()?(?P<address>\S+?)/?[,)]")
START_TIMEOUT = 20.0
STOP_TIMEOUT = 8.0


# -- helpers --------------------------------------------------------------------------------


def _base_env(**extra: str) -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "VIRTUAL_ENV", "TMPDIR", "SYSTEMROOT")
    env = {k: v for k, v in os.environ.items() if k in keep or k.startswith("PYENV")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env.update(VERBOSITY="2", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


class Server:
    """One ``python -m iipserver …`` process with its output in files."""

    def __init__(self, args: list[str], env: dict[str, str], workdir: Path) -> None:
        self.args = args
        self.env = env
        self.workdir = workdir
        self.stdout_path = workdir / "stdout.txt"
        self.stderr_path = workdir / "stderr.txt"
        self.proc: subprocess.Popen[bytes] | None = None
        self.banner = ""
        self.address = ""
        self.stdin: int = subprocess.DEVNULL

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def launch(self) -> subprocess.Popen[bytes]:
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "iipserver", *self.args],
                stdin=self.stdin,
                stdout=out,
                stderr=err,
                env=self.env,
                cwd=self.workdir,
            )
        return self.proc

    def start(self, workers: int | None = None) -> Server:
        """Launch and wait for the banner (and for ``workers`` worker processes)."""
        proc = self.launch()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            match = BANNER.search(self.stdout())
            if match:
                self.banner = self.stdout().splitlines()[0]
                self.address = match["address"]
                break
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}:\n{self.stderr()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no banner after {START_TIMEOUT} s:\n{self.stderr()}")
            time.sleep(0.02)
        if workers:
            _wait_for(lambda: len(_children(self.pid)) >= workers, START_TIMEOUT, "the workers")
        return self

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """Teardown: SIGKILL the server and any worker still around."""
        if self.proc is None:
            return
        pids = _children(self.proc.pid) if self.proc.poll() is None else set()
        for pid in [self.proc.pid, *pids]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def http(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        conn = self.http()
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            headers = {k.lower(): v for k, v in response.getheaders()}
            return response.status, headers, response.read()
        finally:
            conn.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Factory for servers that are always killed at teardown."""
    servers: list[Server] = []

    def make(args: list[str], env: dict[str, str] | None = None) -> Server:
        workdir = tmp_path / f"server{len(servers)}"
        workdir.mkdir()
        server = Server(args, env if env is not None else _base_env(), workdir)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.kill()


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo image set, generated once for this module."""
    return demo.generate(tmp_path_factory.mktemp("demo") / "images")


@pytest.fixture(scope="module")
def http_server(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``iipserver serve`` with two workers over the demo set, shared by read-only tests."""
    workdir = tmp_path_factory.mktemp("serve")
    server = Server(["serve", "--port", "0", "--workers", "2", str(demo_dir)], _base_env(), workdir)
    try:
        yield server.start(workers=2)
    finally:
        server.kill()


# -- a tiny FastCGI client ------------------------------------------------------------------

_BEGIN, _END, _PARAMS, _STDIN, _STDOUT = 1, 3, 4, 5, 6


def _record(kind: int, body: bytes) -> bytes:
    return struct.pack("!BBHHBx", 1, kind, 1, len(body), 0) + body


def _pair(name: str, value: str) -> bytes:
    def length(n: int) -> bytes:
        return bytes([n]) if n < 128 else struct.pack("!I", n | 0x80000000)

    k, v = name.encode(), value.encode()
    return length(len(k)) + length(len(v)) + k + v


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("connection closed mid-record")
        data += chunk
    return data


def fcgi_get(sock: socket.socket, query: str, *, keep: bool = False) -> bytes:
    """Send one FastCGI GET on ``sock``; return the stdout stream (CGI headers + body)."""
    params = {
        "REQUEST_METHOD": "GET",
        "QUERY_STRING": query,
        "SCRIPT_NAME": "/fcgi-bin/iipsrv.fcgi",
        "REQUEST_URI": "/fcgi-bin/iipsrv.fcgi?" + query,
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
    }
    body = b"".join(_pair(k, v) for k, v in params.items())
    begin = struct.pack("!HB5x", 1, 1 if keep else 0)
    sock.sendall(
        _record(_BEGIN, begin)
        + _record(_PARAMS, body)
        + _record(_PARAMS, b"")
        + _record(_STDIN, b"")
    )
    out = b""
    while True:
        _, kind, _, length, padding = struct.unpack("!BBHHBx", _recv_exact(sock, 8))
        content = _recv_exact(sock, length + padding)[:length]
        if kind == _STDOUT:
            out += content
        elif kind == _END:
            return out


def _connect(address: str) -> socket.socket:
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(address[5:])
        return sock
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


# -- serve ----------------------------------------------------------------------------------


def test_serve_banner(http_server: Server, demo_dir: Path) -> None:
    assert http_server.banner.startswith("iipserver ")
    assert f"http://127.0.0.1:{http_server.port}/" in http_server.banner
    assert f"data root {demo_dir}/," in http_server.banner
    assert http_server.banner.endswith("2 workers")


def test_serve_health(http_server: Server) -> None:
    status, headers, body = http_server.get("/health")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"status": "ok", "version": __version__}


def test_serve_images(http_server: Server) -> None:
    status, _, body = http_server.get("/images")
    assert status == 200
    listing = json.loads(body)
    assert listing["truncated"] is False
    assert listing["images"] == [
        {"path": demo.CUBE, "width": 1024, "height": 1024, "channels": 3},
        {"path": demo.RGB, "width": 2048, "height": 1536, "channels": 3},
        {"path": demo.STARS_FITS, "width": 2048, "height": 2048, "channels": 1},
        {"path": demo.STARS, "width": 2048, "height": 2048, "channels": 1},
    ]


def test_serve_demo_fits(http_server: Server) -> None:
    """The demo's FITS file is served directly, with the TIFF's geometry and header."""
    query = "obj=Max-size&obj=Resolution-number&obj=Bits-per-channel"
    status, _, fits_body = http_server.get(f"/iip?FIF={demo.STARS_FITS}&{query}")
    assert status == 200
    assert fits_body == b"\r\nMax-size:2048 2048\r\nResolution-number:4\r\nBits-per-channel:32\r\n"
    status, headers, tile = http_server.get(f"/iip?FIF={demo.STARS_FITS}&JTL=0,0")
    assert status == 200 and headers["content-type"] == "image/jpeg"
    pixels = simplejpeg.decode_jpeg(tile, colorspace="GRAY")
    assert pixels.shape[:2] == (256, 256) and 0 < pixels.mean() < 255
    status, _, subject = http_server.get(f"/iip?FIF={demo.STARS_FITS}&obj=subject")
    assert b"CTYPE1  = 'RA---TAN'" in subject


def test_serve_viewer_page(http_server: Server) -> None:
    status, headers, body = http_server.get("/")
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert b"static/viewer.js" in body
    status, headers, body = http_server.get("/static/viewer.js")
    assert status == 200
    assert "javascript" in headers["content-type"]
    assert b"JTL=" in body


@pytest.mark.parametrize("path", ["/fcgi-bin/iipsrv.fcgi", "/iipsrv", "/iip", "/api"])
def test_serve_iip_paths(http_server: Server, path: str) -> None:
    query = f"FIF={demo.STARS}&obj=IIP,1.0&obj=Max-size&obj=Tile-size&obj=Resolution-number"
    status, headers, body = http_server.get(f"{path}?{query}")
    assert status == 200, body
    assert not headers["content-type"].startswith("text/html")
    assert b"Max-size:2048 2048" in body


def test_serve_other_paths_go_to_the_site(http_server: Server) -> None:
    status, headers, _ = http_server.get(f"/nothing?FIF={demo.STARS}&obj=IIP,1.0")
    assert status == 404
    assert headers["content-type"].startswith("text/html")


def test_serve_keeps_connections_alive(http_server: Server) -> None:
    conn = http_server.http()
    try:
        conn.request("GET", "/health")
        first = conn.getresponse()
        first.read()
        sock = conn.sock
        assert sock is not None and first.getheader("Connection") is None
        conn.request("GET", f"/iip?FIF={demo.RGB}&JTL=0,0")
        second = conn.getresponse()
        assert second.status == 200
        assert second.read()[:2] == b"\xff\xd8"
        assert conn.sock is sock
    finally:
        conn.close()


def test_serve_sighup_clears_caches_and_keeps_serving(http_server: Server) -> None:
    workers = _children(http_server.pid)
    before = http_server.stderr().count("caches cleared (SIGHUP)")
    http_server.signal(signal.SIGHUP)
    _wait_for(
        lambda: http_server.stderr().count("caches cleared (SIGHUP)") >= before + len(workers),
        5,
        "every worker to clear its caches",
    )
    assert _children(http_server.pid) == workers
    assert http_server.get("/health")[0] == 200


def test_serve_replaces_a_dead_worker(spawn: Callable[..., Server], demo_dir: Path) -> None:
    server = spawn(["serve", "--port", "0", "--workers", "2", str(demo_dir)]).start(workers=2)
    victim = min(_children(server.pid))
    os.kill(victim, signal.SIGKILL)
    _wait_for(lambda: len(_children(server.pid) - {victim}) == 2, 10, "a replacement worker")
    assert victim not in _children(server.pid)
    assert server.get("/health")[0] == 200
    assert "died (signal 9)" in server.stderr()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly(spawn: Callable[..., Server], demo_dir: Path, sig: int) -> None:
    server = spawn(["serve", "--port", "0", "--workers", "2", str(demo_dir)]).start(workers=2)
    workers = _children(server.pid)
    assert server.get("/health")[0] == 200
    started = time.monotonic()
    server.signal(sig)
    assert server.wait() == 0
    assert time.monotonic() - started < 5
    assert "Traceback" not in server.stderr()
    for pid in workers:
        _wait_for(lambda pid=pid: not os.path.exists(f"/proc/{pid}"), 5, f"worker {pid} to go")


def test_serve_generates_the_demo_without_data_dir(
    spawn: Callable[..., Server], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    server = spawn(["serve", "--port", "0", "--workers", "1"], _base_env(XDG_CACHE_HOME=str(cache)))
    server.start(workers=1)
    assert f"data root {cache}/iipserver/demo/," in server.banner
    status, _, body = server.get("/images")
    assert status == 200
    assert [entry["path"] for entry in json.loads(body)["images"]] == sorted(demo.FILES)


def test_serve_rejects_a_missing_data_dir(spawn: Callable[..., Server], tmp_path: Path) -> None:
    server = spawn(["serve", "--port", "0", str(tmp_path / "missing")])
    assert server.launch().wait(STOP_TIMEOUT) == 2
    assert "DATA_DIR" in server.stderr()


@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["fcgi", "--bind", "127.0.0.1:0"]])
def test_bad_setting_exits_2(spawn: Callable[..., Server], command: list[str]) -> None:
    server = spawn(command, _base_env(JPEG_QUALITY="abc"))
    assert server.launch().wait(STOP_TIMEOUT) == 2
    err = server.stderr()
    assert err.startswith("iipserver: ")
    assert "JPEG_QUALITY" in err
    assert "Traceback" not in err
    assert server.stdout() == ""


# -- fcgi -----------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["iipserver", "flup"])
def test_fcgi_tcp(spawn: Callable[..., Server], demo_dir: Path, engine: str) -> None:
    env = _base_env(FILESYSTEM_PREFIX=f"{demo_dir}/")
    argv = ["fcgi", "--bind", "127.0.0.1:0", "--workers", "2", "--engine", engine]
    server = spawn(argv, env).start(workers=2)
    assert f"data root {demo_dir}/," in server.banner
    assert server.banner.endswith("2 workers")
    with _connect(server.address) as sock:
        out = fcgi_get(sock, f"FIF={demo.STARS}&obj=IIP,1.0&obj=Max-size")
    assert b"Max-size:2048 2048" in out.partition(b"\r\n\r\n")[2]
    assert b"Traceback" not in out
    # FCGI_KEEP_CONN: several requests on one connection.
    with _connect(server.address) as sock:
        for index in range(3):
            out = fcgi_get(sock, f"FIF={demo.RGB}&JTL=1,{index}", keep=True)
            assert b"Content-Type: image/jpeg" in out
            assert out.partition(b"\r\n\r\n")[2][:2] == b"\xff\xd8"
    # SIGHUP: every worker clears its caches; the pool is unchanged and still answers.
    workers = _children(server.pid)
    server.signal(signal.SIGHUP)
    _wait_for(
        lambda: server.stderr().count("caches cleared (SIGHUP)") >= len(workers),
        5,
        "every worker to clear its caches",
    )
    assert _children(server.pid) == workers
    with _connect(server.address) as sock:
        assert b"Max-size" in fcgi_get(sock, f"FIF={demo.STARS}&obj=Max-size")
    server.signal(signal.SIGTERM)
    assert server.wait() == 0


def test_fcgi_idle_kept_connection_does_not_block_others(
    spawn: Callable[..., Server], demo_dir: Path
) -> None:
    env = _base_env(FILESYSTEM_PREFIX=f"{demo_dir}/")
    server = spawn(["fcgi", "--bind", "127.0.0.1:0", "--workers", "1"], env).start(workers=1)
    with _connect(server.address) as idle:
        fcgi_get(idle, f"FIF={demo.STARS}&obj=Max-size", keep=True)
        # The only worker holds `idle`; a new connection must still be served promptly.
        started = time.monotonic()
        with _connect(server.address) as other:
            assert b"Max-size" in fcgi_get(other, f"FIF={demo.STARS}&obj=Max-size")
        assert time.monotonic() - started < 2


def test_fcgi_unix_socket(spawn: Callable[..., Server], demo_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "iip.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # a leftover socket file nobody listens on
    stale.close()
    env = _base_env(FILESYSTEM_PREFIX=f"{demo_dir}/")
    server = spawn(
        ["fcgi", "--bind", f"unix:{path}", "--workers", "1", "--socket-mode", "0600"], env
    )
    server.start(workers=1)
    assert f"fastcgi://unix:{path}," in server.banner
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with _connect(f"unix:{path}") as sock:
        assert b"Max-size:2048 2048" in fcgi_get(sock, f"FIF={demo.STARS}&obj=Max-size")
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert not path.exists()


def test_fcgi_refuses_to_replace_a_file(spawn: Callable[..., Server], tmp_path: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("keep me")
    server = spawn(["fcgi", "--bind", f"unix:{path}"])
    assert server.launch().wait(STOP_TIMEOUT) == 1
    assert "not a socket" in server.stderr()
    assert path.read_text() == "keep me"


def test_fcgi_max_requests_replaces_the_worker(
    spawn: Callable[..., Server], demo_dir: Path
) -> None:
    env = _base_env(FILESYSTEM_PREFIX=f"{demo_dir}/")
    args = ["fcgi", "--bind", "127.0.0.1:0", "--workers", "1", "--max-requests", "2"]
    server = spawn(args, env).start(workers=1)
    (first,) = _children(server.pid)
    for _ in range(2):
        with _connect(server.address) as sock:
            fcgi_get(sock, f"FIF={demo.STARS}&obj=Max-size")
    _wait_for(lambda: _children(server.pid) - {first}, 5, "the retired worker's replacement")
    with _connect(server.address) as sock:
        assert b"Max-size" in fcgi_get(sock, f"FIF={demo.STARS}&obj=Max-size")


def test_fcgi_inherited_socket(spawn: Callable[..., Server], demo_dir: Path) -> None:
    """As spawn-fcgi or mod_fcgid start it: no --bind, the listening socket on descriptor 0."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        server = spawn(["fcgi", "--workers", "1"], _base_env(FILESYSTEM_PREFIX=f"{demo_dir}/"))
        server.stdin = listening.fileno()
        server.start(workers=1)
    assert f"fastcgi://fd 0 (127.0.0.1:{port})," in server.banner
    with _connect(f"127.0.0.1:{port}") as sock:
        assert b"Max-size:2048 2048" in fcgi_get(sock, f"FIF={demo.STARS}&obj=Max-size")
    server.signal(signal.SIGTERM)
    assert server.wait() == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fcgi"], "descriptor 0 is not a listening socket"),
        (["fcgi", "--bind", "localhost"], "expected HOST:PORT or unix:PATH"),
        (["serve", "--port", "70000"], "expected a TCP port"),
        (["fcgi", "--workers", "0"], "expected a positive integer"),
    ],
)
def test_usage_errors_exit_2(spawn: Callable[..., Server], args: list[str], message: str) -> None:
    server = spawn(args)
    assert server.launch().wait(STOP_TIMEOUT) == 2
    assert message in server.stderr()
    assert "Traceback" not in server.stderr()


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--port", "0", "--workers", "2"],
        ["fcgi", "--bind", "127.0.0.1:0", "--workers", "2"],
    ],
)
def test_workers_exit_when_the_parent_dies(
    spawn: Callable[..., Server], demo_dir: Path, args: list[str]
) -> None:
    server = spawn([*args, str(demo_dir)] if args[0] == "serve" else args).start(workers=2)
    workers = _children(server.pid)
    os.kill(server.pid, signal.SIGKILL)
    server.wait()
    for pid in workers:
        _wait_for(
            lambda pid=pid: not os.path.exists(f"/proc/{pid}/stat") or _zombie(pid), 5, "orphans"
        )


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return True


def test_no_command_means_fcgi(spawn: Callable[..., Server]) -> None:
    server = spawn(["--bind", "127.0.0.1:0", "--workers", "1"]).start(workers=1)
    assert "FastCGI server on fastcgi://127.0.0.1:" in server.banner
    assert server.banner.endswith("1 worker")
    server.signal(signal.SIGINT)
    assert server.wait() == 0


# -- in-process units -----------------------------------------------------------------------


def test_dispatcher_routes_by_path() -> None:
    def app(name: str) -> Callable[..., list[bytes]]:
        return lambda environ, start_response: [name.encode()]

    dispatch = Dispatcher(app("iip"), app("site"))
    routes = {
        "/fcgi-bin/iipsrv.fcgi": b"iip",
        "/iipsrv": b"iip",
        "/iip": b"iip",
        "/api": b"iip",
        "/iip/": b"iip",
        "/iiif/a.tif/info.json": b"iip",
        "/": b"site",
        "/images": b"site",
        "/iipx": b"site",
        "/static/viewer.js": b"site",
    }
    for path, expected in routes.items():
        assert list(dispatch({"PATH_INFO": path}, None)) == [expected], path


def test_verbosity_levels() -> None:
    assert logs.level_for(0) > 50
    assert logs.level_for(1) == logs.NOTICE
    assert logs.level_for(2) == 20
    assert logs.level_for(3) == logs.level_for(6) == 10


def test_logfile(tmp_path: Path) -> None:
    package_logger = logging.getLogger("iipserver")
    saved = (package_logger.handlers[:], package_logger.level, package_logger.propagate)
    logfile = tmp_path / "iipserver.log"
    settings = Settings.from_environ({"LOGFILE": str(logfile), "VERBOSITY": "1"})
    logger = logs.configure_logging(settings)
    try:
        logs.log_settings(settings)
        logger.info("not at VERBOSITY=1")
        logger.warning("shown")
        text = logfile.read_text()
        assert "JPEG_QUALITY" in text and "shown" in text
        assert "not at VERBOSITY=1" not in text
        with pytest.raises(ConfigError, match="LOGFILE"):
            logs.configure_logging(settings.replace(logfile=str(tmp_path / "no" / "such.log")))
    finally:
        logs.configure_logging(Settings.from_environ({"VERBOSITY": "0"}))
        for handler in package_logger.handlers:  # leave logging as the other tests found it
            handler.close()
        package_logger.handlers[:], package_logger.level, package_logger.propagate = saved


def test_demo_files(demo_dir: Path) -> None:
    assert demo.is_complete(demo_dir)
    expected = {demo.STARS: (2048, 2048, 4), demo.RGB: (2048, 1536, 4), demo.CUBE: (1024, 1024, 3)}
    for name, (width, height, count) in expected.items():
        with tifffile.TiffFile(demo_dir / name) as tif:
            assert len(tif.series) >= 1
            pages = list(tif.pages)
            assert len(pages) == count
            for i, page in enumerate(pages):
                assert page.is_tiled and (page.tilewidth, page.tilelength) == (256, 256)
                assert page.imagewidth == width >> i and page.imagelength == height >> i
                assert int(page.subfiletype) == (1 if i else 0)
                assert page.software == ""
            assert max(pages[-1].shape[:2]) <= 256
    with tifffile.TiffFile(demo_dir / demo.STARS) as tif:
        page = tif.pages[0]
        assert page.dtype.name == "float32"
        smin, smax = page.tags[340].value, page.tags[341].value
        data = page.asarray()
        # display cuts as STIFF writes them: just below the sky to far above it
        median = float(np.median(data))
        assert float(data.min()) <= smin < median < smax <= float(data.max())
        assert (smin, smax) == tuple(v[0] for v in demo.display_range(data))
        text = page.tags[270].value  # tifffile strips the END card's trailing blanks
        cards = [text[i : i + 80] for i in range(0, len(text), 80)]
        assert cards[0].startswith("SIMPLE  =                    T")
        assert cards[1].startswith("BITPIX  =                  -32")
        assert cards[5].startswith("CTYPE1  = 'RA---TAN'")
        assert cards[6].startswith("CTYPE2  = 'DEC--TAN'")
        assert cards[-1].rstrip() == "END"
        assert all(len(card) == 80 for card in cards[:-1])
    with tifffile.TiffFile(demo_dir / demo.RGB) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.JPEG
    with tifffile.TiffFile(demo_dir / demo.CUBE) as tif:
        page = tif.pages[0]
        assert page.shape == (1024, 1024, 3) and page.dtype.name == "float32"
        assert len(page.tags[340].value) == 3 and len(page.tags[341].value) == 3


def test_fits_header_cards_are_80_columns() -> None:
    header = demo.fits_header(100, 50, ra=10.0, dec=-5.5, pixel_arcsec=1.0)
    assert len(header) % 80 == 0
    cards = [header[i : i + 80] for i in range(0, len(header), 80)]
    keywords = [card[:8].rstrip() for card in cards]
    assert keywords == [
        "SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "CTYPE1", "CTYPE2", "CRPIX1", "CRPIX2",
        "CRVAL1", "CRVAL2", "CD1_1", "CD1_2", "CD2_1", "CD2_2", "END",
    ]  # fmt: skip
    assert all(card[8:10] == "= " for card in cards[:-1])
    assert cards[3][10:30].strip() == "100" and cards[9][10:30].strip() == "10.0"


def _failing_app(environ: dict[str, object], start_response: Callable[..., object]) -> list[bytes]:
    if "boom" in str(environ.get("QUERY_STRING")):
        raise RuntimeError("secret detail")
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


def test_fcgi_worker_survives_an_application_error() -> None:
    from iipserver.fcgi import FastCGIWorker

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        worker = FastCGIWorker(_failing_app, listening, bind_address=None)
        lifeline_r, lifeline_w = os.pipe()
        wake_r, wake_w = os.pipe()
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(worker.serve(lifeline_r, wake_r)))
        thread.start()
        try:
            with _connect(address) as sock:
                out = fcgi_get(sock, "boom")
            assert out.startswith(b"Status: 500 Internal Server Error\r\n")
            assert b"secret" not in out and b"Traceback" not in out
            with _connect(address) as sock:
                assert fcgi_get(sock, "fine").endswith(b"\r\n\r\nok")
        finally:
            os.close(lifeline_w)  # end of file on the lifeline: the worker returns
            thread.join(5)
            for fd in (lifeline_r, wake_r, wake_w):
                os.close(fd)
    assert result == [0]


@pytest.fixture
def http_worker() -> Iterator[tuple[str, int]]:
    """A KeepAliveHandler server in a thread, over apps exercising the response framing."""
    from iipserver.serve import KeepAliveHandler, WorkerServer

    def streaming(environ: dict[str, object], start_response: Callable[..., object]) -> object:
        start_response("200 OK", [("Content-Type", "text/plain")])  # no Content-Length
        return iter([b"abc", b"", b"defg"])

    def app(environ: dict[str, object], start_response: Callable[..., object]) -> object:
        if environ["PATH_INFO"] == "/stream":
            return streaming(environ, start_response)
        return _failing_app(environ, start_response)

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        server = WorkerServer("127.0.0.1", port, app, KeepAliveHandler, fd=listening.fileno())
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        try:
            yield "127.0.0.1", port
        finally:
            server.shutdown()
            thread.join(5)


def test_http_worker_chunked_keep_alive_and_head(http_worker: tuple[str, int]) -> None:
    conn = http.client.HTTPConnection(*http_worker, timeout=5)
    try:
        conn.request("GET", "/stream")
        response = conn.getresponse()
        assert response.getheader("Transfer-Encoding") == "chunked"
        assert response.read() == b"abcdefg"
        sock = conn.sock
        conn.request("HEAD", "/plain")
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Content-Length") == "2"
        assert response.read() == b""
        conn.request("GET", "/plain")
        assert conn.getresponse().read() == b"ok"
        assert conn.sock is sock  # all three on one connection
    finally:
        conn.close()


def test_http_worker_survives_an_application_error(http_worker: tuple[str, int]) -> None:
    conn = http.client.HTTPConnection(*http_worker, timeout=5)
    try:
        conn.request("GET", "/x?boom")
        response = conn.getresponse()
        body = response.read()
        assert response.status == 500
        assert response.getheader("Connection") == "close"
        assert b"secret" not in body and b"Traceback" not in body
        conn.request("GET", "/x?fine")  # http.client reconnects
        assert conn.getresponse().read() == b"ok"
    finally:
        conn.close()
