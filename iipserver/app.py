"""The WSGI application, and the one place where errors become responses."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from iipserver.errors import (
    BadRequest,
    BannerError,
    IIPServerError,
    NotFound,
    NotImplementedCommand,
    NotModified,
    ProtocolError,
    VisiomaticError,
)
from iipserver.pipeline import Pipeline
from iipserver.protocol import responses
from iipserver.protocol.commands import parse_tokens
from iipserver.protocol.iip import Session
from iipserver.protocol.query import request_string, tokenize
from iipserver.protocol.responses import Response
from iipserver.protocol.visiomatic import VisiomaticSession, is_visiomatic
from iipserver.settings import Settings
from iipserver.sources.pool import SourcePool

log = logging.getLogger(__name__)

#: Largest POST body accepted as a request string.
MAX_POST_BYTES = 65536

ErrorRenderer = Callable[[Settings, Any], Response]

#: Error class → response, checked in order (subclasses before their bases).
ERROR_RESPONSES: list[tuple[type[BaseException], ErrorRenderer]] = [
    (ProtocolError, lambda s, e: responses.iip_error_response(s, e.lines)),
    (VisiomaticError, lambda s, e: responses.json_error_response(s, e.status, e.detail())),
    (NotModified, lambda s, e: responses.not_modified(s, e.last_modified)),
    (BannerError, lambda s, e: responses.banner_response(s, e.status)),
    (NotFound, lambda s, e: responses.text_error_response(s, 404, e.message)),
    (BadRequest, lambda s, e: responses.text_error_response(s, 400, e.message)),
    (NotImplementedCommand, lambda s, e: responses.text_error_response(s, 501, e.message)),
]

WSGIStartResponse = Callable[..., Any]


class IIPApp:
    """IIP protocol server as a WSGI callable; answers from the query string on any path."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool = SourcePool(settings.max_metadata_cache_size, settings.max_open_files)
        self.pipeline = Pipeline(
            int(settings.max_image_cache_size * 1_024_000), settings.interpolation
        )

    def clear_caches(self) -> None:
        """Empty every in-process cache (on SIGHUP)."""
        self.pool.clear()
        self.pipeline.clear()

    def handle(self, environ: dict[str, Any]) -> Response:
        """Answer one request (never raises)."""
        try:
            method = str(environ.get("REQUEST_METHOD", "GET")).upper()
            if method == "OPTIONS":
                return responses.options_response(self.settings)
            if method not in ("GET", "HEAD", "POST"):
                return responses.text_error_response(self.settings, 405, "Method not allowed")
            request = request_string(environ, self.settings.uri_map)
            if not request and method == "POST":
                request = self._post_body(environ)
            if not request:
                return responses.banner_response(self.settings, 400)
            tokens = tokenize(request)
            if is_visiomatic(tokens):
                return VisiomaticSession(self.settings, self.pool, self.pipeline).run(tokens)
            session = Session(
                self.settings,
                self.pool,
                self.pipeline,
                request,
                environ.get("HTTP_IF_MODIFIED_SINCE"),
            )
            return session.run(parse_tokens(tokens))
        except Exception as exc:  # the only place errors become responses
            return self.error_response(exc)

    def error_response(self, exc: Exception) -> Response:
        """Render ``exc`` in the protocol's own error format."""
        for cls, render in ERROR_RESPONSES:
            if isinstance(exc, cls):
                if isinstance(exc, NotFound):
                    log.info("not found: %s", exc.message)
                return render(self.settings, exc)
        if isinstance(exc, IIPServerError):
            log.error("server error: %s", exc.message)
        else:
            log.exception("unexpected error")
        return responses.text_error_response(self.settings, 500, "Internal server error")

    @staticmethod
    def _post_body(environ: dict[str, Any]) -> str:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return ""
        if length <= 0:
            return ""
        if length > MAX_POST_BYTES:
            raise BadRequest("Request body too long")
        data = environ["wsgi.input"].read(length)
        return bytes(data).decode("latin-1").strip()

    def __call__(
        self, environ: dict[str, Any], start_response: WSGIStartResponse
    ) -> Iterable[bytes]:
        """WSGI entry point."""
        started = time.perf_counter()
        response = self.handle(environ)
        start_response(response.status_line, response.headers)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "%s %s -> %d (%d bytes, %.1f ms)",
                environ.get("REQUEST_METHOD", "GET"),
                environ.get("QUERY_STRING", ""),
                response.status,
                len(response.body),
                (time.perf_counter() - started) * 1e3,
            )
        if str(environ.get("REQUEST_METHOD", "GET")).upper() == "HEAD":
            return [b""]
        return [response.body]


def make_app(settings: Settings) -> IIPApp:
    """Build the WSGI application for ``settings``."""
    return IIPApp(settings)
