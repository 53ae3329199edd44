"""FastCGI daemon: a fixed pool of pre-forked workers.

Each worker speaks FastCGI with one of two engines: :mod:`iipserver.fastcgi` (the default, our
own lean responder) or flup, kept as ``--engine flup`` for comparison and as a fallback.

With flup, ``flup.server.fcgi_fork.WSGIServer`` provides the FastCGI record layer, the
WSGI adaptor and its non-debug error page. Its ``PreforkServer`` parent loop is not used: on
Python ≥ 3.5 it does not notice ``SIGTERM`` until the next request arrives (its ``select`` is
retried after the signal handler returns, PEP 475), and its ``SIGHUP`` handling tears the pool
down and re-binds the listening socket, refusing connections meanwhile. The parent here is
:class:`iipserver.prefork.Supervisor`; each worker runs :meth:`FastCGIWorker.serve`, a small
accept loop around flup's ``Connection``.

Within a worker, signals only set flags (the worker is single-threaded and a handler could
interrupt the application anywhere). Caches are emptied at the next safe point: right away
when the worker is waiting, or just after the request in progress.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from flup.server.fcgi_base import FCGI_STDERR, FCGI_STDOUT, Connection, FCGI_Header, Record
from flup.server.fcgi_fork import WSGIServer

from iipserver import fastcgi, prefork
from iipserver.app import make_app
from iipserver.errors import ConfigError
from iipserver.logs import banner, log_settings
from iipserver.settings import Settings
from iipserver.sources import fits

logger = logging.getLogger(__name__)

#: A kept-alive connection (``FCGI_KEEP_CONN``, nginx ``fastcgi_keep_conn on``) with no request
#: in progress is closed after this many idle seconds, or as soon as another connection waits to
#: be accepted: a worker serves one connection at a time, so an idle one must not hold it.
IDLE_LIMIT = 60.0
#: Seconds a connection may take to deliver a whole request, or to take a response.
IO_TIMEOUT = 30.0
#: How long a waiting connection is given to be picked up by an idle worker before a worker
#: holding an idle kept-alive connection lets go of it.
YIELD_DELAY = 0.005

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

_ERROR_BODY = b"Internal Server Error\n"
_ERROR_RESPONSE = (
    b"Status: 500 Internal Server Error\r\nContent-Type: text/plain\r\n"
    b"Content-Length: " + str(len(_ERROR_BODY)).encode() + b"\r\n\r\n" + _ERROR_BODY
)


@dataclass(frozen=True)
class Options:
    """Command-line options of ``iipserver fcgi``."""

    bind: tuple[str, int] | str | None
    """``(host, port)``, a Unix socket path, or None for a listening socket on file descriptor 0."""
    workers: int
    socket_mode: int = 0o660
    max_requests: int = 0
    """Requests a worker serves before it is replaced (0: no limit)."""
    backlog: int = socket.SOMAXCONN
    engine: str = "iipserver"
    """``iipserver`` (:mod:`iipserver.fastcgi`) or ``flup``."""


#: Queued response bytes sent before the response ends (a large CVT goes out in pieces).
FLUSH_BYTES = 256 * 1024


class _Connection(Connection):
    """flup's connection with idle and stall limits, and yielding to waiting connections."""

    def __init__(self, sock: socket.socket, addr: Any, server: FastCGIWorker) -> None:
        super().__init__(sock, addr, server, None)
        self.worker = server
        self.linger = True  # wait for the peer to close after our last response
        self.started = False  # a fresh connection is never idle: its request may still be coming
        self._pending: list[bytes] = []
        self._pending_size = 0

    def writeRecord(self, rec: Any) -> None:  # noqa: N802 - flup's name
        """Queue a record; send the queue in one write at the end of a response (flup sends
        header, content and padding of every record separately: ~9 syscalls per tile)."""
        padding = -rec.contentLength & 7
        self._pending.append(
            struct.pack(
                FCGI_Header, rec.version, rec.type, rec.requestId, rec.contentLength, padding
            )
        )
        if rec.contentLength:
            self._pending.append(bytes(rec.contentData))
        if padding:
            self._pending.append(b"\x00" * padding)
        self._pending_size += 8 + rec.contentLength + padding
        if rec.type not in (FCGI_STDOUT, FCGI_STDERR) or self._pending_size >= FLUSH_BYTES:
            data = b"".join(self._pending)
            self._pending.clear()
            self._pending_size = 0
            Record._sendall(self._sock, data)

    def process_input(self) -> None:
        """Wait for the next record, or end an idle connection; then let flup read it."""
        since = time.monotonic()
        worker = self.worker
        while self._keepGoing:
            idle = self.started and not self._requests
            watch = [self._sock, worker.wake]
            if idle:
                watch.append(worker.listen_sock)
            ready, _, _ = select.select(watch, [], [], 1.0)
            if self._sock in ready:
                break
            if worker.wake in ready:
                prefork.drain(worker.wake)
            if idle:
                worker.apply_hup()
                if (
                    worker.stopping
                    or time.monotonic() - since > IDLE_LIMIT
                    or (worker.listen_sock in ready and worker.connection_waiting())
                ):
                    self.linger = False  # nothing unread: close at once
                    raise EOFError
            elif time.monotonic() - since > IO_TIMEOUT:
                self.linger = False
                raise EOFError  # a request that never completes
        if self._keepGoing:
            self.started = True
            super().process_input()

    def _cleanupSocket(self) -> None:  # noqa: N802 - flup's name
        """Half-close, give the peer a moment to close too, then close (flup waits forever)."""
        if not self.linger:
            self._sock.close()
            return
        try:
            self._sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 1.0
            while (remaining := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([self._sock], [], [], remaining)
                if not ready or not self._sock.recv(4096):
                    break
        except OSError:
            pass
        self._sock.close()


class FastCGIWorker(prefork.WorkerFlags, WSGIServer):
    """One worker process: flup's FastCGI/WSGI handling on the shared listening socket.

    Args:
        app: the IIP WSGI application (``clear_caches()`` is called on ``SIGHUP``).
        listen_sock: the listening socket inherited from the parent.
        bind_address: what flup calls ``bindAddress`` (None for a socket on descriptor 0).
        max_requests: requests to serve before exiting so the parent starts a fresh worker.
    """

    def __init__(
        self,
        app: Any,
        listen_sock: socket.socket,
        *,
        bind_address: tuple[str, int] | str | None,
        max_requests: int = 0,
    ) -> None:
        WSGIServer.__init__(
            self, app, bindAddress=bind_address, debug=False, minSpare=1, maxSpare=1, maxChildren=1
        )
        addrs = os.environ.get("FCGI_WEB_SERVER_ADDRS")
        self._web_server_addrs = None if addrs is None else [a.strip() for a in addrs.split(",")]
        prefork.WorkerFlags.__init__(self, app)
        self.listen_sock = listen_sock
        self.max_requests = max_requests
        self.served = 0
        self.wake = -1

    # -- flup hooks -------------------------------------------------------------------------

    def handler(self, req: Any) -> Any:
        """Run one request through flup's WSGI adaptor, then honour SIGHUP/SIGTERM/limits."""
        self.apply_hup()
        try:
            return super().handler(req)
        finally:
            self.served += 1
            self.apply_hup()
            if self.max_requests and self.served >= self.max_requests:
                self.stopping = True
            if self.stopping:
                req._conn._keepGoing = False  # close the connection once this response is out

    def error(self, req: Any) -> None:
        """The application raised: log it and answer a bare 500 (flup already wrote the trace
        to the FastCGI stderr stream, i.e. the web server's error log, never to the client)."""
        logger.error("unhandled exception in the application", exc_info=True)
        req.stdout.write(_ERROR_RESPONSE)

    # -- accept loop ------------------------------------------------------------------------

    def connection_waiting(self) -> bool:
        """True if a connection still waits to be accepted a moment from now."""
        time.sleep(YIELD_DELAY)
        ready, _, _ = select.select([self.listen_sock], [], [], 0)
        return bool(ready)

    def serve(self, lifeline: int, wake: int) -> int:
        """Accept and serve connections one at a time until stopped; return the exit status."""
        self.wake = wake
        sock = self.listen_sock
        sock.setblocking(False)
        listen_fd = sock.fileno()
        while not self.stopping:
            self.apply_hup()
            ready, _, _ = select.select([listen_fd, lifeline, wake], [], [])
            if wake in ready:
                prefork.drain(wake)
                continue
            if lifeline in ready:
                break  # the parent closed it (stop) or died
            accepted = prefork.accept(sock)
            if accepted is None:
                continue
            client, addr = accepted
            if not self._isClientAllowed(addr):
                client.close()
                continue
            client.settimeout(IO_TIMEOUT)
            if client.family in (socket.AF_INET, socket.AF_INET6):
                # flup sends a response as several small records: without this, Nagle's
                # algorithm and the peer's delayed ACK add ~40 ms to kept-alive requests.
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                _Connection(client, addr, self).run()
            except OSError as exc:
                logger.info("connection dropped: %s", exc)
                client.close()
        return 0


def inherited_listener() -> prefork.Listener:
    """The listening socket a FastCGI process manager passes on descriptor 0.

    Raises:
        OSError: descriptor 0 is not a listening socket.
    """
    sock = socket.socket(fileno=0)
    try:
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise OSError(errno.EINVAL, "descriptor 0 is a socket but not a listening one")
        name = sock.getsockname()
    except BaseException:
        sock.detach()
        raise
    address: tuple[str, int] | str = name if isinstance(name, str) else (name[0], name[1])
    return prefork.Listener(sock, address)


def run(settings: Settings, options: Options) -> int:
    """Bind, print the banner, fork the workers and supervise them until SIGTERM/SIGINT.

    Raises:
        OSError: the socket cannot be bound.
        ConfigError: no --bind and no inherited listening socket, or the application rejects
            the settings.
    """
    make_app(settings)  # fail here, once, rather than in every worker
    fits.preload()  # astropy imported once, before the fork, not by each first FITS request
    if options.bind is None:
        try:
            listener = inherited_listener()
        except OSError:
            raise ConfigError(
                "no --bind HOST:PORT or --bind unix:PATH given, and descriptor 0 is not a "
                "listening socket passed by a FastCGI process manager"
            ) from None
        where = f"fd 0 ({prefork.format_address(listener.address)})"
    else:
        listener = prefork.listen(options.bind, options.backlog, options.socket_mode)
        where = prefork.format_address(listener.address)
    try:
        print(banner("FastCGI", f"fastcgi://{where}", settings, options.workers), flush=True)
        log_settings(settings, "FastCGI server")

        def worker_main(lifeline: int) -> int:
            worker: FastCGIWorker | fastcgi.Worker
            if options.engine == "flup":
                worker = FastCGIWorker(
                    make_app(settings),
                    listener.sock,
                    bind_address=options.bind,
                    max_requests=options.max_requests,
                )
            else:
                worker = fastcgi.Worker(
                    make_app(settings), listener.sock, max_requests=options.max_requests
                )
            wake = prefork.worker_signals(worker.request_stop, worker.request_hup)
            return worker.serve(lifeline, wake)

        status = prefork.Supervisor(worker_main, options.workers).run()
    finally:
        listener.close()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return status
