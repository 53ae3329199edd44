"""FITS benchmarks: first-tile latency from a cold start, and the converter's throughput.

    python bench/fits.py [--size 16384] [--repeat 3] [--results bench/RESULTS.md] [--json F]
    python bench/fits.py --smoke          # 2048², one run: checks that everything works

Data: a seeded ``size``² float32 star field with a TAN WCS, written as a plain FITS file (big-
endian, row bands, so memory stays low) into ``$TMPDIR/iipserver-bench-data/fits`` and reused.

First tile, from a cold start: for each case a new ``iipserver serve`` (2 workers) with an
empty ``PYRAMID_CACHE_DIR`` is started and waited for; then one request is timed, end to end
over HTTP on loopback:

- ``lowest level`` ``JTL=0,0``: the tile a viewer asks first. Its footprint is the whole image,
  so it is answered once every reduced level is built into the cache (one streaming pass).
- ``full resolution`` ``JTL=<top>,<middle tile>``: read from the memory-mapped file.
- ``level top-3`` (a 2048² footprint): computed from full resolution while the build runs in
  the background.
- ``OBJ`` (``Max-size``, ``Min-Max-sample-values``): opening the file and its default cuts.

When the script may write ``/proc/sys/vm/drop_caches`` (root, not in a container that forbids
it) the page cache is dropped before each case, so the file is read from disk; the report says
which. Converter: ``iipserver convert`` of the same file, per compression, wall-clock time and
Mpixel/s (full-resolution pixels per second); STIFF's published 5–25 Mpixel/s is the yardstick.
"""

from __future__ import annotations

import sys
from pathlib import Path

# this folder holds bench/http.py, which would shadow the standard library's http package
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BEGIN = "<!-- bench/fits.py: begin generated section -->"
END = "<!-- bench/fits.py: end generated section -->"
TILE = 256


def data_dir() -> Path:
    return Path(tempfile.gettempdir()) / "iipserver-bench-data" / "fits"


def _card(key: str, value: object) -> str:
    if isinstance(value, bool):
        text = "T" if value else "F"
    elif isinstance(value, str):
        text = f"'{value:<8}'"
    else:
        text = repr(value)
    return f"{key:<8}= {text:>20}".ljust(80)


def make_fits(path: Path, size: int, seed: int = 7) -> Path:
    """A ``size``² float32 star field (noise + Gaussian stars), written band by band."""
    if path.exists() and path.stat().st_size >= size * size * 4:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    cards = [
        _card("SIMPLE", True), _card("BITPIX", -32), _card("NAXIS", 2),
        _card("NAXIS1", size), _card("NAXIS2", size), _card("OBJECT", "BENCHFIELD"),
        _card("CTYPE1", "RA---TAN"), _card("CTYPE2", "DEC--TAN"),
        _card("CRPIX1", size / 2.0), _card("CRPIX2", size / 2.0),
        _card("CRVAL1", 150.0), _card("CRVAL2", 2.0),
        _card("CD1_1", -5.6e-5), _card("CD1_2", 0.0), _card("CD2_1", 0.0), _card("CD2_2", 5.6e-5),
        "END".ljust(80),
    ]  # fmt: skip
    header = "".join(cards).encode("ascii")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[-3:4, -3:4]
    psf = np.exp(-(xx**2 + yy**2) / 3.0).astype(np.float32)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(header + b" " * (-len(header) % 2880))
        band = 512
        for _ in range(0, size, band):
            rows = rng.normal(100.0, 5.0, (band, size)).astype(np.float32)
            for _ in range(size * band // 20000):
                x, y = int(rng.integers(3, size - 4)), int(rng.integers(3, band - 4))
                rows[y - 3 : y + 4, x - 3 : x + 4] += psf * np.float32(rng.uniform(20, 5000))
            f.write(rows.astype(">f4").tobytes())
        f.write(b"\0" * (-(size * size * 4) % 2880))
    os.replace(tmp, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def get(port: int, path: str) -> tuple[int, bytes, float]:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        body = reply.read()
    finally:
        conn.close()
    return reply.status, body, time.perf_counter() - started


class Server:
    """``iipserver serve DIR`` with an empty pyramid cache, started and ready."""

    def __init__(self, data: Path, work: Path) -> None:
        self.cache = work / "pyramids"
        shutil.rmtree(self.cache, ignore_errors=True)
        self.port = free_port()
        env = dict(os.environ, IIPSERVER_CLIENT_FETCH="0", PYRAMID_CACHE_DIR=str(self.cache))
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "iipserver", "serve", str(data), "--port", str(self.port),
             "--workers", "2"],
            env=env, stdout=subprocess.DEVNULL, stderr=open(work / "serve.log", "ab"),  # noqa: SIM115
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if get(self.port, "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError("iipserver serve did not start")
        self.ready = time.perf_counter() - self.started

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def levels_of(size: int) -> int:
    n, w = 1, size
    while w > TILE:
        w //= 2
        n += 1
    return n


def first_tiles(fits: Path, size: int, repeat: int, work: Path) -> dict:
    top = levels_of(size) - 1
    tiles = -(-size // TILE)
    middle = (tiles // 2) * tiles + tiles // 2
    mid = max(0, top - 3)
    across = -(-(size >> (top - mid)) // TILE)
    name = fits.name
    cases = {
        "lowest level": f"/iip?FIF={name}&JTL=0,0",
        "full resolution": f"/iip?FIF={name}&JTL={top},{middle}",
        f"level top-{top - mid}": f"/iip?FIF={name}&JTL={mid},{(across // 2) * across}",
        "OBJ": f"/iip?FIF={name}&OBJ=Max-size&OBJ=Min-Max-sample-values",
    }
    results: dict[str, dict] = {}
    dropped = True
    for case, path in cases.items():
        times, ready, after = [], [], []
        for _ in range(repeat):
            dropped = drop_page_cache() and dropped
            server = Server(fits.parent, work)
            try:
                status, body, seconds = get(server.port, path)
                if status != 200 or not body:
                    raise RuntimeError(f"{path}: HTTP {status}")
                times.append(seconds)
                ready.append(server.ready)
                if case == "lowest level":  # the same tile once the levels are cached
                    after.append(get(server.port, f"/iip?FIF={name}&JTL=0,0&QLT=74")[2])
            finally:
                server.stop()
        results[case] = {
            "path": path,
            "seconds": times,
            "median": statistics.median(times),
            "server_ready_median": statistics.median(ready),
        }
        if after:
            results[case]["cached_median"] = statistics.median(after)
    return {"cases": results, "page_cache_dropped": dropped}


def converter(fits: Path, size: int, repeat: int, work: Path) -> dict:
    out = work / "converted.tif"
    results = {}
    for compression in ("none", "deflate", "zstd"):
        times = []
        size_bytes = 0
        for _ in range(repeat):
            drop_page_cache()
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "iipserver", "convert", str(fits), str(out),
                 "--compression", compression, "--quiet"],
                check=True, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            times.append(time.perf_counter() - started)
            size_bytes = out.stat().st_size
            out.unlink()
        median = statistics.median(times)
        results[compression] = {
            "seconds": times,
            "median": median,
            "mpixel_per_s": size * size / 1e6 / median,
            "output_mb": size_bytes / 1e6,
        }
    return results


def markdown(doc: dict) -> str:
    size = doc["size"]
    lines = [
        BEGIN,
        "",
        f"Run {doc['date']} on {doc['machine']}: `{doc['command']}`. Image: {size}×{size} "
        f"float32 FITS ({size * size * 4 / 2**30:.2f} GiB); medians of {doc['repeat']} runs; "
        f"page cache {'dropped before each run' if doc['first_tile']['page_cache_dropped'] else 'not dropped (file in memory)'}.",  # noqa: E501
        "",
        "| first request after a cold start (empty cache) | median | runs | server ready in |",
        "|---|---:|---|---:|",
    ]
    for case, r in doc["first_tile"]["cases"].items():
        runs = ", ".join(f"{s:.2f}" for s in r["seconds"])
        lines.append(
            f"| {case} `{r['path'].split('&', 1)[1]}` | {r['median']:.2f} s | {runs} | "
            f"{r['server_ready_median']:.2f} s |"
        )
    low = doc["first_tile"]["cases"]["lowest level"]
    if "cached_median" in low:
        lines += [
            "",
            "The lowest-level tile once the levels are cached: "
            f"{low['cached_median'] * 1000:.1f} ms.",
        ]
    lines += [
        "",
        "| `iipserver convert` | median | Mpixel/s | output |",
        "|---|---:|---:|---:|",
    ]
    for compression, r in doc["converter"].items():
        lines.append(
            f"| --compression {compression} | {r['median']:.2f} s | {r['mpixel_per_s']:.1f} | "
            f"{r['output_mb']:.0f} MB |"
        )
    lines += ["", "STIFF, the usual FITS → TIFF converter, for comparison: 5–25 Mpixel/s.", "", END]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## FITS: first tile and converter (generated)\n\n"
        text += section + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16384, help="image side (default 16384)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="2048², one run")
    parser.add_argument("--results", type=Path, help="rewrite the generated section here")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    parser.add_argument("--data", type=Path, default=None, help="data directory")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.repeat = 2048, 1
    data = args.data or data_dir() / str(args.size)
    fits = make_fits(data / f"sky{args.size}.fits", args.size)
    work = Path(tempfile.mkdtemp(prefix="iipserver-bench-fits-"))
    try:
        doc = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",  # noqa: E501
            "command": "python bench/fits.py " + " ".join(sys.argv[1:]),
            "size": args.size,
            "repeat": args.repeat,
            "first_tile": first_tiles(fits, args.size, args.repeat, work),
            "converter": converter(fits, args.size, args.repeat, work),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(doc))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))
    if args.results:
        write_section(args.results, markdown(doc))


if __name__ == "__main__":
    main()
