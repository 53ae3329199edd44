"""HTTP side by side: nginx + iipserver against nginx + Debian's iipsrv 1.1, tiles per busy core.

    python bench/http.py [--seconds 5] [--repeat 3] [--concurrency 1,8,32] [--size 8192]
                         [--json out.json] [--results bench/RESULTS.md] [--smoke]

One command, one run: it makes (or reuses) the seeded data of bench/make_data.py (an 8192×8192
float32 star field with SMin/SMax, an 8192×8192 RGB JPEG pyramid and a 3-band float cube, tiled
pyramidal BigTIFF), starts the shipped nginx site (nginx/iipserver.conf, port and upstream
substituted as tests/test_nginx.py does) in front of ``python -m iipserver fcgi --workers 2``
and, beside it, in front of two ``iipsrv.fcgi`` 1.1 processes (``OMP_NUM_THREADS=1``, two
``server`` lines), same cache settings; then replays the same seeded URL lists against both, at
each concurrency, with wrk (one thread, a Lua URL rotator that counts any answer other than
``200 image/jpeg`` as an error) or a Python keep-alive client if wrk is missing:

- ``rgb-tiles``: random tiles over every level of the JPEG RGB pyramid, no processing;
- ``float-minmax-gam``: every float tile × 8 MINMAX+GAM settings, shuffled, each URL once in a
  cycle longer than any tile cache (uncached tiles);
- ``visiomatic-float``: random float tiles with MINMAX+GAM+CTW, one setting (what a VisiOmatic
  session asks for, repeats included);
- ``cube-ctw``: random tiles of the 3-band cube mixed to colour with CTW;
- ``memcached-hits``: 1000 processed float tiles replayed from memcached (each stack then has
  its own memcached, started here, warmed with one pass first);
- ``scaling``: iipserver with one worker against two, ``float-minmax-gam``.

It reads the CPU time of every server-side process (nginx master and workers, the daemons and
their workers, memcached; /proc/<pid>/stat utime+stime+cutime+cstime of every process in their
sessions) and reports tiles/s, **tiles per busy server core**, p50/p99 latency and the
iipserver/iipsrv ratios, medians over the repeats (the two servers alternate within each
repeat, so a ratio compares runs seconds apart). ``--results`` rewrites the generated section
of bench/RESULTS.md (table, bars, date, machine, command); ``--json`` keeps every run.
``--smoke`` is the 10-second version the test suite runs: small data, one repeat, one second
per run, no ratio asserted.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and this file would shadow the
# standard library's `http` package: drop the folder before importing http.client.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

REPO = _HERE.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(1, str(_HERE))

import numpy as np  # noqa: E402
from make_data import DataFile, make_data, tile_urls  # noqa: E402
from nginx_site import NGINX, main_config, site_config  # noqa: E402

IIPSRV = os.environ.get("IIPSRV_BINARY", "/usr/lib/iipimage-server/iipsrv.fcgi")
WRK = shutil.which("wrk") or ""
MEMCACHED = shutil.which("memcached") or shutil.which("memcached", path="/usr/bin:/usr/sbin") or ""
CLK_TCK = os.sysconf("SC_CLK_TCK")
ENDPOINT = "/fcgi-bin/iipsrv.fcgi"
DEFAULT_DATA = Path(tempfile.gettempdir()) / "iipserver-bench-data"

#: (name, with, target, description): the issue's bars, checked on the tiles-per-core ratio.
BARS = [
    ("float-minmax-gam", 1.5, "uncached float32 tiles, MINMAX+GAM"),
    ("rgb-tiles", 3.0, "unprocessed tiles of a JPEG RGB pyramid"),
    ("memcached-hits", 1.5, "memcached-hit replays"),
]
SCALING_TARGET = 1.8

LUA = r"""
paths = {}
idx = 1
bad = 0
threads = {}
function setup(thread)
  table.insert(threads, thread)
end
function init(args)
  for line in io.lines(args[1]) do paths[#paths + 1] = line end
  idx = (tonumber(args[2]) or 0) % #paths + 1
end
function request()
  local p = paths[idx]
  idx = idx % #paths + 1
  return wrk.format("GET", p)
end
function response(status, headers, body)
  local ct = headers["Content-Type"] or headers["content-type"]
  if status ~= 200 or ct ~= "image/jpeg" then bad = bad + 1 end
end
function done(summary, latency, requests)
  local b = 0
  for _, t in ipairs(threads) do b = b + t:get("bad") end
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %d, "duration_us": %d, "bad": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}\n',
    summary.requests, summary.duration, b, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""

# --------------------------------------------------------------------------------------------
# Scenarios

TONES = [(95, 900, 0.4545), (95, 900, 0.6), (90, 1500, 0.4545), (90, 1500, 0.8),
         (100, 600, 0.5), (100, 600, 1.5), (80, 3000, 0.35), (80, 3000, 2.0)]  # fmt: skip


@dataclass
class Scenario:
    name: str
    group: str
    """``plain`` (the stacks without memcached) or ``memcached``."""
    paths: list[str]
    file: Path = field(default=Path())


def every_tile(data_file: DataFile) -> list[tuple[int, int]]:
    return [
        (r, i)
        for r in range(data_file.levels)
        for i in range(data_file.grid(r)[0] * data_file.grid(r)[1])
    ]


def unique_float_urls(sky: DataFile, seed: int) -> list[str]:
    """Every tile of sky.tif under each of TONES, shuffled: no URL twice within a cycle."""
    urls = [
        f"{ENDPOINT}?FIF={sky.name}&MINMAX=1:{lo},{hi}&GAM={g}&JTL={r},{i}"
        for lo, hi, g in TONES
        for r, i in every_tile(sky)
    ]
    order = np.random.default_rng(seed).permutation(len(urls))
    return [urls[k] for k in order]


def scenarios(files: dict[str, DataFile], count: int) -> dict[str, Scenario]:
    sky, rgb, cube = files["sky.tif"], files["rgb.tif"], files["cube.tif"]
    floats = unique_float_urls(sky, seed=1)
    out = [
        Scenario(
            "rgb-tiles", "plain", tile_urls(ENDPOINT, "FIF=rgb.tif&JTL={r},{i}", rgb, count, 2)
        ),
        Scenario("float-minmax-gam", "plain", floats),
        Scenario(
            "visiomatic-float",
            "plain",
            tile_urls(
                ENDPOINT,
                "FIF=sky.tif&MINMAX=1:95,900&GAM=0.4545&CTW=1;1;1&JTL={r},{i}",
                sky,
                count,
                3,
            ),
        ),
        Scenario(
            "cube-ctw",
            "plain",
            tile_urls(
                ENDPOINT,
                "FIF=cube.tif&MINMAX=1:70,300&MINMAX=2:80,300&MINMAX=3:110,400&GAM=0.5"
                "&CTW=[1,0.5,0;0,1,0;0,0.5,1]&JTL={r},{i}",
                cube,
                count,
                4,
            ),
        ),
        Scenario("memcached-hits", "memcached", floats[:1000]),
    ]
    return {s.name: s for s in out}


# --------------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(proc: subprocess.Popen, port: int, name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with status {proc.returncode} at start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not listening on {port}") from None
            time.sleep(0.05)


class Procs:
    """Every process the harness starts, each in its own session (killed with its group)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        with open(self.workdir / f"{name}.out", "ab") as out:
            proc = subprocess.Popen(
                argv, env=env, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)


def daemon_env(images: Path, **extra: str) -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(
        OMP_NUM_THREADS="1", TZ="UTC", FILESYSTEM_PREFIX=f"{images}/", VERBOSITY="0",
        LOGFILE="/dev/null", URI_MAP="iiif=>IIIF",
    )  # fmt: skip
    env.update(extra)
    return env


def start_nginx(procs: Procs, workdir: Path, port: int, upstreams: list[str]) -> subprocess.Popen:
    """The shipped site on 127.0.0.1:``port`` with one ``server`` line per upstream."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "site.conf").write_text(site_config(port, upstreams))
    d = workdir
    # 200 browsers (locust mode) hold ~1200 client connections
    (d / "nginx.conf").write_text(main_config(d, access_log=False, worker_connections=4096))
    base = [NGINX, "-p", f"{d}/", "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")]
    check = subprocess.run([*base, "-t", "-q"], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise RuntimeError(f"nginx -t rejected the configuration:\n{check.stderr}")
    proc = procs.start(f"nginx-{port}", base, os.environ.copy())
    wait_port(proc, port, "nginx")
    return proc


# --------------------------------------------------------------------------------------------
# CPU accounting


def session_cpu(sessions: set[int]) -> float:
    """CPU seconds (user+system, plus reaped children) of every process in ``sessions``."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        # fields[0] is state (field 3); session is field 6, utime..cstime are fields 14-17.
        if int(fields[3]) in sessions:
            total += sum(int(v) for v in fields[11:15])
    return total / CLK_TCK


# --------------------------------------------------------------------------------------------
# Load generators


def run_wrk(
    port: int, paths_file: Path, lua: Path, conc: int, seconds: float, offset: int = 0
) -> dict:
    """wrk with one thread and ``conc`` connections, rotating over the URL file from ``offset``."""
    duration = f"{max(1, round(seconds))}s"  # wrk takes whole seconds
    argv = [
        WRK, "-t", "1", "-c", str(conc), "-d", duration, "--timeout", "10s", "-s", str(lua),
        f"http://127.0.0.1:{port}", "--", str(paths_file), str(offset),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    out = done.stdout
    m = re.search(r"^RESULT (.*)$", out, re.MULTILINE)
    if not m:
        raise RuntimeError(f"wrk output without RESULT line:\n{out}")
    r = json.loads(m.group(1))
    errors = r["bad"] + r["connect"] + r["read"] + r["write"] + r["timeout"]
    return {
        "requests": r["requests"],
        "seconds": r["duration_us"] / 1e6,
        "errors": errors,
        "p50_ms": r["p50_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
    }


def run_python(port: int, paths: list[str], conc: int, seconds: float, offset: int = 0) -> dict:
    """Threads with http.client keep-alive connections; same rotation as the Lua script."""
    latencies: list[list[float]] = [[] for _ in range(conc)]
    errors = [0] * conc
    stop = time.perf_counter() + seconds

    def worker(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        idx = (offset + k * 7919) % len(paths)
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                conn.request("GET", paths[idx])
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200 and resp.getheader("Content-Type") == "image/jpeg"
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            latencies[k].append(time.perf_counter() - t0)
            errors[k] += not ok
            idx = (idx + 1) % len(paths)
        conn.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    lat = np.array([x for per in latencies for x in per]) * 1000
    return {
        "requests": len(lat),
        "seconds": elapsed,
        "errors": sum(errors),
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else 0.0,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else 0.0,
    }


def fetch_body(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


def compare_servers(ports: tuple[int, int], paths: list[str]) -> dict:
    """Decoded-pixel difference between the answers of (iipserver, iipsrv) for ``paths``."""
    import simplejpeg

    worst, means, sizes = 0, [], [0, 0]
    for path in paths:
        bodies = [fetch_body(port, path) for port in ports]
        for k, body in enumerate(bodies):
            sizes[k] += len(body)
        try:
            a, b = (simplejpeg.decode_jpeg(body) for body in bodies)
        except ValueError as exc:
            return {"problem": f"{path}: {exc}"}
        if a.shape != b.shape:
            return {"problem": f"{path}: shapes {a.shape} vs {b.shape}"}
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
        worst, means = max(worst, int(diff.max())), [*means, float(diff.mean())]
    return {
        "tiles": len(paths),
        "max_abs_diff": worst,
        "mean_abs_diff": round(float(np.mean(means)), 3),
        "mean_bytes": {"iipserver": sizes[0] / len(paths), "iipsrv": sizes[1] / len(paths)},
    }


def check_once(port: int, path: str) -> str | None:
    """None if ``path`` answers 200 image/jpeg, else a description of the answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        ctype = resp.getheader("Content-Type")
        if resp.status == 200 and ctype == "image/jpeg" and body[:2] == b"\xff\xd8":
            return None
        return f"{resp.status} {ctype} {body[:120]!r}"
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# Stacks


@dataclass
class Stack:
    """nginx in front of one server, with the sessions whose CPU time is the server's."""

    name: str
    port: int
    sessions: set[int]
    nginx: set[int]


def start_memcached(procs: Procs) -> tuple[str, int]:
    port = free_port()
    argv = [MEMCACHED, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "256"]
    if os.geteuid() == 0:
        argv += ["-u", "root"]
    proc = procs.start(f"memcached-{port}", argv, os.environ.copy())
    wait_port(proc, port, "memcached")
    return f"127.0.0.1:{port}", proc.pid


def wait_unix(proc: subprocess.Popen, path: Path, name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with status {proc.returncode} at start-up")
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(path))
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not listening on {path}") from None
            time.sleep(0.05)


def start_stack(
    procs: Procs, work: Path, name: str, images: Path, workers: int, memcached: bool,
    transport: str = "unix",
) -> Stack:  # fmt: skip
    """``iipserver`` (one daemon, ``workers`` workers) or ``iipsrv`` (``workers`` processes),
    reached by nginx over Unix sockets (as nginx/iipserver.conf ships) or loopback TCP."""
    extra: dict[str, str] = {}
    sessions: set[int] = set()
    if memcached:
        address, pid = start_memcached(procs)
        extra["MEMCACHED_SERVERS"] = address
        sessions.add(pid)
    env = daemon_env(images, **extra)
    upstreams = []
    count = 1 if name.startswith("iipserver") else workers
    for n in range(count):
        label = name if count == 1 else f"{name}{n}"
        if transport == "unix":
            path = work / f"{label}.sock"
            path.unlink(missing_ok=True)
            bind, upstream = str(path), f"unix:{path}"
        else:
            port = free_port()
            bind = upstream = f"127.0.0.1:{port}"
        if name.startswith("iipserver"):
            ours = f"unix:{bind}" if transport == "unix" else bind
            argv = [sys.executable, "-m", "iipserver", "fcgi", "--bind", ours,
                    "--workers", str(workers)]  # fmt: skip
        else:
            argv = [IIPSRV, "--bind", bind]
        proc = procs.start(label, argv, env)
        if transport == "unix":
            wait_unix(proc, Path(bind), label)
        else:
            wait_port(proc, int(bind.rsplit(":", 1)[1]), label)
        upstreams.append(upstream)
        sessions.add(proc.pid)
    port = free_port()
    ng = start_nginx(procs, work / f"nginx-{name}", port, upstreams)
    return Stack(name, port, sessions | {ng.pid}, {ng.pid})


# --------------------------------------------------------------------------------------------
# Measuring


class Runner:
    """Runs one load against one stack and turns it into figures."""

    def __init__(self, lua: Path | None, seconds: float) -> None:
        self.lua = lua
        self.seconds = seconds
        self.offsets: dict[str, int] = {}

    def load(self, stack: Stack, sc: Scenario, conc: int, seconds: float, offset: int) -> dict:
        if self.lua is not None:
            return run_wrk(stack.port, sc.file, self.lua, conc, seconds, offset)
        return run_python(stack.port, sc.paths, conc, seconds, offset)

    def measure(self, stack: Stack, sc: Scenario, conc: int, offset: int) -> dict:
        before = session_cpu(stack.sessions)
        before_nginx = session_cpu(stack.nginx)
        res = self.load(stack, sc, conc, self.seconds, offset)
        cpu = session_cpu(stack.sessions) - before
        nginx = session_cpu(stack.nginx) - before_nginx
        ok = res["requests"] - res["errors"]
        res["cpu_s"] = cpu
        res["nginx_share"] = nginx / cpu if cpu > 0 else 0.0
        res["tiles_per_s"] = ok / res["seconds"]
        res["tiles_per_core_s"] = ok / cpu if cpu > 0 else 0.0
        res["busy_cores"] = cpu / res["seconds"]
        return res


def summarise(runs: list[dict]) -> dict:
    keys = ["tiles_per_s", "tiles_per_core_s", "p50_ms", "p99_ms", "busy_cores", "cpu_s"]
    keys.append("nginx_share")
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["errors"] = sum(r["errors"] for r in runs)
    out["requests"] = sum(r["requests"] for r in runs)
    return out


def ratios(a: dict, b: dict) -> dict:
    return {
        k: (a[k] / b[k] if b[k] else float("nan"))
        for k in ("tiles_per_s", "tiles_per_core_s", "p50_ms", "p99_ms")
    }


def table(results: dict) -> str:
    lines = [
        "| scenario | conc | server | tiles/s | p50 ms | p99 ms | busy cores | nginx share "
        "| tiles per core-s | errors / requests |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, per in results.items():
        name, conc = key.rsplit("@c", 1)
        servers = [s for s in per if s != "ratio"]
        for server in servers:
            s = per[server]
            lines.append(
                f"| {name} | {conc} | {server} | {s['tiles_per_s']:.0f} | {s['p50_ms']:.2f} | "
                f"{s['p99_ms']:.2f} | {s['busy_cores']:.2f} | {100 * s['nginx_share']:.0f} % | "
                f"{s['tiles_per_core_s']:.0f} | {s['errors']} / {s['requests']} |"
            )
        r = per["ratio"]
        label = "iipserver/iipsrv" if "iipsrv" in servers[-1] else f"{servers[0]}/{servers[1]}"
        lines.append(
            f"| {name} | {conc} | **ratio {label}** | **{r['tiles_per_s']:.2f}** | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | | | **{r['tiles_per_core_s']:.2f}** | |"
        )
    return "\n".join(lines)


def bars(results: dict, concs: list[int]) -> list[dict]:
    """The issue's bars against this run's medians."""
    out = []
    for name, target, what in BARS:
        got = [
            results[f"{name}@c{c}"]["ratio"]["tiles_per_core_s"]
            for c in concs
            if f"{name}@c{c}" in results
        ]
        if got:
            out.append(
                {
                    "bar": f"{what}: tiles per busy core ≥ {target}× iipsrv",
                    "measured": [round(g, 2) for g in got],
                    "met": min(got) >= target,
                }
            )
    scaling = [k for k in results if k.startswith("scaling@")]
    if scaling:
        got = [results[k]["ratio"]["tiles_per_s"] for k in scaling]
        out.append(
            {
                "bar": f"two workers ≥ {SCALING_TARGET}× one worker (tiles/s)",
                "measured": [round(g, 2) for g in got],
                "met": min(got) >= SCALING_TARGET,
            }
        )
    top = max(concs)
    p99 = [
        (k, v["ratio"]["p99_ms"])
        for k, v in results.items()
        if k.endswith(f"@c{top}") and not k.startswith("scaling")
    ]
    if p99:
        out.append(
            {
                "bar": f"p99 latency at concurrency {top} no worse than iipsrv's (ratio ≤ 1)",
                "measured": {k.split("@")[0]: round(v, 2) for k, v in p99},
                "met": all(v <= 1.0 for _, v in p99),
            }
        )
    return out


RESULTS_BEGIN = "<!-- bench/http.py: begin generated section -->"
RESULTS_END = "<!-- bench/http.py: end generated section -->"


def markdown(doc: dict) -> str:
    lines = [
        RESULTS_BEGIN,
        f"Generated {doc['date']} on {doc['machine']} by `{doc['command']}` "
        f"({doc['client']}, {doc['seconds']:.0f} s per run, medians of {doc['repeat']} "
        f"repeats; nginx to the daemons over {doc['transport']} sockets; data: {doc['data']}).",
        "",
        table(doc["results"]),
        "",
        "| bar | measured | met |",
        "|---|---|---|",
    ]
    for bar in doc["bars"]:
        lines.append(f"| {bar['bar']} | {bar['measured']} | {'yes' if bar['met'] else '**no**'} |")
    lines += ["", "Pixel agreement (decoded, first 30 URLs of each scenario):", ""]
    for name, agreement in doc["agreement"].items():
        lines.append(f"- {name}: {agreement}")
    lines.append(RESULTS_END)
    return "\n".join(lines)


def write_results(path: Path, doc: dict) -> None:
    """Replace the generated section of ``path`` (appended when there is none)."""
    heading = "HTTP side by side (bench/http.py)"
    write_section(path, RESULTS_BEGIN, RESULTS_END, markdown(doc), heading)


# --------------------------------------------------------------------------------------------
# Main


def warm(stacks: list[Stack], sc: Scenario, runner: Runner, everything: bool) -> None:
    """Fill caches and fork workers; with ``everything``, request each URL once."""
    for stack in stacks:
        if everything:
            conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
            for path in sc.paths:
                conn.request("GET", path)
                conn.getresponse().read()
            conn.close()
        else:
            runner.load(stack, sc, 2, 1.0, 0)


def run_group(  # noqa: C901
    group: str, names: list[str], scs: dict[str, Scenario], args, runner: Runner,
    procs: Procs, work: Path, images: Path, raw: dict, agreement: dict,
) -> None:  # fmt: skip
    """Start the group's stacks, check, warm and measure its scenarios, stop the stacks."""
    memcached = group == "memcached"
    if memcached and not MEMCACHED:
        print("WARNING memcached is not installed: memcached-hits skipped", file=sys.stderr)
        return
    started = len(procs.procs)
    t = args.transport
    if group == "scaling":
        stacks = [
            start_stack(procs, work, "iipserver", images, 2, False, t),
            start_stack(procs, work, "iipserver-1w", images, 1, False, t),
        ]
    else:
        stacks = [
            start_stack(procs, work, "iipserver", images, 2, memcached, t),
            start_stack(procs, work, "iipsrv", images, 2, memcached, t),
        ]
    try:
        for name in names:
            sc = scs[name]
            for stack in stacks:
                for path in sc.paths[:10]:
                    problem = check_once(stack.port, path)
                    if problem:
                        print(f"WARNING {stack.name} {name} {path}: {problem}", file=sys.stderr)
            if group != "scaling":
                agreement[name] = compare_servers((stacks[0].port, stacks[1].port), sc.paths[:30])
                print(f"pixels {name}: {agreement[name]}", file=sys.stderr)
            warm(stacks, sc, runner, everything=memcached)
        label = "scaling" if group == "scaling" else None
        for rep in range(args.repeat):
            for name in names:
                sc = scs[name]
                for conc in runner.concs:
                    key = f"{label or name}@c{conc}"
                    offset = runner.offsets.get(name, 0)
                    for stack in stacks:
                        res = runner.measure(stack, sc, conc, offset)
                        raw.setdefault(key, {}).setdefault(stack.name, []).append(res)
                        print(
                            f"run {rep + 1} {key:24s} {stack.name:12s} "
                            f"{res['tiles_per_s']:7.0f} tiles/s {res['tiles_per_core_s']:6.0f} "
                            f"per core-s  p50 {res['p50_ms']:.2f} ms  p99 {res['p99_ms']:.2f} ms"
                            f"  cores {res['busy_cores']:.2f}  errors {res['errors']}",
                            file=sys.stderr,
                        )
                    # the next run starts where this one's requests ended (unique lists)
                    runner.offsets[name] = offset + max(
                        int(raw[key][stacks[0].name][-1]["requests"]), 1
                    )
        died = [p.args[0] for p in procs.procs[started:] if p.poll() is not None]
        if died:
            print(f"WARNING processes exited during the run: {died}", file=sys.stderr)
    finally:
        for proc in procs.procs[started:]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.procs[started:]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


LOCUST_BEGIN = "<!-- bench/http.py --locust: begin generated section -->"
LOCUST_END = "<!-- bench/http.py --locust: end generated section -->"


def run_locust(args, procs: Procs, work: Path, images: Path) -> dict:
    """``--locust USERS``: bench/locustfile.py's browsers against each nginx front in turn."""
    import csv

    out = {}
    for name in ("iipserver", "iipsrv"):
        started = len(procs.procs)
        stack = start_stack(procs, work, name, images, 2, False, args.transport)
        try:
            prefix = work / f"locust-{name}"
            before = session_cpu(stack.sessions)
            argv = [
                sys.executable, "-m", "locust", "-f", str(_HERE / "locustfile.py"), "--headless",
                "-u", str(args.locust), "-r", str(max(1, args.locust // 4)),
                "-t", f"{max(1, round(args.seconds))}s", "--host", f"http://127.0.0.1:{stack.port}",
                "--only-summary", "--csv", str(prefix), "--loglevel", "WARNING",
            ]  # fmt: skip
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            cpu = session_cpu(stack.sessions) - before
            print(done.stdout[-6000:], file=sys.stderr)
            with open(f"{prefix}_stats.csv", newline="") as f:
                rows = {row["Name"]: row for row in csv.DictReader(f)}
            total = rows["Aggregated"]
            requests = int(total["Request Count"])
            out[name] = {
                "requests": requests,
                "failures": int(total["Failure Count"]),
                "requests_per_s": float(total["Requests/s"]),
                "p50_ms": float(total["50%"]),
                "p95_ms": float(total["95%"]),
                "p99_ms": float(total["99%"]),
                "cpu_s": cpu,
                "requests_per_core_s": requests / cpu if cpu > 0 else 0.0,
                "kinds": {k: int(v["Request Count"]) for k, v in rows.items() if k != "Aggregated"},
                "locust_status": done.returncode,
            }
        finally:
            for proc in procs.procs[started:]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc in procs.procs[started:]:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
    return out


def locust_markdown(doc: dict) -> str:
    lines = [
        LOCUST_BEGIN,
        f"Generated {doc['date']} on {doc['machine']} by `{doc['command']}` ({doc['users']} "
        f"simulated browsers for {doc['seconds']:.0f} s against each nginx front; data: "
        f"{doc['data']}).",
        "",
        "| server | requests | failures | req/s | p50 ms | p95 ms | p99 ms | server CPU s "
        "| requests per core-s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in doc["locust"].items():
        lines.append(
            f"| {name} | {r['requests']} | {r['failures']} | {r['requests_per_s']:.0f} | "
            f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['cpu_s']:.1f} | "
            f"{r['requests_per_core_s']:.0f} |"
        )
    lines.append(LOCUST_END)
    return "\n".join(lines)


def write_section(path: Path, begin: str, end: str, section: str, heading: str) -> None:
    """Replace the section between ``begin`` and ``end`` in ``path`` (appended if missing)."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## {heading}\n\n" + section + "\n"
    path.write_text(text)


def main() -> None:  # noqa: C901
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per run (default 5)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--size", type=int, default=8192, help="side of sky.tif and rgb.tif")
    parser.add_argument("--urls", type=int, default=4000, help="URLs per random scenario")
    parser.add_argument("--scenarios", help="comma-separated subset (default: all)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="data folder (cached)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--results", type=Path, help="rewrite this RESULTS.md's section")
    parser.add_argument("--client", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument(
        "--transport", choices=["unix", "tcp"], default="unix",
        help="nginx to the daemons: Unix sockets (as shipped, default) or loopback TCP",
    )  # fmt: skip
    parser.add_argument("--keep", type=Path, help="work folder kept afterwards (default: tmp)")
    parser.add_argument("--smoke", action="store_true", help="10-second version (tests)")
    parser.add_argument(
        "--locust", type=int, metavar="USERS",
        help="instead: USERS locust browsers (bench/locustfile.py) for --seconds against each",
    )  # fmt: skip
    args = parser.parse_args()
    if args.smoke:
        args.seconds, args.repeat, args.size, args.urls = 1.0, 1, 1024, 300
        args.concurrency = "8"
        args.scenarios = args.scenarios or "rgb-tiles,float-minmax-gam,memcached-hits,scaling"
    if not NGINX:
        sys.exit("nginx is not installed")
    if not os.access(IIPSRV, os.X_OK):
        sys.exit(f"iipsrv is not installed ({IIPSRV})")
    use_wrk = args.client == "wrk" or (args.client == "auto" and bool(WRK))

    tmp = None
    if args.keep:
        work = args.keep
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="iipbench-")
        work = Path(tmp)
    images = args.data / str(args.size)
    procs = Procs(work)
    try:
        t0 = time.perf_counter()
        files = make_data(images, args.size)
        print(f"data: {images} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        if args.locust:
            doc = {
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "command": "python bench/http.py " + " ".join(sys.argv[1:]),
                "users": args.locust, "seconds": args.seconds,
                "data": f"{args.size}×{args.size}",
                "locust": run_locust(args, procs, work, images),
            }  # fmt: skip
            print(locust_markdown(doc))
            if args.json:
                args.json.write_text(json.dumps(doc, indent=2))
            if args.results:
                heading = "Browser-like load: locust (bench/http.py --locust)"
                write_section(args.results, LOCUST_BEGIN, LOCUST_END, locust_markdown(doc), heading)
            return
        scs = scenarios(files, args.urls)
        for sc in scs.values():
            sc.file = work / f"{sc.name}.urls"
            sc.file.write_text("\n".join(sc.paths) + "\n")
        wanted = args.scenarios.split(",") if args.scenarios else [*scs, "scaling"]
        unknown = [w for w in wanted if w not in scs and w != "scaling"]
        if unknown:
            sys.exit(f"unknown scenarios: {unknown}; known: {[*scs, 'scaling']}")
        lua = None
        if use_wrk:
            lua = work / "rotate.lua"
            lua.write_text(LUA)
        runner = Runner(lua, args.seconds)
        runner.concs = [int(c) for c in args.concurrency.split(",")]  # type: ignore[attr-defined]

        raw: dict[str, dict[str, list[dict]]] = {}
        agreement: dict[str, dict] = {}
        groups = [
            ("plain", [n for n in wanted if n in scs and scs[n].group == "plain"]),
            ("memcached", [n for n in wanted if n in scs and scs[n].group == "memcached"]),
            ("scaling", ["float-minmax-gam"] if "scaling" in wanted else []),
        ]
        for group, names in groups:
            if names:
                run_group(group, names, scs, args, runner, procs, work, images, raw, agreement)

        results: dict[str, dict] = {}
        for key, per in raw.items():
            summary = {server: summarise(runs) for server, runs in per.items()}
            first, second = list(summary)
            summary["ratio"] = ratios(summary[first], summary[second])
            results[key] = summary
        print(table(results))
        doc = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, "
            f"Python {platform.python_version()}",
            "command": "python bench/http.py " + " ".join(sys.argv[1:]),
            "client": "wrk" if lua is not None else "python",
            "seconds": args.seconds,
            "repeat": args.repeat,
            "data": f"{args.size}×{args.size} ({', '.join(files)})",
            "transport": args.transport,
            "results": results,
            "bars": bars(results, runner.concs),  # type: ignore[attr-defined]
            "agreement": agreement,
            "runs": raw,
        }
        for bar in doc["bars"]:
            print(f"{'MET ' if bar['met'] else 'NOT MET'} {bar['bar']}: {bar['measured']}")
        if args.json:
            args.json.write_text(json.dumps(doc, indent=2))
        if args.results:
            write_results(args.results, doc)
    finally:
        procs.stop_all()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
