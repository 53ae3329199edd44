"""Call a WSGI app in-process with an iipsrv-style environ (as nginx's FastCGI params give)."""

from __future__ import annotations

import io
from dataclasses import dataclass


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    @property
    def names(self) -> list[str]:
        return [k for k, _ in self.headers]


def environ_for(
    query: str,
    path: str = "/fcgi-bin/iipsrv.fcgi",
    method: str = "GET",
    body: bytes = b"",
    headers: dict | None = None,
) -> dict:
    """An iipsrv-style WSGI environ (as nginx's FastCGI params give) for ``query`` at ``path``."""
    environ = {
        "REQUEST_METHOD": method,
        "QUERY_STRING": query,
        "REQUEST_URI": path + ("?" + query if query else ""),
        "SCRIPT_NAME": path,
        "PATH_INFO": "",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "HTTP_HOST": "localhost",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "CONTENT_LENGTH": str(len(body)) if body else "",
        "wsgi.input": io.BytesIO(body),
        "wsgi.url_scheme": "http",
    }
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    return environ


def call(
    app,
    query: str,
    method: str = "GET",
    headers: dict | None = None,
    body: bytes = b"",
    path: str = "/fcgi-bin/iipsrv.fcgi",
) -> Reply:
    environ = environ_for(query, path, method, body, headers)
    captured = {}

    def start_response(status, response_headers, exc_info=None):
        captured["status"] = int(status.split()[0])
        captured["headers"] = list(response_headers)

    chunks = app(environ, start_response)
    return Reply(captured["status"], captured["headers"], b"".join(chunks))
