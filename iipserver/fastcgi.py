"""The FastCGI responder: records in, one response out, with as little work per request as can be.

This is the default engine of ``iipserver fcgi`` (``--engine flup`` keeps flup's). A tile takes
one ``accept``, one or two ``recv`` and one ``sendall``; the name-value pairs become the WSGI
environ directly, and the application's :class:`~iipserver.protocol.responses.Response` is
framed into STDOUT and END_REQUEST records in one buffer (flup's record objects, stream
classes, WSGI adaptor, per-record ``select`` and closing linger cost ~0.3 ms per request).

What the FastCGI specification asks of a responder, and what we do:

- ``FCGI_GET_VALUES`` → ``FCGI_GET_VALUES_RESULT`` for the three names we know (one connection
  and one request at a time, no multiplexing); any other management record →
  ``FCGI_UNKNOWN_TYPE``.
- ``FCGI_BEGIN_REQUEST`` for a role other than responder → ``FCGI_UNKNOWN_ROLE``; a second
  request on a connection while one is open → ``FCGI_CANT_MPX_CONN``.
- ``FCGI_ABORT_REQUEST`` before the request is complete ends it without calling the application.
- Without ``FCGI_KEEP_CONN`` the connection is closed after the response (everything the web
  server sent has been read, so the close cannot reset the response); with it, the next request
  is awaited, but an idle connection is let go when another connection waits (a worker serves
  one connection at a time) or after ``IDLE_LIMIT`` seconds.
- A record with an unknown version, parameters over ``MAX_PARAMS`` bytes or a request that does
  not arrive within ``IO_TIMEOUT`` seconds closes the connection.
"""

from __future__ import annotations

import io
import logging
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from iipserver import prefork

log = logging.getLogger(__name__)

#: Record types (FastCGI 1.0 specification).
BEGIN_REQUEST, ABORT_REQUEST, END_REQUEST, PARAMS, STDIN, STDOUT = 1, 2, 3, 4, 5, 6
DATA, GET_VALUES, GET_VALUES_RESULT, UNKNOWN_TYPE = 8, 9, 10, 11
RESPONDER = 1
KEEP_CONN = 1
REQUEST_COMPLETE, CANT_MPX_CONN, UNKNOWN_ROLE = 0, 1, 3

#: Largest content of one record (the length field is 16 bits); a multiple of 8, no padding.
MAX_CONTENT = 65528
#: Largest total size of a request's name-value pairs.
MAX_PARAMS = 1 << 20
#: Request body bytes kept (the IIP POST body is limited far below this by the application).
MAX_STDIN = 1 << 20
#: A kept-alive connection with no request in progress is closed after this many idle seconds.
IDLE_LIMIT = 60.0
#: Seconds a connection may take to deliver a whole request, or to take a response.
IO_TIMEOUT = 30.0
#: How long a waiting connection is given to be picked up by an idle worker before a worker
#: holding an idle kept-alive connection lets go of it.
YIELD_DELAY = 0.005

_HEADER = struct.Struct(">BBHHBx")
_END_BODY = struct.pack(">IB3x", 0, REQUEST_COMPLETE)
_TIMEOUT = struct.pack("ll", int(IO_TIMEOUT), 0)  # struct timeval for SO_RCVTIMEO/SO_SNDTIMEO
_VALUES = {"FCGI_MAX_CONNS": "1", "FCGI_MAX_REQS": "1", "FCGI_MPXS_CONNS": "0"}

_ERROR_BODY = b"Internal Server Error\n"
ERROR_RESPONSE = (
    b"Status: 500 Internal Server Error\r\nContent-Type: text/plain\r\n"
    b"Content-Length: " + str(len(_ERROR_BODY)).encode() + b"\r\n\r\n" + _ERROR_BODY
)


class ProtocolViolation(Exception):
    """The peer broke the FastCGI protocol: the connection is closed."""


def record(kind: int, request_id: int, content: bytes = b"") -> bytes:
    """One record (content of at most 65535 bytes, unpadded)."""
    return _HEADER.pack(1, kind, request_id, len(content), 0) + content


def encode_pairs(pairs: dict[str, str]) -> bytes:
    """FastCGI name-value pairs."""
    out = bytearray()
    for name, value in pairs.items():
        for part in (name.encode("latin-1"), value.encode("latin-1")):
            n = len(part)
            out += bytes([n]) if n < 128 else struct.pack(">I", n | 0x80000000)
        out += name.encode("latin-1") + value.encode("latin-1")
    return bytes(out)


def decode_pairs(data: bytes) -> dict[str, str]:
    """FastCGI name-value pairs → ``str`` (latin-1, as WSGI's native strings are).

    Raises:
        ProtocolViolation: a length runs past the end of the data.
    """
    env: dict[str, str] = {}
    text = data.decode("latin-1")  # one character per byte: offsets stay the same
    pos, end = 0, len(data)
    try:
        while pos < end:
            n = data[pos]
            if n & 0x80:
                n = int.from_bytes(data[pos : pos + 4], "big") & 0x7FFFFFFF
                pos += 4
            else:
                pos += 1
            v = data[pos]
            if v & 0x80:
                v = int.from_bytes(data[pos : pos + 4], "big") & 0x7FFFFFFF
                pos += 4
            else:
                pos += 1
            value_at = pos + n
            pos = value_at + v
            if pos > end:
                raise ProtocolViolation("name-value pair runs past the parameters")
            env[text[value_at - n : value_at]] = text[value_at:pos]
    except IndexError:
        raise ProtocolViolation("truncated name-value pair") from None
    return env


def frame(request_id: int, output: bytes) -> bytes:
    """The CGI ``output`` as STDOUT records, the empty STDOUT record and END_REQUEST."""
    pack = _HEADER.pack
    if len(output) <= MAX_CONTENT:
        parts: list[bytes | memoryview] = (
            [pack(1, STDOUT, request_id, len(output), 0), output] if output else []
        )
    else:
        view = memoryview(output)
        parts = []
        for start in range(0, len(output), MAX_CONTENT):
            chunk = view[start : start + MAX_CONTENT]
            parts += [pack(1, STDOUT, request_id, len(chunk), 0), chunk]
    parts.append(pack(1, STDOUT, request_id, 0, 0))
    parts.append(pack(1, END_REQUEST, request_id, 8, 0) + _END_BODY)
    return b"".join(parts)


def complete_environ(env: dict[str, Any], stdin: bytes) -> dict[str, Any]:
    """Add the WSGI keys and the defaults a web server may leave out (as flup does)."""
    env["wsgi.version"] = (1, 0)
    env["wsgi.input"] = io.BytesIO(stdin)
    env["wsgi.errors"] = sys.stderr
    env["wsgi.multithread"] = False
    env["wsgi.multiprocess"] = True
    env["wsgi.run_once"] = False
    env["wsgi.url_scheme"] = "https" if env.get("HTTPS", "off") in ("on", "1") else "http"
    env.setdefault("SCRIPT_NAME", "")
    uri = env.get("REQUEST_URI")
    if not env.get("PATH_INFO"):
        path = uri.split("?", 1)[0] if uri is not None else ""
        script = env["SCRIPT_NAME"]
        env["PATH_INFO"] = path[len(script) :] if path.startswith(script) else path
    if not env.get("QUERY_STRING"):
        env["QUERY_STRING"] = uri.split("?", 1)[1] if uri and "?" in uri else ""
    env.setdefault("REQUEST_METHOD", "GET")
    env.setdefault("SERVER_NAME", "localhost")
    env.setdefault("SERVER_PORT", "80")
    env.setdefault("SERVER_PROTOCOL", "HTTP/1.0")
    return env


def _waiter(listen_fd: int, lifeline: int, wake: int) -> Callable[[], list[int]]:
    """A function that blocks until some of the descriptors are ready and returns them.

    With epoll, the listening socket is watched with ``EPOLLEXCLUSIVE`` so that a new
    connection wakes one idle worker, not all of them (with ``select`` every worker wakes, one
    accepts and the others find nothing: CPU spent for nothing at every request).
    """
    exclusive = getattr(select, "EPOLLEXCLUSIVE", 0)
    if not hasattr(select, "epoll") or not exclusive:
        return lambda: select.select([listen_fd, lifeline, wake], [], [])[0]
    poller = select.epoll()
    poller.register(listen_fd, select.EPOLLIN | exclusive)
    poller.register(lifeline, select.EPOLLIN)
    poller.register(wake, select.EPOLLIN)
    return lambda: [fd for fd, _ in poller.poll()]


class Worker(prefork.WorkerFlags):
    """One worker process: accepts connections on the shared socket and answers requests.

    Args:
        app: the IIP application (``respond(environ) -> Response``, ``clear_caches()``).
        listen_sock: the listening socket inherited from the parent.
        max_requests: requests to serve before exiting so the parent starts a fresh worker.
    """

    def __init__(self, app: Any, listen_sock: socket.socket, *, max_requests: int = 0) -> None:
        super().__init__(app)
        self.listen_sock = listen_sock
        self.max_requests = max_requests
        addrs = os.environ.get("FCGI_WEB_SERVER_ADDRS")
        self.allowed = None if addrs is None else {a.strip() for a in addrs.split(",")}
        self.served = 0
        self.wake = -1

    # -- accept loop ------------------------------------------------------------------------

    def serve(self, lifeline: int, wake: int) -> int:
        """Accept and serve connections one at a time until stopped; return the exit status."""
        self.wake = wake
        sock = self.listen_sock
        sock.setblocking(False)
        listen_fd = sock.fileno()
        tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        if tcp:  # accepted TCP sockets inherit these (Linux); Unix ones do not
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEOUT)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        wait = _waiter(listen_fd, lifeline, wake)
        while not self.stopping:
            self.apply_hup()
            ready = wait()
            if wake in ready:
                prefork.drain(wake)
                continue
            if lifeline in ready:
                break  # the parent closed it (stop) or died
            accepted = prefork.accept(sock)
            if accepted is None:
                continue
            conn, addr = accepted
            if tcp and self.allowed is not None and addr[0] not in self.allowed:
                conn.close()
                continue
            try:
                # a blocking socket with kernel timeouts: no poll() before every recv and send
                if not tcp or sys.platform != "linux":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEOUT)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEOUT)
                    if tcp:
                        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.connection(conn)
            except (OSError, ProtocolViolation) as exc:
                log.info("connection dropped: %s", exc)
            finally:
                conn.close()
        return 0

    # -- one connection ---------------------------------------------------------------------

    def _wait_next(self, conn: socket.socket) -> bool:
        """Wait on a kept-alive connection for its next request; False to close it."""
        since = time.monotonic()
        fd, listen_fd = conn.fileno(), self.listen_sock.fileno()
        watch = [fd, self.wake, listen_fd]
        while True:
            ready, _, _ = select.select(watch, [], [], 1.0)
            if fd in ready:
                return True
            if self.wake in ready:
                prefork.drain(self.wake)
            self.apply_hup()
            if self.stopping or time.monotonic() - since > IDLE_LIMIT:
                return False
            if listen_fd in ready and self._connection_waiting():
                return False

    def _connection_waiting(self) -> bool:
        """True if a connection still waits to be accepted a moment from now."""
        time.sleep(YIELD_DELAY)
        ready, _, _ = select.select([self.listen_sock], [], [], 0)
        return bool(ready)

    def connection(self, conn: socket.socket) -> None:  # noqa: C901 - one state machine
        """Serve requests on ``conn`` until it is to be closed.

        Raises:
            OSError: the peer went away or a timeout passed.
            ProtocolViolation: the peer broke the protocol.
        """
        buf = b""
        pos = 0
        request_id = 0  # the open request, 0 when none
        keep = False
        params: list[bytes] = []
        params_size = 0
        env: dict[str, str] | None = None
        stdin: list[bytes] = []
        stdin_size = 0
        recv = conn.recv
        unpack = _HEADER.unpack_from
        while True:
            # one whole record in buf[pos:], or read more
            have = len(buf) - pos
            if have < 8 or have < 8 + ((buf[pos + 4] << 8) | buf[pos + 5]) + buf[pos + 6]:
                # between requests on a kept-alive connection: wait, yielding if idle
                if request_id == 0 and have == 0 and buf and not self._wait_next(conn):
                    return
                data = recv(262144)
                if not data:
                    return  # the peer closed
                buf = buf[pos:] + data if have else data
                pos = 0
                continue
            version, kind, rid, length, padding = unpack(buf, pos)
            if version != 1:
                raise ProtocolViolation(f"FastCGI version {version}")
            content = buf[pos + 8 : pos + 8 + length]
            pos += 8 + length + padding
            if rid == 0:
                if kind == GET_VALUES:
                    asked = decode_pairs(content)
                    known = {k: _VALUES[k] for k in asked if k in _VALUES}
                    conn.sendall(record(GET_VALUES_RESULT, 0, encode_pairs(known)))
                else:
                    conn.sendall(record(UNKNOWN_TYPE, 0, bytes([kind]) + bytes(7)))
                continue
            if kind == BEGIN_REQUEST:
                role, flags = struct.unpack_from(">HB", content)
                if request_id:
                    conn.sendall(record(END_REQUEST, rid, struct.pack(">IB3x", 0, CANT_MPX_CONN)))
                elif role != RESPONDER:
                    conn.sendall(record(END_REQUEST, rid, struct.pack(">IB3x", 0, UNKNOWN_ROLE)))
                    if not flags & KEEP_CONN:
                        return
                else:
                    request_id, keep = rid, bool(flags & KEEP_CONN)
                    params, params_size, env, stdin, stdin_size = [], 0, None, [], 0
                continue
            if rid != request_id:
                continue  # a record of no request of ours
            if kind == PARAMS:
                if length:
                    params_size += length
                    if params_size > MAX_PARAMS:
                        raise ProtocolViolation("parameters too long")
                    params.append(content)
                else:
                    env = decode_pairs(b"".join(params))
            elif kind == STDIN:
                if length:
                    if stdin_size < MAX_STDIN:
                        stdin.append(content)
                        stdin_size += length
                    continue
                if env is None:
                    raise ProtocolViolation("request body before its parameters ended")
                self._respond(conn, request_id, env, b"".join(stdin))
                request_id = 0
                if not keep or self.stopping:
                    return
            elif kind == ABORT_REQUEST:
                conn.sendall(record(END_REQUEST, request_id, _END_BODY))
                request_id = 0
                if not keep:
                    return
            # DATA and unknown request-level types are ignored

    def _respond(
        self, conn: socket.socket, request_id: int, env: dict[str, Any], stdin: bytes
    ) -> None:
        """Run the application for one request and send its output."""
        self.apply_hup()
        try:
            output = self.app.respond(complete_environ(env, stdin)).cgi()
        except Exception:
            log.error("unhandled exception in the application", exc_info=True)
            output = ERROR_RESPONSE
        try:
            conn.sendall(frame(request_id, output))
        finally:
            self.served += 1
            if self.max_requests and self.served >= self.max_requests:
                self.stopping = True
