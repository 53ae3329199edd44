"""A small FastCGI responder client, enough to talk to iipsrv and to our own server.

One request per connection (no FCGI_KEEP_CONN): BEGIN_REQUEST (role responder), the
parameters as name-value pairs (long-length encoding for values of 128 bytes or more),
an empty STDIN, then STDOUT/STDERR records are read until END_REQUEST or until the
server closes the connection. The result is the raw CGI response (headers, blank line,
body), which :func:`parse_cgi` splits the way nginx does: up to the first empty line.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

FCGI_VERSION = 1
FCGI_BEGIN_REQUEST = 1
FCGI_ABORT_REQUEST = 2
FCGI_END_REQUEST = 3
FCGI_PARAMS = 4
FCGI_STDIN = 5
FCGI_STDOUT = 6
FCGI_STDERR = 7
FCGI_RESPONDER = 1
FCGI_REQUEST_COMPLETE = 0

_HEADER = struct.Struct(">BBHHBx")
_MAX_CONTENT = 65535


class FCGIError(RuntimeError):
    """The connection failed or the server broke the protocol."""


def _length(n: int) -> bytes:
    if n < 128:
        return bytes([n])
    if n > 0x7FFFFFFF:
        raise ValueError("name or value too long for FastCGI")
    return struct.pack(">I", n | 0x80000000)


def encode_params(params: Mapping[str, str | bytes] | Iterable[tuple[str, str | bytes]]) -> bytes:
    """Encode name-value pairs (FastCGI §3.4)."""
    items = params.items() if isinstance(params, Mapping) else params
    out = bytearray()
    for name, value in items:
        n = name.encode("latin-1") if isinstance(name, str) else name
        v = value.encode("latin-1") if isinstance(value, str) else value
        out += _length(len(n)) + _length(len(v)) + n + v
    return bytes(out)


def decode_params(data: bytes) -> list[tuple[bytes, bytes]]:
    """Decode name-value pairs (used by the self-test of the encoder)."""
    out: list[tuple[bytes, bytes]] = []
    pos = 0

    def length() -> int:
        nonlocal pos
        if data[pos] < 128:
            pos += 1
            return data[pos - 1]
        (value,) = struct.unpack_from(">I", data, pos)
        pos += 4
        return value & 0x7FFFFFFF

    while pos < len(data):
        nl = length()
        vl = length()
        out.append((data[pos : pos + nl], data[pos + nl : pos + nl + vl]))
        pos += nl + vl
    return out


def record(rtype: int, request_id: int, content: bytes = b"") -> bytes:
    """One FastCGI record, padded to a multiple of 8 bytes."""
    if len(content) > _MAX_CONTENT:
        raise ValueError("record content too long")
    padding = -len(content) % 8
    return (
        _HEADER.pack(FCGI_VERSION, rtype, request_id, len(content), padding)
        + content
        + b"\0" * padding
    )


def stream(rtype: int, request_id: int, content: bytes) -> bytes:
    """A stream (PARAMS, STDIN): content split into records, then the empty terminator."""
    out = bytearray()
    for start in range(0, len(content), _MAX_CONTENT):
        out += record(rtype, request_id, content[start : start + _MAX_CONTENT])
    out += record(rtype, request_id)
    return bytes(out)


def cgi_params(
    query: str,
    *,
    method: str = "GET",
    script: str = "/fcgi-bin/iipsrv.fcgi",
    host: str = "localhost",
    headers: Mapping[str, str] | None = None,
) -> list[tuple[str, str]]:
    """The parameters nginx's ``fastcgi_params`` sends for ``GET <script>?<query>``."""
    uri = f"{script}?{query}" if query else script
    params = [
        ("QUERY_STRING", query),
        ("REQUEST_METHOD", method),
        ("CONTENT_TYPE", ""),
        ("CONTENT_LENGTH", ""),
        ("SCRIPT_NAME", script),
        ("SCRIPT_FILENAME", script),
        ("REQUEST_URI", uri),
        ("DOCUMENT_URI", script),
        ("DOCUMENT_ROOT", "/var/www/html"),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
        ("REQUEST_SCHEME", "http"),
        ("GATEWAY_INTERFACE", "CGI/1.1"),
        ("SERVER_SOFTWARE", "nginx/1.22.1"),
        ("REMOTE_ADDR", "127.0.0.1"),
        ("REMOTE_PORT", "40000"),
        ("SERVER_ADDR", "127.0.0.1"),
        ("SERVER_PORT", "80"),
        ("SERVER_NAME", "localhost"),
        ("HTTP_HOST", host),
    ]
    for name, value in (headers or {}).items():
        key = name.upper().replace("-", "_")
        if not key.startswith("HTTP_"):
            key = "HTTP_" + key
        params.append((key, value))
    return params


@dataclass
class RawResponse:
    """What came back on one FastCGI request."""

    stdout: bytes
    stderr: bytes
    app_status: int | None  # None: the server closed without END_REQUEST
    protocol_status: int | None


def _connect(address: str, timeout: float) -> socket.socket:
    if address.startswith("unix:") or address.startswith("/"):
        path = address.removeprefix("unix:")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: str | tuple[str, int] = path
    else:
        host, _, port = address.rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = (host or "127.0.0.1", int(port))
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except OSError:
        sock.close()
        raise
    return sock


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """Read exactly ``n`` bytes; None on a clean EOF before the first byte."""
    chunks = bytearray()
    while len(chunks) < n:
        try:
            chunk = sock.recv(n - len(chunks))
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            if not chunks:
                return None
            raise FCGIError(f"connection closed inside a record ({len(chunks)}/{n} bytes)")
        chunks += chunk
    return bytes(chunks)


def request(
    address: str,
    params: Iterable[tuple[str, str | bytes]] | Mapping[str, str | bytes],
    stdin: bytes = b"",
    *,
    timeout: float = 30.0,
    request_id: int = 1,
) -> RawResponse:
    """Send one responder request to ``address`` (``host:port``, ``unix:/path`` or ``/path``)."""
    sock = _connect(address, timeout)
    try:
        begin = struct.pack(">HB5x", FCGI_RESPONDER, 0)
        payload = (
            record(FCGI_BEGIN_REQUEST, request_id, begin)
            + stream(FCGI_PARAMS, request_id, encode_params(params))
            + stream(FCGI_STDIN, request_id, stdin)
        )
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise FCGIError(f"server closed the connection while sending: {exc}") from exc
        stdout = bytearray()
        stderr = bytearray()
        while True:
            head = _recv_exact(sock, _HEADER.size)
            if head is None:
                return RawResponse(bytes(stdout), bytes(stderr), None, None)
            version, rtype, rid, length, padding = _HEADER.unpack(head)
            if version != FCGI_VERSION:
                raise FCGIError(f"bad FastCGI version {version}")
            body = _recv_exact(sock, length + padding) if length + padding else b""
            if body is None:
                raise FCGIError("connection closed before record content")
            content = body[:length]
            if rid != request_id:
                continue  # management records (request id 0) and strays
            if rtype == FCGI_STDOUT:
                stdout += content
            elif rtype == FCGI_STDERR:
                stderr += content
            elif rtype == FCGI_END_REQUEST:
                app_status, proto = struct.unpack(">IB3x", content[:8])
                return RawResponse(bytes(stdout), bytes(stderr), app_status, proto)
    finally:
        sock.close()


@dataclass
class Response:
    """A parsed CGI response: what nginx would turn into an HTTP response."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes
    stderr: bytes = b""
    complete: bool = True  # END_REQUEST received
    reason: str = field(default="")

    def header(self, name: str) -> str | None:
        """The first header called ``name`` (case-insensitive), or None."""
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

    def names(self) -> list[str]:
        """Header names in order."""
        return [key for key, _ in self.headers]


def parse_cgi(raw: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
    """Split a CGI response into (status, reason, headers, body).

    Like nginx, the header block ends at the first empty line (CRLF or bare LF); the
    ``Status:`` header gives the status (default 200) and stays in the header list.
    A response without any empty line is all headers and no body.
    """
    headers: list[tuple[str, str]] = []
    pos = 0
    body = b""
    while pos < len(raw):
        end = raw.find(b"\n", pos)
        if end < 0:
            line, pos = raw[pos:], len(raw)
        else:
            line, pos = raw[pos:end], end + 1
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            body = raw[pos:]
            break
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise ValueError(f"malformed CGI header line {line!r}")
        headers.append((name.strip(), value.strip()))
    status, reason = 200, ""
    for name, value in headers:
        if name.lower() == "status":
            code, _, reason = value.partition(" ")
            status = int(code)
            break
    return status, reason, headers, body


def get(
    address: str,
    query: str,
    headers: Mapping[str, str] | None = None,
    *,
    timeout: float = 30.0,
    method: str = "GET",
) -> Response:
    """``GET /fcgi-bin/iipsrv.fcgi?<query>`` through FastCGI, parsed."""
    raw = request(address, cgi_params(query, headers=headers, method=method), timeout=timeout)
    status, reason, hdrs, body = parse_cgi(raw.stdout)
    return Response(
        status,
        hdrs,
        body,
        raw.stdout,
        stderr=raw.stderr,
        complete=raw.app_status is not None,
        reason=reason,
    )
