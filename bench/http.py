"""HTTP side by side: nginx + iipserver against nginx + Debian's iipsrv 1.1, tiles per busy core.

    python bench/http.py [--seconds 5] [--repeat 3] [--json out.json] [--keep DIR]

One run generates seeded data (a 4096×4096 float32 star field with SMin/SMax, and a 4096×4096
RGB JPEG-in-TIFF pyramid, one IFD per level), starts the shipped nginx site
(nginx/iipserver.conf, port and upstream substituted as tests/test_nginx.py does) twice: in
front of ``python -m iipserver fcgi --workers 2`` and in front of two ``iipsrv.fcgi`` processes
(two upstream ``server`` lines). For each scenario (random JTL tiles over all levels of the RGB
pyramid; VisiOmatic-style MINMAX+GAM+CTW float tiles) the same seeded URL list is played
against both at concurrency 1 and 8 with wrk (a Lua URL rotator that also counts any answer
other than 200 image/jpeg), or with a Python keep-alive client if wrk is missing. It measures
tiles/s, p50/p99 latency and the CPU time of every server-side process (nginx master and
workers, the daemons and their workers; /proc/<pid>/stat utime+stime+cutime+cstime of every
process in their sessions), and reports medians over the repeats and the iipserver/iipsrv ratios.
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

REPO = _HERE.parent
sys.path.insert(0, str(REPO / "tests"))

import numpy as np  # noqa: E402
from images import pyramid_levels, smin_smax_tags, write_pyramid  # noqa: E402
from nginx_site import NGINX, main_config, site_config  # noqa: E402

IIPSRV = os.environ.get("IIPSRV_BINARY", "/usr/lib/iipimage-server/iipsrv.fcgi")
WRK = shutil.which("wrk") or ""
CLK_TCK = os.sysconf("SC_CLK_TCK")
ENDPOINT = "/fcgi-bin/iipsrv.fcgi"

SCENARIOS = {
    "rgb-jpeg": "FIF=rgb.tif&JTL={r},{i}",
    "visiomatic-float": "FIF=sky.tif&MINMAX=1:95,900&GAM=0.4545&CTW=1;1;1&JTL={r},{i}",
}

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
# Data


def sky_image(width: int, height: int, seed: int = 7) -> np.ndarray:
    """Noise around 100 with 2000 gaussian stars in 15×15 stamps (as bench/cache.py)."""
    rng = np.random.default_rng(seed)
    sky = rng.normal(100.0, 5.0, size=(height, width)).astype(np.float32)
    yy, xx = np.mgrid[-7:8, -7:8]
    for _ in range(2000):
        x, y = int(rng.integers(7, width - 8)), int(rng.integers(7, height - 8))
        stamp = rng.uniform(50, 5000) * np.exp(-(xx**2 + yy**2) / (2 * rng.uniform(0.8, 2.5) ** 2))
        sky[y - 7 : y + 8, x - 7 : x + 8] += stamp.astype(np.float32)
    return sky


def make_data(root: Path, size: int = 4096) -> dict[str, int]:
    """Write sky.tif (float32 + SMin/SMax) and rgb.tif (JPEG tiles); return levels per file."""
    sky = sky_image(size, size)
    sky_levels = pyramid_levels(sky)
    write_pyramid(root / "sky.tif", sky_levels, extratags=smin_smax_tags([90.0], [1500.0]))
    # An RGB picture with JPEG-typical content: stretched stars, gradients and texture.
    stretch = np.arcsinh((sky - 100.0) / 20.0)
    stretch = np.clip(stretch / 5.0, 0, 1)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rng = np.random.default_rng(11)
    noise = rng.normal(0, 6, size=(size, size)).astype(np.float32)
    rgb = np.empty((size, size, 3), dtype=np.uint8)
    rgb[..., 0] = np.clip(255 * stretch + 80 * x + noise, 0, 255)
    rgb[..., 1] = np.clip(255 * np.roll(stretch, 37, axis=1) + 60 * y + noise, 0, 255)
    rgb[..., 2] = np.clip(120 + 100 * np.sin(12 * x) * np.cos(9 * y) + noise, 0, 255)
    rgb_levels = pyramid_levels(rgb)
    write_pyramid(root / "rgb.tif", rgb_levels, compression="jpeg", photometric="rgb")
    return {"sky.tif": len(sky_levels), "rgb.tif": len(rgb_levels)}


def url_list(template: str, size: int, levels: int, count: int, seed: int) -> list[str]:
    """``count`` seeded random tiles over all levels (resolution 0 = smallest)."""
    rng = np.random.default_rng(seed)
    tiles = []
    for r in range(levels):
        side = size >> (levels - 1 - r)
        n = -(-side // 256)
        tiles += [(r, i) for i in range(n * n)]
    picks = rng.integers(0, len(tiles), size=count)
    return [f"{ENDPOINT}?" + template.format(r=tiles[k][0], i=tiles[k][1]) for k in picks]


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


def daemon_env(images: Path) -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(
        OMP_NUM_THREADS="1", TZ="UTC", FILESYSTEM_PREFIX=f"{images}/", VERBOSITY="0",
        LOGFILE="/dev/null",
    )  # fmt: skip
    return env


def start_nginx(procs: Procs, workdir: Path, port: int, upstreams: list[str]) -> subprocess.Popen:
    """The shipped site on 127.0.0.1:``port`` with one ``server`` line per upstream."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "site.conf").write_text(site_config(port, upstreams))
    d = workdir
    (d / "nginx.conf").write_text(main_config(d, access_log=False))
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


def run_wrk(port: int, paths_file: Path, lua: Path, conc: int, seconds: float) -> dict:
    duration = f"{max(1, round(seconds))}s"  # wrk takes whole seconds
    argv = [
        WRK, "-t", "1", "-c", str(conc), "-d", duration, "--timeout", "10s", "-s", str(lua),
        f"http://127.0.0.1:{port}", "--", str(paths_file), str(conc * 7919),
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


def run_python(port: int, paths: list[str], conc: int, seconds: float) -> dict:
    """Threads with http.client keep-alive connections; same rotation as the Lua script."""
    latencies: list[list[float]] = [[] for _ in range(conc)]
    errors = [0] * conc
    stop = time.perf_counter() + seconds

    def worker(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        idx = (k * 7919) % len(paths)
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


def compare_servers(stacks: dict, paths: list[str]) -> dict:
    """Decoded-pixel difference between the two servers' answers for ``paths``."""
    import simplejpeg

    worst, means, sizes = 0, [], {"iipserver": 0, "iipsrv": 0}
    for path in paths:
        bodies = {name: fetch_body(stack["port"], path) for name, stack in stacks.items()}
        for name, body in bodies.items():
            sizes[name] += len(body)
        a, b = (simplejpeg.decode_jpeg(bodies[n]) for n in ("iipserver", "iipsrv"))
        if a.shape != b.shape:
            return {"problem": f"{path}: shapes {a.shape} vs {b.shape}"}
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
        worst, means = max(worst, int(diff.max())), [*means, float(diff.mean())]
    return {
        "tiles": len(paths),
        "max_abs_diff": worst,
        "mean_abs_diff": float(np.mean(means)),
        "mean_bytes": {k: v / len(paths) for k, v in sizes.items()},
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
# Main


def measure(stack: dict, scenario: dict, conc: int, seconds: float, wrk_files) -> dict:
    before = session_cpu(stack["sessions"])
    before_nginx = session_cpu(stack["nginx"])
    if wrk_files is not None:
        res = run_wrk(stack["port"], scenario["file"], wrk_files, conc, seconds)
    else:
        res = run_python(stack["port"], scenario["paths"], conc, seconds)
    cpu = session_cpu(stack["sessions"]) - before
    res["nginx_share"] = (session_cpu(stack["nginx"]) - before_nginx) / cpu if cpu > 0 else 0.0
    ok = res["requests"] - res["errors"]
    res["cpu_s"] = cpu
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


def table(results: dict) -> str:
    lines = [
        "| scenario | conc | server | tiles/s | p50 ms | p99 ms | busy cores | nginx share "
        "| tiles per core-s | errors / requests |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, per in results.items():
        name, conc = key.rsplit("@c", 1)
        for server in ("iipserver", "iipsrv"):
            s = per[server]
            lines.append(
                f"| {name} | {conc} | {server} | {s['tiles_per_s']:.0f} | {s['p50_ms']:.2f} | "
                f"{s['p99_ms']:.2f} | {s['busy_cores']:.2f} | {100 * s['nginx_share']:.0f} % | "
                f"{s['tiles_per_core_s']:.0f} | "
                f"{s['errors']} / {s['requests']} |"
            )
        r = per["ratio"]
        lines.append(
            f"| {name} | {conc} | **ratio iipserver/iipsrv** | **{r['tiles_per_s']:.2f}** | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | | | **{r['tiles_per_core_s']:.2f}** | |"
        )
    return "\n".join(lines)


def main() -> None:  # noqa: C901
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--urls", type=int, default=4000, help="URLs per scenario list")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--client", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--keep", type=Path, help="work folder kept afterwards (default: tmp)")
    args = parser.parse_args()
    if not NGINX:
        sys.exit("nginx is not installed")
    if not os.access(IIPSRV, os.X_OK):
        sys.exit(f"iipsrv is not installed ({IIPSRV})")
    use_wrk = args.client == "wrk" or (args.client == "auto" and bool(WRK))
    concs = [int(c) for c in args.concurrency.split(",")]

    tmp = None
    if args.keep:
        work = args.keep
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="iipbench-")
        work = Path(tmp)
    images = work / "images"
    images.mkdir(exist_ok=True)
    procs = Procs(work)
    try:
        t0 = time.perf_counter()
        levels = make_data(images)
        print(f"data: {levels} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        scenarios = {}
        for k, (name, template) in enumerate(SCENARIOS.items()):
            fif = template.split("&", 1)[0].removeprefix("FIF=")
            paths = url_list(template, 4096, levels[fif], args.urls, seed=100 + k)
            file = work / f"{name}.urls"
            file.write_text("\n".join(paths) + "\n")
            scenarios[name] = {"paths": paths, "file": file}
        lua = None
        if use_wrk:
            lua = work / "rotate.lua"
            lua.write_text(LUA)

        env = daemon_env(images)
        stacks = {}
        p1 = free_port()
        ours = procs.start(
            "iipserver",
            [sys.executable, "-m", "iipserver", "fcgi", "--bind", f"127.0.0.1:{p1}",
             "--workers", "2"],
            env,
        )  # fmt: skip
        wait_port(ours, p1, "iipserver")
        port = free_port()
        ng = start_nginx(procs, work / "nginx-iipserver", port, [f"127.0.0.1:{p1}"])
        stacks["iipserver"] = {"port": port, "sessions": {ours.pid, ng.pid}, "nginx": {ng.pid}}
        upstreams, sessions = [], set()
        for n in range(2):
            p = free_port()
            proc = procs.start(f"iipsrv{n}", [IIPSRV, "--bind", f"127.0.0.1:{p}"], env)
            wait_port(proc, p, f"iipsrv{n}")
            upstreams.append(f"127.0.0.1:{p}")
            sessions.add(proc.pid)
        port = free_port()
        ng = start_nginx(procs, work / "nginx-iipsrv", port, upstreams)
        stacks["iipsrv"] = {"port": port, "sessions": sessions | {ng.pid}, "nginx": {ng.pid}}

        for server, stack in stacks.items():
            for name, sc in scenarios.items():
                for path in sc["paths"][:20]:
                    problem = check_once(stack["port"], path)
                    if problem:
                        print(f"WARNING {server} {name} {path}: {problem}", file=sys.stderr)
            for sc in scenarios.values():  # warm-up: fill caches, fork workers
                if lua is not None:
                    run_wrk(stack["port"], sc["file"], lua, 2, max(1.0, args.seconds / 2))
                else:
                    run_python(stack["port"], sc["paths"], 2, max(1.0, args.seconds / 2))

        agreement = {}
        for name, sc in scenarios.items():
            agreement[name] = compare_servers(stacks, sc["paths"][:50])
            print(f"pixels {name}: {agreement[name]}", file=sys.stderr)

        raw: dict[str, dict[str, list[dict]]] = {}
        for rep in range(args.repeat):
            for name, sc in scenarios.items():
                for conc in concs:
                    key = f"{name}@c{conc}"
                    for server, stack in stacks.items():
                        res = measure(stack, sc, conc, args.seconds, lua)
                        raw.setdefault(key, {}).setdefault(server, []).append(res)
                        print(
                            f"run {rep + 1} {key:24s} {server:9s} {res['tiles_per_s']:7.0f} "
                            f"tiles/s  {res['tiles_per_core_s']:6.0f} per core-s  "
                            f"p50 {res['p50_ms']:.2f} ms  p99 {res['p99_ms']:.2f} ms  "
                            f"cores {res['busy_cores']:.2f}  errors {res['errors']}",
                            file=sys.stderr,
                        )
        results: dict[str, dict] = {}
        for key, per in raw.items():
            summary = {server: summarise(runs) for server, runs in per.items()}
            a, b = summary["iipserver"], summary["iipsrv"]
            summary["ratio"] = {
                k: (a[k] / b[k] if b[k] else float("nan"))
                for k in ("tiles_per_s", "tiles_per_core_s", "p50_ms", "p99_ms")
            }
            results[key] = summary
        died = [p.args[0] for p in procs.procs if p.poll() is not None]
        if died:
            print(f"WARNING processes exited during the run: {died}", file=sys.stderr)
        print(table(results))
        if args.json:
            doc = {
                "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
                "command": " ".join(sys.argv),
                "client": "wrk" if lua is not None else "python",
                "seconds": args.seconds,
                "repeat": args.repeat,
                "results": results,
                "agreement": agreement,
                "runs": raw,
            }
            args.json.write_text(json.dumps(doc, indent=2))
    finally:
        procs.stop_all()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
