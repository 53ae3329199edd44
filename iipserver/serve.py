"""Standalone HTTP server: pre-forked werkzeug workers serving IIP, IIIF and the viewer site.

The parent (:class:`iipserver.prefork.Supervisor`) binds one socket and forks the workers; each
runs a threaded werkzeug server on that socket. werkzeug's own request handler closes every
connection after one response, so :class:`KeepAliveHandler` replaces its ``run_wsgi`` with one
that keeps HTTP/1.1 connections open when that is safe (no request body, response length known
or chunked). Requests to the IIP paths go straight to the IIP WSGI application; everything
else goes to the small Flask site (:mod:`iipserver.site`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

from iipserver import __version__, client, demo, prefork
from iipserver.app import make_app
from iipserver.errors import ConfigError
from iipserver.logs import banner, log_settings
from iipserver.settings import Settings
from iipserver.site import create_site
from iipserver.sources import fits

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("iipserver.http")

#: Paths answered by the IIP application (policy §4), besides ``/iiif/…``.
IIP_PATHS = frozenset({"/fcgi-bin/iipsrv.fcgi", "/iipsrv", "/iip", "/api"})
IIIF_PREFIX = "/iiif/"
#: URI_MAP used when the environment sets none, so that ``/iiif/{id}/…`` works out of the box.
DEFAULT_URI_MAP = "iiif=>IIIF"
#: Seconds an idle kept-alive connection (or a slow client) may hold a thread.
KEEP_ALIVE_TIMEOUT = 15.0
#: Seconds a stopping worker waits for requests in progress.
STOP_GRACE = 8.0

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@dataclass(frozen=True)
class Options:
    """Command-line options of ``iipserver serve``."""

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    data_dir: str | None = None
    """Directory of images; None serves the generated demo set."""
    backlog: int = socket.SOMAXCONN


class Dispatcher:
    """Route IIP/IIIF paths to the IIP application and everything else to the site."""

    def __init__(self, iip: WSGIApp, site: WSGIApp) -> None:
        self.iip = iip
        self.site = site

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        """Pass the request to the IIP application or to the site, by path."""
        path = environ.get("PATH_INFO") or "/"
        if path in IIP_PATHS or path.startswith(IIIF_PREFIX) or path.rstrip("/") in IIP_PATHS:
            return self.iip(environ, start_response)
        return self.site(environ, start_response)


class WorkerServer(ThreadedWSGIServer):
    """werkzeug's threaded server, counting requests in progress for a graceful stop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stopping = False
        self._active = 0
        self._idle = threading.Condition()

    @contextlib.contextmanager
    def tracking(self) -> Iterator[None]:
        """Count the enclosed block as a request in progress."""
        with self._idle:
            self._active += 1
        try:
            yield
        finally:
            with self._idle:
                self._active -= 1
                if not self._active:
                    self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in progress; False if ``timeout`` ran out first."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._active, timeout)


class _Response:
    """The WSGI ``start_response``/``write`` pair of one request on a kept-alive connection.

    The header block goes out with the first body bytes. A response without Content-Length is
    sent chunked, or delimited by closing the connection when it will not be kept alive.
    """

    def __init__(self, handler: KeepAliveHandler, *, head: bool) -> None:
        self.handler = handler
        self.head = head
        self.status = ""
        self.headers: list[tuple[str, str]] = []
        self.started = False
        self.chunked = False

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        """WSGI ``start_response``."""
        if exc_info:
            try:
                if self.started:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status:
            raise AssertionError("start_response called twice without exc_info")
        self.status, self.headers = status, list(headers)
        return self.write

    def _send_headers(self) -> None:
        if not self.status:
            raise AssertionError("the application wrote before calling start_response")
        handler = self.handler
        code = int(self.status[:3])
        names = {name.lower() for name, _ in self.headers}
        handler.send_response_only(code, self.status[4:])
        for name, value in self.headers:
            handler.send_header(name, value)
        if "date" not in names:
            handler.send_header("Date", handler.date_time_string())
        if "server" not in names:
            handler.send_header("Server", handler.version_string())
        unframed = "content-length" not in names and not self.head and code >= 200
        self.chunked = unframed and code not in (204, 304) and not handler.close_connection
        if self.chunked:
            handler.send_header("Transfer-Encoding", "chunked")
        if handler.close_connection:
            handler.send_header("Connection", "close")
        handler.end_headers()
        self.started = True
        handler.log_request(code)

    def write(self, data: bytes) -> None:
        """Send body bytes (the header block first, if not sent yet)."""
        if not self.started:
            self._send_headers()
        if self.head or not data:
            return
        if self.chunked:
            self.handler.wfile.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.handler.wfile.write(data)

    def finish(self) -> None:
        """End the response: send the header block of an empty body, or the last chunk."""
        if not self.started:
            self._send_headers()
        if self.chunked:
            self.handler.wfile.write(b"0\r\n\r\n")


class KeepAliveHandler(WSGIRequestHandler):
    """werkzeug's request handler with HTTP/1.1 keep-alive (werkzeug always closes)."""

    protocol_version = "HTTP/1.1"
    timeout = KEEP_ALIVE_TIMEOUT
    disable_nagle_algorithm = True
    server: WorkerServer

    def _keep_alive_allowed(self) -> bool:
        if self.request_version != "HTTP/1.1" or self.close_connection or self.server.stopping:
            return False
        # Unread body bytes would be taken for the next request: only body-less requests.
        length = self.headers.get("Content-Length", "0").strip()
        return length in ("", "0") and "Transfer-Encoding" not in self.headers

    def run_wsgi(self) -> None:
        """Run the application for one request and send its response."""
        if self.headers.get("Expect", "").lower().strip() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        environ = self.environ = self.make_environ()
        if not self._keep_alive_allowed():
            self.close_connection = True
        response = _Response(self, head=environ["REQUEST_METHOD"] == "HEAD")
        with self.server.tracking():
            try:
                result = self.server.app(environ, response.start_response)
                try:
                    for data in result:
                        response.write(data)
                    response.finish()
                finally:
                    close = getattr(result, "close", None)
                    if close is not None:
                        close()
            except (ConnectionError, TimeoutError) as exc:
                self.close_connection = True
                access_logger.info("%s: connection dropped: %s", self.address_string(), exc)
            except Exception:
                self.close_connection = True
                logger.exception("error on request %r", self.requestline)
                if not response.started:
                    self._internal_error()

    def _internal_error(self) -> None:
        body = b"Internal Server Error\n"
        with contextlib.suppress(OSError):
            self.send_response_only(500)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.log_request(500)

    # Logging goes to our loggers, not werkzeug's coloured stderr handler.

    def version_string(self) -> str:
        """The Server header of responses that do not set one (the site's)."""
        return f"iipserver/{__version__}"

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Access log line at DEBUG (VERBOSITY ≥ 3; the IIP application logs its own requests
        at INFO)."""
        if access_logger.isEnabledFor(logging.DEBUG):
            access_logger.debug('%s "%s" %s', self.address_string(), self.requestline, code)

    def log_error(self, format: str, *args: Any) -> None:
        """Protocol errors (bad request line, timeouts) at INFO: the client's fault."""
        access_logger.info("%s: " + format, self.address_string(), *args)

    def log_message(self, format: str, *args: Any) -> None:
        """Other messages of http.server at DEBUG."""
        access_logger.debug("%s: " + format, self.address_string(), *args)


class _Control:
    """Flags set by the worker's signal handlers, acted upon by a control thread."""

    def __init__(self) -> None:
        self.stop = False
        self.hup = False

    def request_stop(self) -> None:
        self.stop = True

    def request_hup(self) -> None:
        self.hup = True


def _control_loop(
    control: _Control, server: WorkerServer, app: Any, wake: int, lifeline: int
) -> None:
    while True:
        ready, _, _ = select.select([wake, lifeline], [], [])
        if wake in ready:
            prefork.drain(wake)
        if lifeline in ready:
            control.stop = True  # the parent closed it or died
        if control.hup:
            control.hup = False
            prefork.clear_caches(app)
        if control.stop:
            server.stopping = True
            server.shutdown()  # returns once serve_forever has stopped accepting
            return


def serve_worker(listen_sock: socket.socket, host: str, settings: Settings, lifeline: int) -> int:
    """Body of one worker process: serve HTTP on the inherited socket until told to stop."""
    iip = make_app(settings)
    viewer = client.client_dir()
    app = Dispatcher(
        iip, create_site(settings.filesystem_prefix, viewer if client.installed(viewer) else None)
    )
    port = int(listen_sock.getsockname()[1])
    server = WorkerServer(host, port, app, KeepAliveHandler, fd=listen_sock.fileno())
    # Workers race to accept: the losers must get EAGAIN, not block in accept().
    server.socket.setblocking(False)
    control = _Control()
    wake = prefork.worker_signals(control.request_stop, control.request_hup)
    thread = threading.Thread(
        target=_control_loop,
        args=(control, server, iip, wake, lifeline),
        name="control",
        daemon=True,
    )
    thread.start()
    server.serve_forever(poll_interval=0.5)
    if not server.wait_idle(STOP_GRACE):
        logger.warning("worker %d: requests still running after %.0f s", os.getpid(), STOP_GRACE)
    return 0


def data_root(data_dir: str | None) -> str:
    """The directory to serve: ``data_dir`` (checked) or the demo set, generated if needed.

    Raises:
        ConfigError: ``data_dir`` is not a directory.
    """
    if data_dir is None:
        return str(demo.ensure())
    path = os.path.abspath(data_dir)
    if not os.path.isdir(path):
        raise ConfigError(f"DATA_DIR {data_dir!r} is not a directory")
    return path


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def run(settings: Settings, options: Options) -> int:
    """Bind, print the banner, fork the workers and supervise them until SIGTERM/SIGINT.

    Raises:
        ConfigError: bad DATA_DIR, or the application rejects the settings.
        OSError: the address cannot be bound.
    """
    root = data_root(options.data_dir)
    settings = settings.replace(
        filesystem_prefix=os.path.join(root, ""), uri_map=settings.uri_map or DEFAULT_URI_MAP
    )
    make_app(settings)  # fail here, once, rather than in every worker
    fits.preload()  # astropy imported once, before the fork, not by each first FITS request
    if os.environ.get("IIPSERVER_CLIENT_FETCH", "1") != "0":
        client.ensure()  # the VisiOmatic client, downloaded once from PyPI and npm
    listener = prefork.listen((options.host, options.port), options.backlog)
    try:
        assert not isinstance(listener.address, str)
        url = _url(options.host, listener.address[1])
        print(banner("HTTP", url, settings, options.workers), flush=True)
        log_settings(settings, "HTTP server")

        def worker_main(lifeline: int) -> int:
            return serve_worker(listener.sock, options.host, settings, lifeline)

        started = time.monotonic()
        status = prefork.Supervisor(worker_main, options.workers).run()
        logger.info("HTTP server stopped after %.0f s", time.monotonic() - started)
    finally:
        listener.close()
    return status
