"""The FastCGI responder (iipserver.fastcgi): the protocol's corners, and the same bytes as flup.

Each test runs a real worker (``Worker.serve``) on a loopback socket in a thread, over a real
IIPApp and a generated image; requests are written record by record with the test's own
encoder (tests/fcgi_client.py), including what nginx never sends but the specification allows.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import simplejpeg
from fcgi_client import cgi_params, encode_params, record, stream
from images import pyramid_levels, rgb_image, write_pyramid

from iipserver import fastcgi
from iipserver.app import make_app
from iipserver.fcgi import FastCGIWorker
from iipserver.settings import Settings

RESPONDER, AUTHORIZER = 1, 2
BEGIN, ABORT, END, PARAMS, STDIN, STDOUT = 1, 2, 3, 4, 5, 6
GET_VALUES, GET_VALUES_RESULT, UNKNOWN_TYPE = 9, 10, 11
HEADER = struct.Struct(">BBHHBx")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fastcgi")
    write_pyramid(root / "rgb.tif", pyramid_levels(rgb_image(600, 500)))
    noise = np.random.default_rng(5).integers(0, 256, size=(400, 300, 3), dtype=np.uint8)
    write_pyramid(root / "noise.tif", pyramid_levels(noise))
    return root


class Running:
    """A worker serving on 127.0.0.1 in a thread until ``stop``."""

    def __init__(self, worker_class: Any, app: Any) -> None:
        self.listening = socket.socket()
        self.listening.bind(("127.0.0.1", 0))
        self.listening.listen()
        self.port = self.listening.getsockname()[1]
        if worker_class is FastCGIWorker:
            self.worker = FastCGIWorker(app, self.listening, bind_address=None)
        else:
            self.worker = worker_class(app, self.listening)
        self.lifeline_r, self.lifeline_w = os.pipe()
        self.wake_r, self.wake_w = os.pipe()
        self.result: list[int] = []
        self.thread = threading.Thread(
            target=lambda: self.result.append(self.worker.serve(self.lifeline_r, self.wake_r))
        )
        self.thread.start()

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return sock

    def stop(self) -> None:
        os.close(self.lifeline_w)
        self.thread.join(10)
        for fd in (self.lifeline_r, self.wake_r, self.wake_w):
            os.close(fd)
        self.listening.close()
        assert self.result == [0]


@pytest.fixture(scope="module")
def app(images: Path) -> Any:
    return make_app(Settings.from_environ({"FILESYSTEM_PREFIX": f"{images}/"}))


@pytest.fixture(scope="module")
def ours(app: Any) -> Iterator[Running]:
    running = Running(fastcgi.Worker, app)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def flup(app: Any) -> Iterator[Running]:
    running = Running(FastCGIWorker, app)
    yield running
    running.stop()


def read_records(sock: socket.socket) -> list[tuple[int, int, bytes]]:
    """Every record until the peer closes, as (type, request id, content)."""
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return parse_records(bytes(data))


def parse_records(data: bytes) -> list[tuple[int, int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        version, kind, rid, length, padding = HEADER.unpack_from(data, pos)
        assert version == 1
        out.append((kind, rid, data[pos + 8 : pos + 8 + length]))
        pos += 8 + length + padding
    assert pos == len(data)
    return out


def read_until_end(sock: socket.socket, request_id: int) -> list[tuple[int, int, bytes]]:
    """Records up to and including END_REQUEST of ``request_id`` (connection kept)."""
    data = bytearray()
    while True:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before END_REQUEST"
        data += chunk
        try:
            records = parse_records(bytes(data))
        except (AssertionError, struct.error):
            continue
        if any(k == END and r == request_id for k, r, _ in records):
            return records


def stdout_of(records: list[tuple[int, int, bytes]], request_id: int = 1) -> bytes:
    return b"".join(c for k, r, c in records if k == STDOUT and r == request_id)


def begin(request_id: int = 1, role: int = RESPONDER, keep: bool = False) -> bytes:
    return record(BEGIN, request_id, struct.pack(">HB5x", role, 1 if keep else 0))


def whole_request(query: str, request_id: int = 1, keep: bool = False, **kw: Any) -> bytes:
    body = kw.pop("body", b"")
    params = encode_params(cgi_params(query, **kw))
    return (
        begin(request_id, keep=keep)
        + stream(PARAMS, request_id, params)
        + stream(STDIN, request_id, body)
    )


def exchange(server: Running, payload: bytes) -> list[tuple[int, int, bytes]]:
    with server.connect() as sock:
        sock.sendall(payload)
        return read_records(sock)


QUERIES = [
    "FIF=rgb.tif&OBJ=IIP,1.0&OBJ=Max-size&OBJ=Tile-size&OBJ=Resolution-number",
    "FIF=rgb.tif&JTL=2,3",
    "FIF=rgb.tif&GAM=2&JTL=1,0",
    "FIF=noise.tif&CVT=png",  # > 64 KiB: several STDOUT records
    "FIF=missing.tif&JTL=0,0",
    "FIF=rgb.tif&JTL=9,0",
    "IIIF=rgb.tif/info.json",
    "",
]


@pytest.mark.parametrize("query", QUERIES)
def test_same_output_as_flup(ours: Running, flup: Running, query: str) -> None:
    mine = exchange(ours, whole_request(query))
    theirs = exchange(flup, whole_request(query))
    assert stdout_of(mine) == stdout_of(theirs)
    assert mine[-1] == (END, 1, struct.pack(">IB3x", 0, 0))
    assert all(len(c) <= 65535 for _, _, c in mine)


def test_head_and_post(ours: Running, flup: Running) -> None:
    for server in (ours, flup):
        head = stdout_of(exchange(server, whole_request("FIF=rgb.tif&JTL=1,0", method="HEAD")))
        assert head.startswith(b"Status: 200 OK\r\n") and head.endswith(b"\r\n\r\n")
        assert b"Content-Length: " in head
    body = b"FIF=rgb.tif&OBJ=Max-size"
    params = [(k, v) for k, v in cgi_params("", method="POST") if k != "CONTENT_LENGTH"]
    params.append(("CONTENT_LENGTH", str(len(body))))
    post = begin() + stream(PARAMS, 1, encode_params(params)) + stream(STDIN, 1, body)
    assert stdout_of(exchange(ours, post)).endswith(b"Max-size:600 500\r\n")


def test_large_response_is_split_into_records(ours: Running) -> None:
    records = exchange(ours, whole_request("FIF=noise.tif&CVT=png"))
    chunks = [c for k, _, c in records if k == STDOUT]
    assert len(chunks) >= 3 and chunks[-1] == b""
    body = stdout_of(records).split(b"\r\n\r\n", 1)[1]
    assert body.startswith(b"\x89PNG")


def test_kept_connection_serves_several_requests(ours: Running) -> None:
    with ours.connect() as sock:
        for n, tile in enumerate((0, 1, 0, 1), start=1):
            sock.sendall(whole_request(f"FIF=rgb.tif&JTL=2,{tile}", request_id=n, keep=True))
            out = stdout_of(read_until_end(sock, n), n)
            jpeg = out.split(b"\r\n\r\n", 1)[1]
            assert simplejpeg.decode_jpeg(jpeg).shape == (256, 256, 3)


def test_pairs_split_anywhere_and_bytes_one_by_one(ours: Running) -> None:
    """A name-value pair may span PARAMS records (flup drops such requests)."""
    params = encode_params(cgi_params("FIF=rgb.tif&OBJ=Tile-size"))
    pieces = [params[i : i + 5] for i in range(0, len(params), 5)]
    payload = (
        begin()
        + b"".join(record(PARAMS, 1, p) for p in pieces)
        + record(PARAMS, 1)
        + record(STDIN, 1)
    )
    with ours.connect() as sock:
        for i in range(len(payload)):
            sock.send(payload[i : i + 1])
        out = stdout_of(read_records(sock))
    assert out.endswith(b"Tile-size:256 256\r\n")


def test_management_records(ours: Running) -> None:
    asked = encode_params([("FCGI_MAX_CONNS", ""), ("FCGI_MPXS_CONNS", ""), ("OTHER", "")])
    with ours.connect() as sock:
        sock.sendall(record(GET_VALUES, 0, asked))
        sock.sendall(record(42, 0, b"x"))
        sock.sendall(whole_request("FIF=rgb.tif&OBJ=Tile-size"))
        records = read_records(sock)
    kinds = [(k, r) for k, r, _ in records]
    assert kinds[:2] == [(GET_VALUES_RESULT, 0), (UNKNOWN_TYPE, 0)]
    values = dict(
        (n.decode(), v.decode()) for n, v in __import__("fcgi_client").decode_params(records[0][2])
    )
    assert values == {"FCGI_MAX_CONNS": "1", "FCGI_MPXS_CONNS": "0"}
    assert records[1][2] == bytes([42]) + bytes(7)
    assert stdout_of(records).endswith(b"Tile-size:256 256\r\n")


def test_other_roles_and_multiplexing_are_refused(ours: Running) -> None:
    records = exchange(ours, begin(role=AUTHORIZER) + stream(PARAMS, 1, b""))
    assert records == [(END, 1, struct.pack(">IB3x", 0, 3))]  # FCGI_UNKNOWN_ROLE
    second = begin(2) + stream(PARAMS, 2, b"") + stream(STDIN, 2, b"")
    payload = whole_request("FIF=rgb.tif&OBJ=Tile-size").replace(
        record(STDIN, 1), second + record(STDIN, 1)
    )
    records = exchange(ours, payload)
    assert (END, 2, struct.pack(">IB3x", 0, 1)) in records  # FCGI_CANT_MPX_CONN
    assert stdout_of(records, 1).endswith(b"Tile-size:256 256\r\n")
    assert stdout_of(records, 2) == b""


def test_aborted_request_gets_no_output(ours: Running) -> None:
    params = encode_params(cgi_params("FIF=rgb.tif&JTL=0,0"))
    records = exchange(ours, begin() + stream(PARAMS, 1, params) + record(ABORT, 1))
    assert records == [(END, 1, struct.pack(">IB3x", 0, 0))]


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x02" + bytes(7),  # FastCGI version 2
        begin() + record(PARAMS, 1, b"\x7f\x7fshort"),  # pair longer than the data
        begin() + record(STDIN, 1),  # body before the parameters ended
        begin() + record(PARAMS, 1, encode_params([("A", "b")])),  # then the peer goes away
    ],
)
def test_broken_peers_lose_only_their_connection(ours: Running, garbage: bytes) -> None:
    with ours.connect() as sock:
        sock.sendall(garbage)
        sock.shutdown(socket.SHUT_WR)
        assert stdout_of(read_records(sock)) == b""
    ok = stdout_of(exchange(ours, whole_request("FIF=rgb.tif&OBJ=Tile-size")))
    assert ok.endswith(b"Tile-size:256 256\r\n")


class Exploding:
    def respond(self, environ: dict[str, Any]) -> Any:
        raise RuntimeError("secret detail /srv/data")

    def clear_caches(self) -> None:
        pass


def test_application_fault_is_a_bare_500() -> None:
    running = Running(fastcgi.Worker, Exploding())
    try:
        out = stdout_of(exchange(running, whole_request("FIF=x&JTL=0,0")))
        assert out.startswith(b"Status: 500 Internal Server Error\r\n")
        assert b"secret" not in out and b"Traceback" not in out
        again = stdout_of(exchange(running, whole_request("FIF=x&JTL=0,0")))
        assert again.startswith(b"Status: 500")
    finally:
        running.stop()


def test_stalled_request_times_out(monkeypatch: pytest.MonkeyPatch, app: Any) -> None:
    monkeypatch.setattr(fastcgi, "_TIMEOUT", struct.pack("ll", 0, 300_000))  # 0.3 s
    running = Running(fastcgi.Worker, app)
    try:
        with running.connect() as stalled:
            stalled.sendall(begin())
            started = time.monotonic()
            assert stalled.recv(100) == b""  # closed by the worker
            assert time.monotonic() - started < 5
        ok = stdout_of(exchange(running, whole_request("FIF=rgb.tif&OBJ=Tile-size")))
        assert ok.endswith(b"Tile-size:256 256\r\n")
    finally:
        running.stop()


def test_pairs_codec_round_trip() -> None:
    pairs = {"A": "", "B" * 200: "v" * 70000, "Q": "é", "": "x"}
    assert fastcgi.decode_pairs(fastcgi.encode_pairs(pairs)) == pairs
    with pytest.raises(fastcgi.ProtocolViolation):
        fastcgi.decode_pairs(b"\x05")
    rng = np.random.default_rng(3)
    for _ in range(200):  # random bytes: a clean error or a dict, never anything else
        data = rng.integers(0, 256, size=int(rng.integers(1, 40)), dtype=np.uint8).tobytes()
        with contextlib.suppress(fastcgi.ProtocolViolation):
            assert isinstance(fastcgi.decode_pairs(data), dict)
