"""The FastCGI layer's own cost: worker CPU per request for a constant answer, per engine.

    python bench/fcgi_floor.py [--seconds 4] [--size 7000]

One worker (``iipserver.fastcgi.Worker`` or flup's, through ``iipserver.fcgi.FastCGIWorker``)
serves an application that answers every request with the same ``--size``-byte image, on a
Unix socket behind the shipped nginx site; wrk loads it at concurrency 1 and 8. The worker's
CPU time (/proc) divided by the requests is what the record layer, the sockets and the process
cost per request, whatever the request asks for: the floor under every tile.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from nginx_site import NGINX, main_config, site_config  # noqa: E402

from iipserver import fastcgi  # noqa: E402
from iipserver.fcgi import FastCGIWorker  # noqa: E402
from iipserver.protocol.responses import Response  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


class Constant:
    """The same answer to every request, as a Response (ours) and through WSGI (flup)."""

    def __init__(self, size: int) -> None:
        headers = [("Content-Type", "image/jpeg"), ("Content-Length", str(size))]
        self.response = Response(200, headers, b"\xff" * size)

    def respond(self, environ: dict) -> Response:
        return self.response

    def __call__(self, environ: dict, start_response) -> list[bytes]:
        start_response(self.response.status_line, self.response.headers)
        return [self.response.body]

    def clear_caches(self) -> None:
        pass


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def serve(engine: str, path: str, size: int) -> int:
    """Fork one worker serving on the Unix socket ``path``; return its pid."""
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(path)
    listening.listen(128)
    pid = os.fork()
    if pid == 0:
        lifeline, _ = os.pipe()
        wake, _ = os.pipe()
        app = Constant(size)
        if engine == "flup":
            FastCGIWorker(app, listening, bind_address=path).serve(lifeline, wake)
        else:
            fastcgi.Worker(app, listening).serve(lifeline, wake)
        os._exit(0)
    listening.close()
    return pid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--size", type=int, default=7000)
    args = parser.parse_args()
    wrk = shutil.which("wrk")
    if not NGINX or not wrk:
        sys.exit("nginx and wrk are needed")
    print("| engine | concurrency | requests/s | worker CPU µs per request |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for engine in ("iipserver", "flup"):
            sock = str(work / f"{engine}.sock")
            pid = serve(engine, sock, args.size)
            site = work / f"nginx-{engine}"
            site.mkdir()
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            (site / "site.conf").write_text(site_config(port, f"unix:{sock}"))
            (site / "nginx.conf").write_text(main_config(site, access_log=False))
            nginx = subprocess.Popen(
                [NGINX, "-p", f"{site}/", "-c", str(site / "nginx.conf"), "-e",
                 str(site / "error.log")],
                start_new_session=True,
            )  # fmt: skip
            try:
                time.sleep(0.5)
                url = f"http://127.0.0.1:{port}/fcgi-bin/iipsrv.fcgi?FIF=x.tif&JTL=0,0"
                subprocess.run([wrk, "-t1", "-c2", "-d1s", url], capture_output=True, check=True)
                for conc in (1, 8):
                    before = cpu_seconds(pid)
                    out = subprocess.run(
                        [wrk, "-t1", f"-c{conc}", f"-d{args.seconds}s", url],
                        capture_output=True, text=True, check=True,
                    ).stdout  # fmt: skip
                    used = cpu_seconds(pid) - before
                    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
                    print(
                        f"| {engine} | {conc} | {requests / args.seconds:.0f} | "
                        f"{used / requests * 1e6:.0f} |"
                    )
            finally:
                os.killpg(nginx.pid, signal.SIGTERM)
                nginx.wait()
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
