"""Per-request cost of routing an IIP request: plain WSGI dispatcher vs Flask.

Run: ``python bench/bench_dispatch.py [N]``. Each variant answers N identical requests
(``/iip?FIF=x.tif&obj=IIP,1.0``) from a prepared environ, in-process, with no sockets; the
application is a trivial WSGI callable (the shape of the early ``app.py`` stub), so the numbers
are the routing overhead alone. Best of 5 runs, microseconds per request (each includes
copying the environ dict). The real application's own cost is printed last, for scale.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, Response, request
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.test import EnvironBuilder

from iipserver import demo
from iipserver.app import make_app
from iipserver.serve import Dispatcher
from iipserver.settings import Settings
from iipserver.site import create_site

BODY = b"IIP:1.0\r\n"


def stub(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response(
        "200 OK",
        [("Content-Type", "application/vnd.netfpx"), ("Content-Length", str(len(BODY)))],
    )
    return [BODY]


def flask_routed() -> Flask:
    """A Flask app whose /iip route runs the IIP WSGI app (what we avoid on the tile path)."""
    app = Flask("bench")

    @app.route("/iip")
    def iip() -> Response:
        return Response.from_app(stub, request.environ)

    return app


def run(app: Callable[..., Iterable[bytes]], environ: dict[str, Any], n: int) -> float:
    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        return None

    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            result = app(dict(environ), start_response)
            for _chunk in result:
                pass
            close = getattr(result, "close", None)
            if close is not None:
                close()
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    iip_env = EnvironBuilder(path="/iip", query_string="FIF=x.tif&obj=IIP,1.0").get_environ()
    health_env = EnvironBuilder(path="/health").get_environ()
    site = create_site("")
    mounts = {"/iip": stub}
    variants = [
        ("IIP app called directly (baseline)", stub, iip_env),
        ("serve.Dispatcher -> IIP app", Dispatcher(stub, site), iip_env),
        ("werkzeug DispatcherMiddleware -> IIP app", DispatcherMiddleware(site, mounts), iip_env),
        ("Flask route -> Response.from_app(IIP app)", flask_routed(), iip_env),
        ("serve.Dispatcher -> Flask /health (site route)", Dispatcher(stub, site), health_env),
    ]
    # For scale: the real application answering a metadata request and a (cached) tile.
    root = str(demo.ensure())
    real = make_app(Settings.from_environ({"FILESYSTEM_PREFIX": root + "/", "VERBOSITY": "0"}))
    for query in (f"FIF={demo.STARS}&obj=IIP,1.0&obj=Max-size", f"FIF={demo.RGB}&JTL=2,3"):
        environ = EnvironBuilder(path="/iip", query_string=query).get_environ()
        variants.append((f"real app: {query.split('&', 1)[1]}", Dispatcher(real, site), environ))
    print(f"{n} requests per run, best of 5, Python {sys.version.split()[0]}")
    for name, app, environ in variants:
        print(f"  {name:<50} {run(app, environ, n):8.2f} us/request")


if __name__ == "__main__":
    main()
