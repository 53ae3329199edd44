"""A real nginx with the shipped site (nginx/iipserver.conf) in front of the FastCGI daemon.

The site file is loaded as written; only its listen port and upstream address are substituted,
so these tests exercise the configuration users install. The same file is run in front of
``python -m iipserver fcgi`` (Unix socket) and in front of Debian's iipsrv 1.1 (TCP), to show
that swapping the daemon only means changing the upstream address. The standalone HTTP mode
(``python -m iipserver serve``) is checked for the same answers without nginx.

nginx runs unprivileged-friendly: its pid file, logs and temporary directories live in the
test's temporary folder. Without nginx the nginx tests skip (scripts/test.sh installs it).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from images import pyramid_levels, rgb_image, write_pyramid
from nginx_site import NGINX, main_config, site_config

REPO = Path(__file__).resolve().parent.parent
IIPSRV = os.environ.get("IIPSRV_BINARY", "/usr/lib/iipimage-server/iipsrv.fcgi")

#: The socket the site file points at, replaced by the test's own address.

IIP_PATHS = ["/fcgi-bin/iipsrv.fcgi", "/iipsrv", "/iip", "/api"]
OBJ_QUERY = "FIF=rgb.tif&obj=IIP,1.0&obj=Max-size&obj=Resolution-number"
OBJ_BODY = b"IIP:1.0\r\nMax-size:1000 750\r\nResolution-number:3\r\n"
#: Largest difference allowed between a decoded JPEG tile and the pixels it was made from.
JPEG_TOLERANCE = 4


# --------------------------------------------------------------------------------------------
# Helpers


@dataclass
class HTTPResponse:
    """Status, headers (in order, as received) and body of one HTTP exchange."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        assert len(values) <= 1, f"duplicate {name} headers: {self.headers}"
        return values[0] if values else None


def fetch(
    port: int,
    target: str,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 15.0,
    context: ssl.SSLContext | None = None,
) -> HTTPResponse:
    """GET ``target`` from 127.0.0.1:``port`` (HTTPS when ``context`` is given)."""
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    else:
        conn = http.client.HTTPSConnection("localhost", port, timeout=timeout, context=context)
    try:
        conn.request("GET", target, headers=headers or {})
        resp = conn.getresponse()
        return HTTPResponse(resp.status, resp.getheaders(), resp.read())
    finally:
        conn.close()


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def short_tempdir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A temporary folder whose paths fit in a Unix socket address (108 bytes)."""
    path = tmp_path_factory.mktemp(name)
    if len(str(path)) > 80:
        path = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    return path


def connectable(address: str) -> bool:
    """True if a stream connection to ``host:port`` or ``unix:/path`` succeeds."""
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: str | tuple[str, int] = address[5:]
    else:
        host, _, port = address.rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = (host, int(port))
    sock.settimeout(0.5)
    try:
        sock.connect(target)
        return True
    except OSError:
        return False
    finally:
        sock.close()


class Process:
    """A background process in its own session, logged to a file, killed with its group."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], cwd: Path) -> None:
        self.name = name
        self.argv = argv
        self.log = cwd / f"{name}.out"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def tail(self, extra: Path | None = None) -> str:
        text = ""
        for path in (self.log, extra):
            if path is not None and path.exists():
                text += f"--- {path.name}\n" + path.read_bytes()[-3000:].decode("utf-8", "replace")
        return text

    def wait_ready(self, address: str, timeout: float = 30.0, log: Path | None = None) -> None:
        """Wait until ``address`` accepts connections; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        while not connectable(address):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with status {self.proc.returncode} at start-up "
                    f"({' '.join(self.argv)}):\n{self.tail(log)}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} not ready on {address}:\n{self.tail(log)}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left (forked workers too)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def clean_env(**settings: str) -> dict[str, str]:
    """The test process's basic environment (no stray server settings) plus ``settings``."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k in keep or k.startswith("PYENV")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(OMP_NUM_THREADS="1", TZ="UTC")
    env.update(settings)
    return env


# --------------------------------------------------------------------------------------------
# The site file, adapted to a test run


class Nginx:
    """nginx with a generated top-level nginx.conf around a site file, all under ``workdir``."""

    def __init__(self, workdir: Path, site: str, port: int) -> None:
        self.workdir = workdir
        self.port = port
        (workdir / "site.conf").write_text(site)
        d = workdir
        (workdir / "nginx.conf").write_text(main_config(workdir))
        base = [NGINX, "-p", f"{d}/", "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")]
        check = subprocess.run([*base, "-t", "-q"], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t rejected the configuration:\n{check.stderr}\n{site}")
        self.process = Process("nginx", base, env=clean_env(), cwd=workdir)
        self.process.wait_ready(f"127.0.0.1:{port}", log=d / "error.log")

    def stop(self) -> None:
        self.process.stop()

    def error_log(self) -> str:
        path = self.workdir / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding rgb.tif: the 1000x750 conformance pattern, 3 levels, uncompressed."""
    root = tmp_path_factory.mktemp("nginx-images")
    write_pyramid(root / "rgb.tif", pyramid_levels(rgb_image()), photometric="rgb")
    return root


@pytest.fixture(scope="module")
def rgb_levels() -> list[np.ndarray]:
    """rgb.tif's levels, smallest first (index = IIP resolution number)."""
    return pyramid_levels(rgb_image())[::-1]


def start_iipserver(image_dir: Path, workdir: Path) -> tuple[Process, str]:
    address = f"unix:{workdir}/iipserver.sock"
    env = clean_env(
        FILESYSTEM_PREFIX=f"{image_dir}/",
        URI_MAP="iiif=>IIIF",
        VERBOSITY="1",
        LOGFILE=str(workdir / "iipserver.log"),
    )
    argv = [sys.executable, "-m", "iipserver", "fcgi", "--bind", address, "--workers", "2"]
    daemon = Process("iipserver", argv, env=env, cwd=workdir)
    daemon.wait_ready(address, log=workdir / "iipserver.log")
    return daemon, address


def start_iipsrv(image_dir: Path, workdir: Path) -> tuple[Process, str]:
    if not (os.path.isfile(IIPSRV) and os.access(IIPSRV, os.X_OK)):
        pytest.skip(f"Debian's iipsrv is not installed ({IIPSRV}; apt-get install iipimage-server)")
    address = f"127.0.0.1:{free_port()}"
    env = clean_env(
        FILESYSTEM_PREFIX=f"{image_dir}/",
        URI_MAP="iiif=>IIIF",
        VERBOSITY="1",
        LOGFILE=str(workdir / "iipsrv.log"),
    )
    daemon = Process("iipsrv", [IIPSRV, "--bind", address], env=env, cwd=workdir)
    daemon.wait_ready(address, log=workdir / "iipsrv.log")
    return daemon, address


BACKENDS: dict[str, Callable[[Path, Path], tuple[Process, str]]] = {
    "iipserver": start_iipserver,
    "iipsrv": start_iipsrv,
}


@dataclass
class Stack:
    """nginx (with the shipped site) in front of one FastCGI daemon."""

    backend: str
    upstream: str
    nginx: Nginx
    daemon: Process
    workdir: Path

    @property
    def port(self) -> int:
        return self.nginx.port

    def get(self, target: str, timeout: float = 15.0) -> HTTPResponse:
        return fetch(self.port, target, timeout=timeout)


@pytest.fixture(
    scope="module",
    params=["iipserver", pytest.param("iipsrv", marks=pytest.mark.reference)],
)
def stack(
    request: pytest.FixtureRequest, image_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """nginx on a free port in front of iipserver (Unix socket) or iipsrv 1.1 (TCP)."""
    if not NGINX:
        pytest.skip("nginx is not installed (apt-get install nginx-light; scripts/test.sh does)")
    backend = request.param
    workdir = short_tempdir(tmp_path_factory, f"ngx-{backend}")
    daemon, upstream = BACKENDS[backend](image_dir, workdir)
    try:
        port = free_port()
        (workdir / "nginx").mkdir()
        nginx = Nginx(workdir / "nginx", site_config(port, upstream), port)
    except BaseException:
        daemon.stop()
        raise
    try:
        yield Stack(backend, upstream, nginx, daemon, workdir)
    finally:
        nginx.stop()
        daemon.stop()


# --------------------------------------------------------------------------------------------
# Checks shared by the nginx and standalone tests


def check_obj(resp: HTTPResponse, *, policy_headers: bool) -> None:
    """The OBJ answer: exact body, IIP media type, the daemon's Server header.

    ``policy_headers``: also require a correct Content-Length (policy §2; iipsrv 1.1 streams
    OBJ bodies without one).
    """
    assert resp.status == 200, resp
    assert resp.body == OBJ_BODY
    assert resp.header("Content-Type") == "application/vnd.netfpx"
    server = resp.header("Server")
    assert server and not server.startswith("nginx"), f"daemon's Server header lost: {server!r}"
    if policy_headers:
        assert resp.header("Content-Length") == str(len(resp.body))


def check_tile(resp: HTTPResponse, expected: np.ndarray) -> None:
    """A JPEG tile: headers, size, and decoded pixels within JPEG_TOLERANCE of ``expected``."""
    assert resp.status == 200, resp
    assert resp.header("Content-Type") == "image/jpeg"
    assert resp.header("Content-Length") == str(len(resp.body))
    assert resp.header("Server")
    pixels = simplejpeg.decode_jpeg(resp.body, colorspace="RGB")
    assert pixels.shape == expected.shape
    # A few points spread over the tile, away from its edges (JPEG blocks ring there).
    h, w = expected.shape[:2]
    for y in np.linspace(4, h - 5, 5).astype(int):
        for x in np.linspace(4, w - 5, 5).astype(int):
            got, want = pixels[y, x].astype(int), expected[y, x].astype(int)
            assert np.abs(got - want).max() <= JPEG_TOLERANCE, f"pixel ({x},{y}): {got} vs {want}"
    mean_error = np.abs(pixels.astype(float) - expected.astype(float)).mean()
    assert mean_error < 1.5, f"mean error {mean_error:.2f}"


def tile_pixels(levels: list[np.ndarray], resolution: int, tile: int) -> np.ndarray:
    """The pixels of 256x256 tile ``tile`` (row-major) at IIP ``resolution``."""
    level = levels[resolution]
    ntx = -(-level.shape[1] // 256)
    ty, tx = divmod(tile, ntx)
    return level[ty * 256 : (ty + 1) * 256, tx * 256 : (tx + 1) * 256]


# --------------------------------------------------------------------------------------------
# nginx + FastCGI daemon


@pytest.mark.parametrize("path", IIP_PATHS)
def test_obj_on_every_iip_path(stack: Stack, path: str) -> None:
    resp = stack.get(f"{path}?{OBJ_QUERY}")
    check_obj(resp, policy_headers=stack.backend == "iipserver")


@pytest.mark.parametrize(
    "resolution, tile",
    [(2, 0), (2, 5), (2, 11), (1, 3), (0, 0)],
    ids=["full-first", "full-inner", "full-corner", "half-edge", "whole-small"],
)
def test_jtl_tile(stack: Stack, rgb_levels: list[np.ndarray], resolution: int, tile: int) -> None:
    resp = stack.get(f"/fcgi-bin/iipsrv.fcgi?FIF=rgb.tif&JTL={resolution},{tile}")
    check_tile(resp, tile_pixels(rgb_levels, resolution, tile))


def test_missing_image_is_404(stack: Stack, image_dir: Path) -> None:
    resp = stack.get("/iip?FIF=missing.tif&JTL=0,0")
    assert resp.status == 404
    assert b"missing.tif" in resp.body
    if stack.backend == "iipserver":  # policy §2: a Content-Type, and no server path
        assert resp.header("Content-Type")
        assert str(image_dir).encode() not in resp.body


def test_unknown_command_is_400_iip_error(stack: Stack) -> None:
    resp = stack.get("/iip?FIF=rgb.tif&FOO=1")
    assert resp.status == 400
    assert resp.body == b"Error/7:2 2 FOO\r\n"
    assert resp.header("Content-Type") == "application/vnd.netfpx"
    assert resp.header("Server")


def test_iiif_path_style(stack: Stack) -> None:
    """/iiif/… reaches the daemon with its REQUEST_URI, which URI_MAP turns into IIIF."""
    resp = stack.get("/iiif/rgb.tif/info.json")
    if stack.backend == "iipserver" and resp.status == 501:
        pytest.skip(f"IIIF is not implemented by the daemon yet: {resp.body[:80]!r}")
    assert resp.status == 200, resp
    assert (resp.header("Content-Type") or "").startswith("application/ld+json")
    info = json.loads(resp.body)
    assert (info["width"], info["height"]) == (1000, 750)
    ident = info.get("id", info.get("@id", ""))
    assert ident.endswith("/iiif/rgb.tif"), ident


def test_other_paths_are_not_forwarded(stack: Stack) -> None:
    for target in ("/", "/iip/", "/fcgi-bin/other.fcgi?FIF=rgb.tif&obj=IIP,1.0"):
        resp = stack.get(target)
        assert resp.status == 404, target
        assert resp.header("Server") == "nginx", target  # nginx answered, with server_tokens off


def test_no_stalls_under_concurrent_requests(stack: Stack) -> None:
    """Many short requests through both nginx workers complete promptly.

    Guards the connection settings: with `fastcgi_keep_conn on`, an idle kept connection
    blocks a daemon that serves one connection at a time (iipsrv) for up to 30 s.
    """
    targets = [f"/iip?FIF=rgb.tif&JTL=1,{i % 4}" for i in range(48)]
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda t: stack.get(t, timeout=5.0).status, targets))
    for target in targets[:6]:  # sequential, one new client connection each
        statuses.append(stack.get(target, timeout=5.0).status)
    elapsed = time.monotonic() - started
    errors = [line for line in stack.nginx.error_log().splitlines() if "[error]" in line]
    assert statuses == [200] * len(statuses), "\n".join(errors)
    assert elapsed < 10, "\n".join(errors)
    assert not errors


def test_tls_and_http2_lines_of_the_site(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The commented HTTPS/HTTP2 lines work once uncommented (ALPN offers h2)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed (needed to make a test certificate)")
    workdir = short_tempdir(tmp_path_factory, f"tls-{stack.backend}")
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    port, tls_port = free_port(), free_port()
    (workdir / "nginx").mkdir()
    nginx = Nginx(
        workdir / "nginx", site_config(port, stack.upstream, tls=(tls_port, cert, key)), port
    )
    try:
        context = ssl.create_default_context(cafile=str(cert))
        context.set_alpn_protocols(["h2", "http/1.1"])
        with (
            socket.create_connection(("127.0.0.1", tls_port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert tls.selected_alpn_protocol() == "h2"
        context = ssl.create_default_context(cafile=str(cert))
        resp = fetch(tls_port, f"/iip?{OBJ_QUERY}", context=context)
        check_obj(resp, policy_headers=stack.backend == "iipserver")
        check_obj(fetch(port, f"/iip?{OBJ_QUERY}"), policy_headers=stack.backend == "iipserver")
    finally:
        nginx.stop()


# --------------------------------------------------------------------------------------------
# Standalone HTTP server (no nginx)


@pytest.fixture(scope="module")
def standalone(image_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """``python -m iipserver serve --host 127.0.0.1 --port P DATA_DIR``; yields the port."""
    workdir = tmp_path_factory.mktemp("serve")
    port = free_port()
    argv = [sys.executable, "-m", "iipserver", "serve", "--host", "127.0.0.1", "--port", str(port),
            str(image_dir)]  # fmt: skip
    env = clean_env(VERBOSITY="1", LOGFILE=str(workdir / "iipserver.log"))
    server = Process("serve", argv, env=env, cwd=workdir)
    try:
        server.wait_ready(f"127.0.0.1:{port}", log=workdir / "iipserver.log")
        yield port
    finally:
        server.stop()


@pytest.mark.parametrize("path", ["/fcgi-bin/iipsrv.fcgi", "/iip"])
def test_standalone_obj(standalone: int, path: str) -> None:
    check_obj(fetch(standalone, f"{path}?{OBJ_QUERY}"), policy_headers=True)


def test_standalone_tile(standalone: int, rgb_levels: list[np.ndarray]) -> None:
    resp = fetch(standalone, "/iip?FIF=rgb.tif&JTL=2,5")
    check_tile(resp, tile_pixels(rgb_levels, 2, 5))
