"""The shipped nginx site and a top-level nginx.conf around it, for tests and benchmarks."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SITE = REPO / "nginx" / "iipserver.conf"
SITE_UPSTREAM = "server unix:/run/iipserver/iipserver.sock;"
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin") or ""


def substitute_once(pattern: str, replacement: str, text: str) -> str:
    """Replace the single line matching ``pattern``; fail if the site file changed shape."""
    new, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    if count != 1:
        raise AssertionError(f"{SITE.name}: expected one line matching {pattern!r}, found {count}")
    return new


def site_config(
    port: int, upstream: str | Sequence[str], *, tls: tuple[int, Path, Path] | None = None
) -> str:
    """nginx/iipserver.conf listening on 127.0.0.1:``port`` and passing to ``upstream``.

    ``upstream`` is ``unix:/path`` or ``host:port`` (or several, one ``server`` line each). With
    ``tls=(port, cert, key)`` the commented HTTPS/HTTP2 lines of the site are enabled as well.
    """
    upstreams = [upstream] if isinstance(upstream, str) else list(upstream)
    text = SITE.read_text()
    text = substitute_once(r"^(\s*)listen 80;$", rf"\1listen 127.0.0.1:{port};", text)
    text = substitute_once(r"^\s*listen \[::\]:80;\n", "", text)  # IPv6 may be unavailable
    servers = "\n".join(f"    server {u};" for u in upstreams).replace("\\", r"\\")
    text = substitute_once(rf"^\s*{re.escape(SITE_UPSTREAM)}$", servers, text)
    if tls is not None:
        tls_port, cert, key = tls
        text = substitute_once(
            r"^(\s*)# listen 443 ssl http2;$", rf"\1listen 127.0.0.1:{tls_port} ssl http2;", text
        )
        text = substitute_once(r"^\s*# listen \[::\]:443 ssl http2;\n", "", text)
        text = substitute_once(r"^(\s*)# ssl_certificate .*$", rf"\1ssl_certificate {cert};", text)
        text = substitute_once(
            r"^(\s*)# ssl_certificate_key .*$", rf"\1ssl_certificate_key {key};", text
        )
        text = substitute_once(r"^(\s*)# (ssl_protocols .*)$", r"\1\2", text)
        text = substitute_once(r"^(\s*)# (ssl_session_cache .*)$", r"\1\2", text)
    return text


def main_config(workdir: Path, *, access_log: bool = True, worker_connections: int = 256) -> str:
    """A top-level nginx.conf keeping everything under ``workdir`` and including site.conf.

    As root, nginx would switch its workers to "nobody", who cannot reach a private temporary
    folder; they stay root there. Unprivileged, nginx ignores ``user``.
    """
    user = "user root;\n" if os.geteuid() == 0 else ""
    d = workdir
    access = f"{d}/access.log" if access_log else "off"
    return f"""{user}daemon off;
master_process on;
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log notice;
events {{ worker_connections {worker_connections}; }}
http {{
    default_type application/octet-stream;
    access_log {access};
    client_body_temp_path {d}/client_body;
    fastcgi_temp_path {d}/fastcgi;
    proxy_temp_path {d}/proxy;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    include {d}/site.conf;
}}
"""
