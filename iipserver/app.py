"""WSGI application (temporary stub while the pipeline is written)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from iipserver.settings import Settings


class IIPApp:
    """The IIP WSGI application."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def clear_caches(self) -> None:
        """Empty every in-process cache (SIGHUP)."""

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        body = b"\r\nIIP-server:3.65\r\n"
        start_response("200 OK", [("Content-Type", "application/vnd.netfpx"), ("Content-Length", str(len(body)))])
        return [body]


def make_app(settings: Settings) -> IIPApp:
    """Build the WSGI application for ``settings``."""
    return IIPApp(settings)
