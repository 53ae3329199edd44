"""Helpers for differential tests: a FastCGI server process, and response comparisons.

The comparisons implement ``docs``-level rules from ``iip-protocol.md`` and ``policy.md``:
OBJ bodies byte for byte, IIP error lines by code and (untruncated) text, header names in
iipsrv's order, JPEG tiles on decoded pixels within a stated tolerance.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import fcgi_client
import numpy as np
import simplejpeg

# --------------------------------------------------------------------------------------
# Server processes


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A FastCGI server on 127.0.0.1:<free port>, restarted if it dies between requests.

    ``argv(port)`` builds the command line. Crashes (the process gone after a request)
    are recorded in ``crashes`` with the query that preceded them.
    """

    def __init__(
        self,
        name: str,
        argv: Callable[[int], list[str]],
        env: Mapping[str, str],
        *,
        cwd: Path,
        start_timeout: float = 30.0,
        request_timeout: float = 30.0,
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = dict(env)
        self.cwd = Path(cwd)
        self.start_timeout = start_timeout
        self.request_timeout = request_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.crashes: list[str] = []
        self.output = self.cwd / f"{name}.out"
        self._last_query = ""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the process and wait until its port accepts connections."""
        self.port = free_port()
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv(self.port),
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with status {self.proc.returncode} at start-up "
                    f"({' '.join(self.argv(self.port))}):\n{self.tail()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"{self.name} did not accept connections within "
                        f"{self.start_timeout:.0f} s:\n{self.tail()}"
                    ) from None
                time.sleep(0.05)

    def tail(self, n: int = 4000) -> str:
        """The end of the process's stdout/stderr."""
        try:
            return self.output.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Terminate the process (and its process group: pre-forked workers)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        # Workers left behind in the group after the leader exited.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def _check_alive(self) -> None:
        if not self.alive():
            code = None if self.proc is None else self.proc.returncode
            self.crashes.append(f"{self._last_query!r} (exit status {code})")
            self.stop()
            self.start()

    def get(self, query: str, headers: Mapping[str, str] | None = None) -> fcgi_client.Response:
        """Send ``GET /fcgi-bin/iipsrv.fcgi?<query>`` and parse the CGI answer."""
        self._check_alive()
        self._last_query = query
        try:
            return fcgi_client.get(self.address, query, headers, timeout=self.request_timeout)
        except (OSError, fcgi_client.FCGIError) as exc:
            time.sleep(0.1)
            state = "died" if not self.alive() else "is still running"
            raise AssertionError(
                f"{self.name} failed on {query!r} ({exc}); the process {state}"
            ) from exc


# --------------------------------------------------------------------------------------
# Response comparison

#: Headers that a policy lets us add to any response (policy §1, §2): Content-Length and
#: Content-Type everywhere; Cache-Control on errors (``no-cache``, the caching issue) and, with
#: Last-Modified, on 304 replies (a 304 carries the cache headers its 200 would, RFC 9110);
#: ETag on replies about an image (the caching issue's If-None-Match).
ALLOWED_EXTRA = {"content-length", "content-type", "cache-control", "last-modified", "etag"}
#: Headers whose values legitimately differ between the two servers.
VALUE_EXEMPT = {"server", "content-length", "status"}


def header_names(resp: fcgi_client.Response) -> list[str]:
    """Header names in order, lower-cased, without Status.

    nginx consumes ``Status:``, so where it sits in the CGI block is invisible to clients.
    """
    return [name.lower() for name, _ in resp.headers if name.lower() != "status"]


def is_subsequence(small: Sequence[str], big: Sequence[str]) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


def compare_headers(
    ref: fcgi_client.Response, ours: fcgi_client.Response, *, values: bool = True
) -> list[str]:
    """Problems with our header block, compared with iipsrv's (empty list: fine).

    Every header iipsrv sends must be present, in iipsrv's relative order; extras must be
    Content-Length, Content-Type or CORS (policy §1-2). Values must agree except Server,
    Content-Length and Status (the status code is compared separately).
    """
    problems: list[str] = []
    ref_names, our_names = header_names(ref), header_names(ours)
    if not is_subsequence(ref_names, our_names):
        problems.append(f"header order: iipsrv {ref_names}, ours {our_names}")
    extras = [n for n in our_names if n not in ref_names]
    bad = [n for n in extras if n not in ALLOWED_EXTRA and not n.startswith("access-control-")]
    if bad:
        problems.append(f"unexpected extra headers {bad} (ours {our_names})")
    if len(set(our_names)) != len(our_names):
        problems.append(f"duplicate headers in ours: {our_names}")
    if values:
        for name, value in ref.headers:
            lname = name.lower()
            if lname in VALUE_EXEMPT:
                continue
            mine = ours.header(name)
            if mine is not None and mine != value:
                problems.append(f"{name}: iipsrv {value!r}, ours {mine!r}")
    return problems


def policy_problems(ours: fcgi_client.Response) -> list[str]:
    """Policy §2: a Content-Type on every response with a body, a true Content-Length."""
    problems: list[str] = []
    if ours.status != 304 and ours.header("Content-Type") is None:
        problems.append(f"no Content-Type (headers {ours.names()})")
    length = ours.header("Content-Length")
    if length is not None and length.strip() != str(len(ours.body)):
        problems.append(f"Content-Length {length} but body has {len(ours.body)} bytes")
    if not ours.complete:
        problems.append("response ended without FCGI_END_REQUEST")
    return problems


def repair_header_block(resp: fcgi_client.Response) -> fcgi_client.Response:
    """Undo 1.1's early end of headers (empty Last-Modified line, spec §5.1): move the
    header lines at the start of the body back into the header block."""
    body = resp.body
    headers = list(resp.headers)
    while True:
        end = body.find(b"\r\n")
        if end <= 0:
            break
        line = body[:end].decode("latin-1")
        m = re.fullmatch(r"([A-Za-z][A-Za-z0-9-]*): ?(.*)", line)
        if not m:
            break
        headers.append((m.group(1), m.group(2)))
        body = body[end + 2 :]
    if body.startswith(b"\r\n") and len(headers) > len(resp.headers):
        body = body[2:]
    return fcgi_client.Response(
        resp.status, headers, body, resp.raw, resp.stderr, resp.complete, resp.reason
    )


ERROR_LINE = re.compile(rb"Error/(\d+):(.*?)\r\n", re.S)


def error_lines(body: bytes) -> list[tuple[int, bytes]]:
    """Parse a body made only of IIP error lines into (declared length, text) pairs."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(body):
        m = ERROR_LINE.match(body, pos)
        if not m:
            raise AssertionError(f"not an IIP error body at byte {pos}: {body!r}")
        out.append((int(m.group(1)), m.group(2)))
        pos = m.end()
    return out


def compare_error_bodies(ref_body: bytes, our_body: bytes) -> list[str]:
    """IIP error lines: same codes and arguments; 1.1 cuts each line at 31 characters
    but its length prefix is the true length, so ours must be the full text of that length
    starting with 1.1's cut text (policy §2)."""
    ref_lines, our_lines = error_lines(ref_body), error_lines(our_body)
    if len(ref_lines) != len(our_lines):
        return [f"iipsrv sent {len(ref_lines)} error lines {ref_body!r}, ours {our_body!r}"]
    problems = []
    for (rlen, rtext), (olen, otext) in zip(ref_lines, our_lines, strict=True):
        if len(otext) != olen:
            problems.append(f"our length prefix {olen} != {len(otext)} bytes in {otext!r}")
        full = len(rtext) == rlen
        if full and otext != rtext:
            problems.append(f"error text: iipsrv {rtext!r}, ours {otext!r}")
        elif not full and (olen != rlen or not otext.startswith(rtext)):
            problems.append(
                f"error text: iipsrv (cut) {rtext!r} len {rlen}, ours {otext!r} len {olen}"
            )
    return problems


def iip_error_codes(body: bytes) -> list[bytes]:
    return [text.split(b" ", 2)[0] + b" " + text.split(b" ", 2)[1] for _, text in error_lines(body)]


# --------------------------------------------------------------------------------------
# JPEG


@dataclass
class JpegInfo:
    """What the markers of a baseline JPEG say."""

    width: int
    height: int
    components: list[tuple[int, int, int]]  # (id, h sampling, v sampling)
    qtables: dict[int, tuple[int, ...]]  # in zig-zag order
    progressive: bool
    comments: list[bytes]


def jpeg_info(data: bytes) -> JpegInfo:
    """Parse SOF, DQT and COM markers."""
    if not data.startswith(b"\xff\xd8"):
        raise AssertionError(f"not a JPEG: {data[:32]!r}")
    pos = 2
    width = height = 0
    components: list[tuple[int, int, int]] = []
    qtables: dict[int, tuple[int, ...]] = {}
    comments: list[bytes] = []
    progressive = False
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise AssertionError(f"bad JPEG marker at {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        seg = data[pos + 4 : pos + 2 + length]
        if marker in (0xC0, 0xC1, 0xC2):
            progressive = marker == 0xC2
            height, width = struct.unpack_from(">HH", seg, 1)
            for i in range(seg[5]):
                cid, samp = seg[6 + 3 * i], seg[7 + 3 * i]
                components.append((cid, samp >> 4, samp & 15))
        elif marker == 0xDB:
            p = 0
            while p < len(seg):
                precision, tid = seg[p] >> 4, seg[p] & 15
                size = 128 if precision else 64
                fmt = ">64H" if precision else "64B"
                qtables[tid] = struct.unpack_from(fmt, seg, p + 1)
                p += 1 + size
        elif marker == 0xFE:
            comments.append(seg)
        elif marker == 0xDA:
            break
        pos += 2 + length
    return JpegInfo(width, height, components, qtables, progressive, comments)


def decode(data: bytes) -> np.ndarray:
    """Decode a JPEG to (h, w, c) uint8 with its own channel count (1 for grey JPEGs)."""
    _, _, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    if colorspace.lower() == "gray":
        return simplejpeg.decode_jpeg(data, colorspace="GRAY")
    return simplejpeg.decode_jpeg(data, colorspace="RGB")


def pixel_diff(ref: bytes, ours: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a, b = decode(ref), decode(ours)
    if a.shape != b.shape:
        raise AssertionError(f"decoded shapes differ: iipsrv {a.shape}, ours {b.shape}")
    return a, b, np.abs(a.astype(np.int16) - b.astype(np.int16))


# --------------------------------------------------------------------------------------
# TIL bodies and replies embedded in a 200 body (1.1 writes errors after its headers)

TIL_RECORD = re.compile(rb"Tile,(-?\d+),(-?\d+),0/(\d+):")


@dataclass
class TilRecord:
    """One TIL record: ``Tile,<r>,<n>,0/<len+8>:`` + type + subtype + data + CRLF."""

    head: bytes  # "Tile,r,n,0/len:" as sent
    resolution: int
    index: int
    kind: bytes  # 4 bytes: 02 00 00 00 (8-bit), 03 00 00 00 (16-bit), else 0
    subtype: bytes  # 4 bytes: 00 11 00 00
    data: bytes


def til_records(body: bytes) -> tuple[list[TilRecord], bytes]:
    """Split a TIL body into well-framed records, and whatever follows the last one."""
    records: list[TilRecord] = []
    pos = 0
    while pos < len(body):
        m = TIL_RECORD.match(body, pos)
        if not m:
            break
        length = int(m.group(3))
        start, end = m.end(), m.end() + length
        if length < 8 or body[end : end + 2] != b"\r\n":
            break
        payload = body[start:end]
        records.append(
            TilRecord(
                m.group(0),
                int(m.group(1)),
                int(m.group(2)),
                payload[:4],
                payload[4:8],
                payload[8:],
            )
        )
        pos = end + 2
    return records, body[pos:]


EMBEDDED_REPLY = re.compile(
    rb"Status: (\d{3})[^\r\n]*\r\n(?:[A-Za-z-]+: [^\r\n]*\r\n)*\r\n(.*)\Z", re.S
)


def embedded_reply(body: bytes) -> tuple[int, bytes] | None:
    """(status, text) of an error reply that 1.1 wrote after its 200 headers (for example
    SPECTRA or TIL on a missing tile), or None."""
    m = EMBEDDED_REPLY.search(body)
    return (int(m.group(1)), m.group(2)) if m else None


def jpeg_structure_problems(ref_body: bytes, ours_body: bytes) -> list[str]:
    """Same geometry, components, chroma sampling and quantisation tables; baseline."""
    ri, oi = jpeg_info(ref_body), jpeg_info(ours_body)
    problems = []
    if (ri.width, ri.height) != (oi.width, oi.height):
        problems.append(f"size: iipsrv {ri.width}x{ri.height}, ours {oi.width}x{oi.height}")
    if [c[1:] for c in ri.components] != [c[1:] for c in oi.components]:
        problems.append(f"components/sampling: iipsrv {ri.components}, ours {oi.components}")
    if ri.qtables != oi.qtables:
        rq = [t[:3] for t in ri.qtables.values()]
        oq = [t[:3] for t in oi.qtables.values()]
        problems.append(f"quantisation tables differ (quality): iipsrv {rq}, ours {oq}")
    if oi.progressive:
        problems.append("ours is progressive")
    return problems


def array_problems(
    a: np.ndarray, b: np.ndarray, tol: tuple[int, float | None], rows: int | None = None
) -> list[str]:
    """Decoded pixels within ``tol`` = (max |diff|, mean limit or None); first ``rows`` only."""
    if a.shape != b.shape:
        return [f"decoded shapes: iipsrv {a.shape}, ours {b.shape}"]
    if rows is not None:
        a, b = a[:rows], b[:rows]
    if a.size == 0:
        return []
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    worst, mean = int(diff.max()), float(diff.mean())
    max_diff, mean_diff = tol
    if worst > max_diff or (mean_diff is not None and mean >= mean_diff):
        where = np.unravel_index(int(diff.argmax()), diff.shape)
        return [
            f"pixels: max |diff| {worst} (limit {max_diff}) at {tuple(int(i) for i in where)} "
            f"(iipsrv {a[where]}, ours {b[where]}), mean {mean:.3f} (limit {mean_diff})"
            + (f", first {rows} rows" if rows is not None else "")
        ]
    return []
