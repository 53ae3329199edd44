"""Hostile files under the data root: each gets a clean error, the others are still served.

The corpus is generated here (seeded, small): truncated and corrupted TIFFs, files that are
not TIFFs, tags with absurd values (offsets past the end, byte counts of 2^40, dimensions of
2^31-1 and 2^40, 65536² tiles, IFD chains that loop, odd bits and samples per pixel, unknown
compressions, planar configuration garbage), garbage and bomb tiles (JPEG and deflate), and
special files (symlinks to /dev/zero, FIFOs). Every request kind goes through the in-process
WSGI app under a time limit and an address-space limit: the answer must be a 4xx, or a 500
with the generic body, never a traceback, a hang, a huge allocation or the data root's path.
One test sends the whole corpus to the real FastCGI daemon and checks its worker survived.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import simplejpeg
import tifffile
from conftest import ImageSet, _our_process
from images import pyramid_levels, rgb_image, write_pyramid
from wsgi_client import Reply, call

from iipserver.app import make_app
from iipserver.errors import ImageReadError
from iipserver.settings import Settings

GOOD = "good.tif"
#: Every request kind, with ``{n}`` for the image name.
QUERIES = (
    "FIF={n}&OBJ=IIP,1.0&OBJ=Max-size&OBJ=Tile-size&OBJ=Resolution-number",
    "FIF={n}&JTL=0,0",
    "FIF={n}&JTL=1,0",
    "FIF={n}&JTL=2,3",
    "FIF={n}&CVT=jpeg&WID=200",
    "FIF={n}&WID=200&CVT=jpeg",
    "IIIF={n}/info.json",
    "IIIF={n}/full/max/0/default.jpg",
    "FIF={n}&INFO",
)
#: Seconds one request may take.
REQUEST_TIMEOUT = 20.0
#: Address space the test process may grow by while hostile requests run.
MEMORY_HEADROOM = 1536 << 20

# --------------------------------------------------------------------------------------
# Building the corpus


@dataclass(frozen=True)
class Entry:
    """One IFD entry: where it is, and its type, count and value (or value offset)."""

    offset: int
    code: int
    dtype: int
    count: int
    valueoffset: int


@dataclass
class Layout:
    """Where things are in a TIFF written by tifffile."""

    bigtiff: bool
    ifds: list[int]
    entries: list[dict[int, Entry]]
    tiles: list[list[tuple[int, int]]]

    @property
    def entry_size(self) -> int:
        return 20 if self.bigtiff else 12

    def ifd_span(self, page: int) -> tuple[int, int]:
        """(start, end) of the IFD of ``page``: count, entries, next-IFD offset."""
        start = self.ifds[page]
        head, tail = (8, 8) if self.bigtiff else (2, 4)
        return start, start + head + len(self.entries[page]) * self.entry_size + tail


def layout(path: Path) -> Layout:
    with tifffile.TiffFile(path) as tif:
        pages = [tif.pages[i] for i in range(len(tif.pages))]
        entries = [
            {
                t.code: Entry(t.offset, t.code, int(t.dtype), t.count, t.valueoffset)
                for t in p.tags.values()
            }
            for p in pages
        ]
        tiles = [
            [(int(o), int(c)) for o, c in zip(p.dataoffsets, p.databytecounts, strict=True)]
            for p in pages
        ]
        return Layout(tif.is_bigtiff, [p.offset for p in pages], entries, tiles)


def set_entry(
    buf: bytearray, lay: Layout, entry: Entry, dtype: int, count: int, value: int
) -> None:
    """Rewrite an entry's type, count and inline value (little-endian)."""
    if lay.bigtiff:
        struct.pack_into("<HHQQ", buf, entry.offset, entry.code, dtype, count, value)
    else:
        struct.pack_into("<HHII", buf, entry.offset, entry.code, dtype, count, value)


def set_values(buf: bytearray, entry: Entry, values: list[int]) -> None:
    """Overwrite the values of an entry where they are (inline or not), keeping its type."""
    fmt = {3: "H", 4: "I", 13: "I", 16: "Q", 18: "Q"}[entry.dtype]
    for i, v in enumerate(values[: entry.count]):
        struct.pack_into("<" + fmt, buf, entry.valueoffset + i * struct.calcsize(fmt), v)


def append_values(buf: bytearray, lay: Layout, entry: Entry, dtype: int, values: list[int]) -> None:
    """Store ``values`` (type ``dtype``) at the end of the file and point ``entry`` at them."""
    if len(buf) % 2:
        buf.append(0)
    at = len(buf)
    buf += struct.pack(f"<{len(values)}" + {3: "H", 4: "I", 16: "Q"}[dtype], *values)
    set_entry(buf, lay, entry, dtype, len(values), at)


def set_next_ifd(buf: bytearray, lay: Layout, page: int, target: int) -> None:
    end = lay.ifd_span(page)[1]
    if lay.bigtiff:
        struct.pack_into("<Q", buf, end - 8, target)
    else:
        struct.pack_into("<I", buf, end - 4, target)


#: What a corpus file may answer with 200: nothing, its metadata only (the tags are sound
#: but the tile data is not), or anything (the damage may leave a readable image).
NOTHING, METADATA, ANYTHING = "nothing", "metadata", "anything"
#: The request kinds that read no pixels of a uint8 image.
METADATA_QUERIES = frozenset({QUERIES[0], QUERIES[6], QUERIES[8]})


@dataclass(frozen=True)
class Hostile:
    """One corpus file: its name and what it may answer with 200."""

    name: str
    may_succeed: str = NOTHING


Mutation = Callable[[bytearray, Layout], bytes | bytearray | None]


def _pyramid(root: Path, name: str, **kwargs: object) -> Path:
    levels = pyramid_levels(rgb_image(512, 384), tile=128)
    return write_pyramid(root / name, levels, tile=(128, 128), photometric="rgb", **kwargs)  # type: ignore[arg-type]


def first_page(code: int, dtype: int, value: int, also: int | None = None) -> Mutation:
    """Set tag ``code`` (and ``also``) of the first page to one ``value`` of type ``dtype``."""

    def change(b: bytearray, lay: Layout) -> None:
        for c in (code, also) if also else (code,):
            set_entry(b, lay, lay.entries[0][c], dtype, 1, value)

    return change


class CorpusWriter:
    """Writes corpus files into ``root`` from base pyramids, and lists them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.rng = np.random.default_rng(20240302)
        bases = root / "_bases"
        bases.mkdir()
        self.raw = _pyramid(bases, "raw.tif")
        self.deflate = _pyramid(bases, "deflate.tif", compression="zlib")
        self.jpeg = _pyramid(bases, "jpeg.tif", compression="jpeg")
        self.big = _pyramid(bases, "big.tif", bigtiff=True)
        self.subifds = _pyramid(bases, "subifds.tif", layout="subifds")
        self.corpus: list[Hostile] = []

    def mutate(self, name: str, base: Path, change: Mutation, may_succeed: str = NOTHING) -> None:
        """Write ``name``: ``base`` changed by ``change`` (in place, or returning new bytes)."""
        buf = bytearray(base.read_bytes())
        out = change(buf, layout(base))
        (self.root / name).write_bytes(bytes(buf if out is None else out))
        self.corpus.append(Hostile(name, may_succeed))

    def write(self, name: str, data: bytes) -> None:
        (self.root / name).write_bytes(data)
        self.corpus.append(Hostile(name))


def _truncated(w: CorpusWriter) -> None:
    """Truncated: in the header, in an IFD, in tile data (first page and last page)."""
    lay = layout(w.raw)
    first_tile = lay.tiles[-1][0]
    for name, cut in {
        "trunc_header6.tif": 6,
        "trunc_header12.tif": 12,
        "trunc_ifd0.tif": lay.ifds[0] + 30,
        "trunc_tile.tif": lay.tiles[0][0][0] + lay.tiles[0][0][1] // 2,
        "trunc_tiles_half.tif": lay.tiles[0][len(lay.tiles[0]) // 2][0],
        "trunc_last_ifd.tif": lay.ifds[-1] + 40,
        "trunc_last_tile.tif": first_tile[0] + 100,
    }.items():
        w.mutate(name, w.raw, lambda b, _, cut=cut: b[:cut], may_succeed=ANYTHING)
    w.mutate("trunc_deflate_tile.tif", w.deflate, lambda b, lay: b[: lay.tiles[0][3][0] + 10])


def _corrupted(w: CorpusWriter) -> None:
    """Corrupt bytes in IFDs (structure) and tile data (seeded)."""
    for seed in range(6):
        for base in (w.raw, w.deflate):

            def corrupt_ifd(b: bytearray, lay: Layout, seed: int = seed) -> None:
                r = np.random.default_rng(seed)
                for _ in range(6):
                    start, end = lay.ifd_span(int(r.integers(len(lay.ifds))))
                    b[int(r.integers(start, end))] = int(r.integers(256))

            w.mutate(f"corrupt_ifd_{base.stem}{seed}.tif", base, corrupt_ifd, ANYTHING)
    for seed in range(3):
        for base in (w.deflate, w.jpeg):

            def corrupt_tiles(b: bytearray, lay: Layout, seed: int = seed) -> None:
                r = np.random.default_rng(100 + seed)
                for page in lay.tiles:
                    for offset, count in page:
                        at = offset + int(r.integers(0, count))
                        b[at : at + 16] = r.bytes(16)

            w.mutate(f"corrupt_tiles_{base.stem}{seed}.tif", base, corrupt_tiles, ANYTHING)


def _not_tiffs(w: CorpusWriter) -> None:
    """Not TIFFs at all."""
    w.write("empty.tif", b"")
    w.write("text.tif", b"This is not an image, only some text.\n" * 20)
    w.write("png.tif", imagecodecs.png_encode(rgb_image(64, 48)))
    w.write("jpeg.tif", simplejpeg.encode_jpeg(rgb_image(64, 48)))
    w.write("random.tif", w.rng.bytes(4096))
    w.write("random_magic.tif", b"II*\x00" + w.rng.bytes(4092))
    w.write("random_bigmagic.tif", b"II+\x00\x08\x00\x00\x00" + w.rng.bytes(4088))


def _outside_the_file(w: CorpusWriter) -> None:
    """Tile offsets and byte counts that point outside the file."""

    def offsets(value: Callable[[int], int]) -> Mutation:
        def change(b: bytearray, lay: Layout) -> None:
            for page in lay.entries:
                set_values(b, page[324], [value(len(b))] * page[324].count)

        return change

    w.mutate("offsets_past_end.tif", w.raw, offsets(lambda size: size + 1000))
    w.mutate("offsets_near_end.tif", w.deflate, offsets(lambda size: size - 10))
    w.mutate("offsets_zero.tif", w.deflate, offsets(lambda size: 0), METADATA)

    def counts(value: int) -> Mutation:
        def change(b: bytearray, lay: Layout) -> None:
            for page in lay.entries:
                entry = page[325]
                append_values(b, lay, entry, 16 if value >> 32 else 4, [value] * entry.count)

        return change

    w.mutate("counts_4g.tif", w.raw, counts(0xFFFFFFFF))
    w.mutate("counts_4g_deflate.tif", w.deflate, counts(0xFFFFFFFF))
    w.mutate("counts_2p40.tif", w.big, counts(1 << 40))


def _absurd_sizes(w: CorpusWriter) -> None:
    """Absurd dimensions and tile sizes (first page: the full resolution)."""

    w.mutate("width_2p31.tif", w.raw, first_page(256, 4, 2**31 - 1, 257))
    w.mutate("width_2p31_only.tif", w.raw, first_page(256, 4, 2**31 - 1))
    w.mutate("width_2p40.tif", w.big, first_page(256, 16, 1 << 40, 257))
    w.mutate("width_0.tif", w.raw, first_page(256, 4, 0))
    w.mutate("tile_65536.tif", w.raw, first_page(322, 4, 65536, 323))
    w.mutate("tile_65535_deflate.tif", w.deflate, first_page(322, 3, 65535, 323))
    w.mutate("tile_0.tif", w.raw, first_page(322, 3, 0, 323))
    w.mutate("tile_16_huge.tif", w.raw, first_page(322, 3, 16, 323))

    def tiny_tiles_huge_image(b: bytearray, lay: Layout) -> None:
        for code in (256, 257):
            set_entry(b, lay, lay.entries[0][code], 4, 1, 1 << 20)
        for code in (322, 323):
            set_entry(b, lay, lay.entries[0][code], 3, 1, 16)
        for code in (324, 325):  # claim 2^32 tiles, values "somewhere" in the file
            entry = lay.entries[0][code]
            set_entry(b, lay, entry, 4, 0xFFFFFFFF, 16)

    w.mutate("tiles_16_count_2p32.tif", w.raw, tiny_tiles_huge_image)


def _loops(w: CorpusWriter) -> None:
    """IFD chains that loop, and SubIFDs pointing back at the first IFD."""
    w.mutate(
        "ifd_loop_self.tif", w.raw, lambda b, lay: set_next_ifd(b, lay, 0, lay.ifds[0]), ANYTHING
    )
    w.mutate(
        "ifd_loop_back.tif", w.raw, lambda b, lay: set_next_ifd(b, lay, 2, lay.ifds[1]), ANYTHING
    )
    w.mutate(
        "subifd_loop.tif",
        w.subifds,
        lambda b, lay: set_values(b, lay.entries[0][330], [lay.ifds[0]] * 2),
        ANYTHING,
    )


def _bad_formats(w: CorpusWriter) -> None:
    """Bits and samples per pixel, compression, planar configuration."""
    for bps in (0, 7, 13, 24, 64, 65535):
        w.mutate(
            f"bps_{bps}.tif",
            w.raw,
            lambda b, lay, bps=bps: set_values(b, lay.entries[0][258], [bps] * 3),
        )
    for spp in (0, 65535):
        w.mutate(f"spp_{spp}.tif", w.raw, first_page(277, 3, spp))
    for code in (12345, 34712, 34933, 50001, 50002, 0):
        w.mutate(f"compression_{code}.tif", w.raw, first_page(259, 3, code))
    for planar in (0, 2, 7, 65535):
        w.mutate(f"planar_{planar}.tif", w.raw, first_page(284, 3, planar))


def _bad_tiles(w: CorpusWriter) -> None:
    """JPEG tiles: random garbage, garbage after a valid SOI, a SOF declaring 60000², and a deflate tile that inflates to 256 MiB (far more than a 128² RGB tile)."""

    def jpeg_garbage(keep_soi: bool) -> Mutation:
        def change(b: bytearray, lay: Layout) -> None:
            r = np.random.default_rng(7)
            for page in lay.tiles:
                for offset, count in page:
                    b[offset : offset + count] = r.bytes(count)
                    if keep_soi:
                        b[offset : offset + 2] = b"\xff\xd8"

        return change

    w.mutate("jpeg_garbage.tif", w.jpeg, jpeg_garbage(False), METADATA)
    # with a valid SOI, pass-through may send the stored bytes as they are
    w.mutate("jpeg_garbage_soi.tif", w.jpeg, jpeg_garbage(True), ANYTHING)

    def jpeg_sof_bomb(b: bytearray, lay: Layout) -> None:
        for page in lay.tiles:
            for offset, count in page:
                sof = bytes(b[offset : offset + count]).find(b"\xff\xc0")
                struct.pack_into(">HH", b, offset + sof + 5, 60000, 60000)

    w.mutate("jpeg_sof_bomb.tif", w.jpeg, jpeg_sof_bomb, METADATA)

    def zip_bomb(b: bytearray, lay: Layout) -> None:
        packer = zlib.compressobj(9)
        block = b"\x00" * (1 << 20)
        stream = b"".join(packer.compress(block) for _ in range(256)) + packer.flush()
        at = len(b)
        b += stream
        for page in lay.entries:
            append_values(b, lay, page[324], 4, [at] * page[324].count)
            append_values(b, lay, page[325], 4, [len(stream)] * page[325].count)
        return None

    w.mutate("zip_bomb.tif", w.deflate, zip_bomb, METADATA)


def _tiny_tiles(w: CorpusWriter) -> None:
    """16x16 tiles on a 4096x4096 image: 65536 tiles, all stored as one shared tile (a sound file whose CVT would touch every tile: the region budget must refuse it, quickly)."""

    def tiny_tiles(b: bytearray, lay: Layout) -> None:
        for code in (256, 257):
            set_entry(b, lay, lay.entries[0][code], 4, 1, 4096)
        for code in (322, 323):
            set_entry(b, lay, lay.entries[0][code], 3, 1, 16)
        offset, _ = lay.tiles[0][0]
        append_values(b, lay, lay.entries[0][324], 4, [offset] * 65536)
        append_values(b, lay, lay.entries[0][325], 4, [16 * 16 * 3] * 65536)
        set_next_ifd(b, lay, 0, 0)

    w.mutate("tiny_tiles.tif", w.raw, tiny_tiles, ANYTHING)


def _special_files(w: CorpusWriter) -> None:
    """Special files: a directory, a symlink loop, /dev/zero, a FIFO and a symlink to it."""
    (w.root / "directory.tif").mkdir()
    os.symlink("loop_b.tif", w.root / "loop_a.tif")
    os.symlink("loop_a.tif", w.root / "loop_b.tif")
    os.symlink("/dev/zero", w.root / "zero.tif")
    os.mkfifo(w.root / "fifo.tif")
    os.symlink("fifo.tif", w.root / "fifo_link.tif")
    w.corpus += [Hostile(n) for n in ("directory.tif", "loop_a.tif", "zero.tif")]
    w.corpus += [Hostile("fifo.tif"), Hostile("fifo_link.tif")]


def _zarr_stores(w: CorpusWriter) -> None:
    """zarr: broken metadata, absurd shapes and chunks."""

    def zarr_dir(name: str, zarray: object) -> None:
        path = w.root / name
        path.mkdir()
        text = zarray if isinstance(zarray, str) else json.dumps(zarray)
        (path / ".zarray").write_text(text)
        w.corpus.append(Hostile(name))

    meta = {
        "zarr_format": 2, "dtype": "<f4", "order": "C", "fill_value": 0.0,
        "compressor": None, "filters": None,
    }  # fmt: skip
    zarr_dir("zarr_garbage.zarr", "{not json")
    zarr_dir("zarr_huge.zarr", {**meta, "shape": [1 << 40, 1 << 40], "chunks": [256, 256]})
    w.corpus[-1] = Hostile("zarr_huge.zarr")
    zarr_dir("zarr_chunk.zarr", {**meta, "shape": [100000, 100000], "chunks": [100000, 100000]})
    zarr_dir("zarr_1d.zarr", {**meta, "shape": [100], "chunks": [10]})


def build_corpus(root: Path) -> list[Hostile]:
    """Write the good image and every hostile file into ``root``; return the hostile ones."""
    _pyramid(root, GOOD, compression="zlib")
    w = CorpusWriter(root)
    _truncated(w)
    _corrupted(w)
    _not_tiffs(w)
    _outside_the_file(w)
    _absurd_sizes(w)
    _loops(w)
    _bad_formats(w)
    _bad_tiles(w)
    _tiny_tiles(w)
    _special_files(w)
    _zarr_stores(w)
    return w.corpus


@dataclass
class Corpus:
    root: Path
    files: list[Hostile]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("hostile")
    return Corpus(root, build_corpus(root))


# --------------------------------------------------------------------------------------
# Guards: time and memory


def run_with_timeout(function: Callable[[], Reply], seconds: float = REQUEST_TIMEOUT) -> Reply:
    """Run ``function`` in a thread; fail if it takes longer than ``seconds`` or raises."""
    result: list[Reply] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(function())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"request still running after {seconds:.0f} s")
    if errors:
        raise AssertionError(f"the app raised {errors[0]!r}") from errors[0]
    return result[0]


def _address_space() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def memory_limit(headroom: int = MEMORY_HEADROOM) -> Iterator[None]:
    """Let the process's address space grow by at most ``headroom`` bytes (RLIMIT_AS)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _address_space() + headroom
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def check_reply(reply: Reply, query: str, root: Path, may_succeed: bool) -> None:
    """A well-formed answer: 4xx, or 500 with the generic body; never a path or traceback."""
    text = reply.body.decode("latin-1")
    assert "Traceback" not in text and "MemoryError" not in text, (query, text)
    for secret in {str(root), os.path.realpath(root)}:
        assert secret not in text, (query, text)
        assert all(secret not in v for _, v in reply.headers), (query, reply.headers)
    assert reply.header("Content-Type"), (query, reply.headers)
    assert reply.header("Content-Length") in (None, str(len(reply.body))), query
    if reply.status == 200 and may_succeed:
        return
    assert 400 <= reply.status < 600, (query, reply.status, text[:200])
    if reply.status >= 500:
        assert reply.status == 500 and reply.body.strip() == b"Internal server error", (
            query,
            text[:200],
        )


def no_memory_errors(caplog: pytest.LogCaptureFixture) -> None:
    """No request tried (and failed) to allocate its way through a hostile file."""
    for record in caplog.records:
        if record.exc_info and isinstance(record.exc_info[1], MemoryError):
            raise AssertionError(f"MemoryError: {record.getMessage()}") from record.exc_info[1]


def check_good(app: object) -> None:
    reply = run_with_timeout(lambda: call(app, f"FIF={GOOD}&WID=256&CVT=jpeg"))
    assert reply.status == 200, reply.body[:200]
    pixels = simplejpeg.decode_jpeg(reply.body)
    expected = rgb_image(512, 384)[::2, ::2]
    assert pixels.shape == (192, 256, 3)
    assert np.abs(pixels.astype(int) - expected.astype(int)).mean() < 3
    reply = run_with_timeout(lambda: call(app, f"FIF={GOOD}&JTL=2,0"))
    assert reply.status == 200
    tile = simplejpeg.decode_jpeg(reply.body)
    assert np.abs(tile.astype(int) - rgb_image(512, 384)[:128, :128].astype(int)).mean() < 3


def make_corpus_app(root: Path, **settings: str):  # type: ignore[no-untyped-def]
    return make_app(Settings.from_environ({"FILESYSTEM_PREFIX": f"{root}/", **settings}))


# --------------------------------------------------------------------------------------
# In-process


@pytest.mark.parametrize("passthrough", ["1", "0"])
def test_hostile_corpus(corpus: Corpus, passthrough: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="iipserver")
    app = make_corpus_app(corpus.root, CODEC_PASSTHROUGH=passthrough)
    check_good(app)
    failures = []
    with memory_limit():
        for hostile in corpus.files:
            for template in QUERIES:
                query = template.format(n=hostile.name)
                may_succeed = hostile.may_succeed == ANYTHING or (
                    hostile.may_succeed == METADATA and template in METADATA_QUERIES
                )
                reply = run_with_timeout(lambda query=query: call(app, query))
                try:
                    check_reply(reply, query, corpus.root, may_succeed)
                except AssertionError as exc:
                    failures.append(f"{query}: {exc}")
                # twice: the second request comes from the pool's remembered state
                again = run_with_timeout(lambda query=query: call(app, query))
                if again.status != reply.status:
                    failures.append(f"{query}: {reply.status} then {again.status}")
    assert not failures, "\n".join(failures)
    no_memory_errors(caplog)
    check_good(app)


def test_hostile_files_never_answer_500(corpus: Corpus) -> None:
    """The corpus is the client's problem, not the server's: no 500 for any of it."""
    app = make_corpus_app(corpus.root)
    bad = []
    with memory_limit():
        for hostile in corpus.files:
            for template in QUERIES:
                query = template.format(n=hostile.name)
                reply = run_with_timeout(lambda query=query: call(app, query))
                if reply.status >= 500:
                    bad.append(query)
    assert not bad, bad


# --------------------------------------------------------------------------------------
# Files replaced or deleted while being served


def _decoded_tile(reply: Reply) -> np.ndarray:
    assert reply.status == 200, reply.body[:200]
    return simplejpeg.decode_jpeg(reply.body)


def _same_version(path: Path, data: bytes) -> None:
    """Rewrite ``path`` in place with ``data`` (same size) and give it back its mtime: the
    pool sees the same file version, only the tile reads see the new bytes."""
    before = path.stat()
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size


@pytest.fixture
def served(tmp_path: Path) -> tuple[Path, object]:
    _pyramid(tmp_path, GOOD, compression="zlib")
    _pyramid(tmp_path, "x.tif", compression="zlib")
    return tmp_path, make_corpus_app(tmp_path)


def test_file_replaced_atomically_between_requests(served: tuple[Path, object]) -> None:
    root, app = served
    target = root / "x.tif"
    good = target.read_bytes()
    _decoded_tile(run_with_timeout(lambda: call(app, "FIF=x.tif&JTL=2,0")))
    # half the file keeps the full-resolution page: it may still be served at that level
    for data, partial in (
        (b"", False), (b"not a tiff at all", False), (good[:200], False),
        (good[: len(good) // 2], True),
    ):  # fmt: skip
        (root / "tmp").write_bytes(data)
        os.replace(root / "tmp", target)
        for template in QUERIES:
            query = template.format(n="x.tif")
            reply = run_with_timeout(lambda query=query: call(app, query))
            check_reply(reply, query, root, partial)
    (root / "tmp").write_bytes(good)
    os.replace(root / "tmp", target)
    tile = _decoded_tile(run_with_timeout(lambda: call(app, "FIF=x.tif&JTL=2,0")))
    assert np.abs(tile.astype(int) - rgb_image(512, 384)[:128, :128].astype(int)).mean() < 3
    check_good(app)


def test_file_rewritten_in_place_between_metadata_and_tiles(served: tuple[Path, object]) -> None:
    """The pool keeps the opened source (same inode, size and mtime) while the bytes under
    its tile offsets change: tile reads fail cleanly, the metadata already read stays."""
    root, app = served
    target = root / "x.tif"
    good = target.read_bytes()
    call(app, "FIF=x.tif&OBJ=Max-size")
    _decoded_tile(run_with_timeout(lambda: call(app, "FIF=x.tif&JTL=2,0")))
    rng = np.random.default_rng(5)
    _same_version(target, good[:16] + rng.bytes(len(good) - 16))
    for tile in ("2,5", "2,7", "1,2", "0,0"):
        query = f"FIF=x.tif&JTL={tile}"
        check_reply(run_with_timeout(lambda query=query: call(app, query)), query, root, False)
    query = "FIF=x.tif&WID=300&CVT=jpeg"
    check_reply(run_with_timeout(lambda: call(app, query)), query, root, False)
    # truncated in place: a new size, so a new version, which no longer opens
    with open(target, "r+b") as f:
        f.truncate(len(good) // 3)
    for template in QUERIES:
        query = template.format(n="x.tif")
        check_reply(run_with_timeout(lambda query=query: call(app, query)), query, root, False)
    check_good(app)


def test_file_changed_under_an_open_source(served: tuple[Path, object]) -> None:
    """Between the metadata read and the tile read of one request: truncated, deleted
    (with the file handle closed in between) or replaced by a FIFO."""
    root, app = served
    target = root / "x.tif"
    good = target.read_bytes()
    opened = app.pool.get(str(target))  # type: ignore[attr-defined]
    with open(target, "r+b") as f:
        f.truncate(len(good) // 3)
    with pytest.raises(ImageReadError):
        for r, level in enumerate(opened.source.info.levels):
            for index in range(level.tile_count):
                opened.source.read_tile(r, index)
    target.write_bytes(good)
    opened = app.pool.get(str(target))  # type: ignore[attr-defined]
    opened.source.close()
    target.unlink()
    with pytest.raises(ImageReadError):
        opened.source.read_tile(2, 0)
    os.mkfifo(target)

    def read_from_fifo() -> Exception | None:
        try:
            opened.source.read_tile(2, 0)
        except ImageReadError as exc:
            return exc
        return None

    assert isinstance(run_with_timeout(read_from_fifo), ImageReadError)  # type: ignore[arg-type]
    for template in QUERIES:
        query = template.format(n="x.tif")
        check_reply(run_with_timeout(lambda query=query: call(app, query)), query, root, False)
    target.unlink()
    for template in QUERIES:
        query = template.format(n="x.tif")
        reply = run_with_timeout(lambda query=query: call(app, query))
        check_reply(reply, query, root, False)
        assert reply.status == 404, query
    check_good(app)


# --------------------------------------------------------------------------------------
# Through the FastCGI daemon


def test_fastcgi_worker_survives_the_corpus(
    corpus: Corpus, tmp_path_factory: pytest.TempPathFactory
) -> None:
    server = _our_process(
        ImageSet(corpus.root, {}), tmp_path_factory.mktemp("hostile-fcgi"), STATUS_ENDPOINT="1"
    )
    server.request_timeout = REQUEST_TIMEOUT
    server.start()
    try:
        pid = json.loads(server.get("STATUS").body)["pid"]
        failures = []
        for hostile in corpus.files:
            for template in QUERIES:
                query = template.format(n=hostile.name)
                reply = server.get(query)
                ok = hostile.may_succeed == ANYTHING or (
                    hostile.may_succeed == METADATA and template in METADATA_QUERIES
                )
                if not (400 <= reply.status < 600 or (ok and reply.status == 200)):
                    failures.append(f"{query}: {reply.status}")
                if str(corpus.root) in reply.body.decode("latin-1"):
                    failures.append(f"{query}: the data root in {reply.body[:200]!r}")
        assert not failures, "\n".join(failures)
        assert server.alive() and not server.crashes, server.crashes
        assert json.loads(server.get("STATUS").body)["pid"] == pid, "the worker was replaced"
        reply = server.get(f"FIF={GOOD}&WID=256&CVT=jpeg")
        assert reply.status == 200
        assert simplejpeg.decode_jpeg(reply.body).shape == (192, 256, 3)
    finally:
        server.stop()
