"""The WSGI application, and the one place where errors become responses."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from iipserver import __version__
from iipserver.cache import NoSharedCache, shared_cache, shared_key
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
from iipserver.protocol.iip import Session, parse_http_date
from iipserver.protocol.query import Token, request_string, tokenize, url_decode
from iipserver.protocol.responses import Response
from iipserver.protocol.visiomatic import VisiomaticSession, is_visiomatic
from iipserver.settings import Settings
from iipserver.sources import open_source, paths
from iipserver.sources.pool import FileStamp, SourcePool
from iipserver.sources.pyramids import PyramidCache
from iipserver.watermark import Watermark

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

#: Settings that never change a response's bytes (left out of cache keys and ETags, so
#: servers with other cache or log settings share one memcached).
NOT_IN_RESPONSES = frozenset(
    {
        "VERBOSITY", "LOGFILE", "MAX_IMAGE_CACHE_SIZE", "MAX_METADATA_CACHE_SIZE",
        "MAX_OPEN_FILES", "MEMCACHED_SERVERS", "MEMCACHED_TIMEOUT", "MEMCACHED_PREFIX",
        "STATUS_ENDPOINT", "PYRAMID_CACHE_DIR", "PYRAMID_CACHE_MB",
    }
)  # fmt: skip


class IIPApp:
    """IIP protocol server as a WSGI callable; answers from the query string on any path."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        pyramids = PyramidCache(
            settings.pyramid_directory, int(settings.pyramid_cache_mb * 1024 * 1024)
        )
        self.pool = SourcePool(
            settings.max_metadata_cache_size,
            settings.max_open_files,
            functools.partial(open_source, pyramids=pyramids),
        )
        watermark = None
        if settings.watermark:
            watermark = Watermark.load(
                settings.watermark,
                settings.watermark_opacity,
                settings.watermark_probability,
                None if settings.watermark_seed < 0 else settings.watermark_seed,
            )
        self.pipeline = Pipeline(
            int(settings.max_image_cache_size * 1_024_000),
            settings.interpolation,
            settings.codec_passthrough,
            watermark,
            int(settings.max_region_mb * 1024 * 1024),
        )
        self.shared = shared_cache(settings.memcached_servers, settings.memcached_timeout)
        self.requests = 0
        # responses depend on the settings and the version: keys and ETags carry both
        output = [(k, v) for k, v in settings.describe() if k not in NOT_IN_RESPONSES]
        described = repr(output) + __version__
        self._fingerprint = hashlib.blake2b(described.encode(), digest_size=6).hexdigest()

    def clear_caches(self) -> None:
        """Empty every in-process cache (on SIGHUP)."""
        self.pool.clear()
        self.pipeline.clear()
        paths.clear_resolutions()

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
            self._check_limits(request, tokens)
            if self.settings.status_endpoint and request.upper() == "STATUS":
                return self._status()
            resolved: dict[str, str] = {}
            stamps: dict[str, FileStamp] = {}
            material = self._key_material(tokens, request, resolved, stamps)
            key = None if material is None else shared_key(self.settings.memcached_prefix, material)
            if key is not None:
                stored = self.shared.get(key)
                found = None if stored is None else Response.unpack(stored)
                if found is not None:
                    found.cache = "hit"
                    return self._conditional(environ, found)
            response = self._answer(environ, request, tokens, resolved, stamps)
            if material is not None and response.status == 200:
                etag = '"' + hashlib.blake2b(material.encode("utf-8", "surrogateescape"),
                                             digest_size=12).hexdigest() + '"'  # fmt: skip
                response.headers.append(("ETag", etag))
                if key is not None and not isinstance(self.shared, NoSharedCache):
                    self.shared.set(key, response.pack())
                    response.cache = "store"
            return self._conditional(environ, response)
        except Exception as exc:  # the only place errors become responses
            return self.error_response(exc)

    def _check_limits(self, request: str, tokens: list[Token]) -> None:
        """Refuse requests longer or with more commands than the settings allow, in the
        dialect's own error format.

        Raises:
            VisiomaticError, BadRequest: a limit is exceeded.
        """
        settings = self.settings
        problem = None
        if len(request) > settings.max_request_length:
            problem = f"request longer than {settings.max_request_length} bytes"
        elif len(tokens) > settings.max_commands:
            problem = f"more than {settings.max_commands} commands"
        if problem is None:
            return
        if is_visiomatic(tokens[: settings.max_commands]):
            raise VisiomaticError(400, f"Request too large: {problem}")
        raise BadRequest(f"Request too large: {problem}")

    def _answer(
        self,
        environ: dict[str, Any],
        request: str,
        tokens: list[Token],
        resolved: dict[str, str],
        stamps: dict[str, FileStamp],
    ) -> Response:
        if is_visiomatic(tokens):
            return VisiomaticSession(self.settings, self.pool, self.pipeline).run(tokens)
        session = Session(
            self.settings,
            self.pool,
            self.pipeline,
            request,
            environ.get("HTTP_IF_MODIFIED_SINCE"),
            environ,
            resolved,
            stamps,
        )
        return session.run(parse_tokens(tokens))

    def _key_material(
        self,
        tokens: list[Token],
        request: str,
        resolved: dict[str, str],
        stamps: dict[str, FileStamp],
    ) -> str | None:
        """What a response depends on: the image file's real path, mtime and size, the
        settings and the request; None when the request names no readable image file.

        The path resolved here is put in ``resolved`` and its stamp in ``stamps``, so that FIF
        neither resolves nor stats it again (and the response matches the key's version).
        """
        fif = next((t for t in tokens if t.key == "fif"), None)
        if fif is None:
            return None
        prefix, suffix = self.settings.filesystem_prefix, self.settings.filesystem_suffix
        requested = url_decode(fif.argument)
        try:
            real = paths.resolve(requested, prefix, suffix)
            stamp = FileStamp.of(real)
        except (IIPServerError, OSError):
            return None
        resolved[requested] = real
        stamps[real] = stamp
        return f"{self._fingerprint}:{stamp.mtime_ns}:{stamp.size}:{real}:{request}"

    def _conditional(self, environ: dict[str, Any], response: Response) -> Response:
        """Answer 304 when the client's copy is current (If-None-Match, then If-Modified-Since)."""
        match = environ.get("HTTP_IF_NONE_MATCH")
        since = environ.get("HTTP_IF_MODIFIED_SINCE")
        if response.status != 200 or not (match or since):
            return response
        etag, modified = response.header("ETag"), response.header("Last-Modified")
        fresh = False
        if match and etag:
            fresh = match.strip() == "*" or etag in [m.strip() for m in match.split(",")]
        elif since and modified and response.cache == "hit":
            when, stamp = parse_http_date(since), parse_http_date(modified)
            fresh = when is not None and stamp is not None and stamp <= when
        if not fresh or modified is None:
            return response
        answer = responses.not_modified(self.settings, modified, etag)
        answer.cache = response.cache
        return answer

    def _status(self) -> Response:
        """This worker's counters, as JSON (the ``STATUS_ENDPOINT`` setting)."""
        tiles = self.pipeline.raw_tiles
        encoded = self.pipeline.encoded_tiles
        body = {
            "version": __version__,
            "pid": os.getpid(),
            "requests": self.requests,
            "tile_cache": {
                "entries": len(tiles), "bytes": tiles.size, "limit": tiles.limit,
                "hits": tiles.hits, "misses": tiles.misses, "evictions": tiles.evictions,
            },
            "encoded_tile_cache": {
                "entries": len(encoded), "bytes": encoded.size, "limit": encoded.limit,
                "hits": encoded.hits, "misses": encoded.misses, "evictions": encoded.evictions,
            },
            "metadata_cache": {
                "entries": len(self.pool), "hits": self.pool.hits, "misses": self.pool.misses,
            },
            "shared_cache": self.shared.stats(),
        }  # fmt: skip
        data = json.dumps(body, separators=(",", ":")).encode()
        response = responses.data_response(self.settings, data, "application/json", time.time())
        response.headers = [
            (k, "no-cache" if k == "Cache-Control" else v) for k, v in response.headers
        ]
        return response

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

    def respond(self, environ: dict[str, Any]) -> Response:
        """Answer one request and log it; a HEAD answer keeps its headers but no body."""
        started = time.perf_counter()
        self.requests += 1
        response = self.handle(environ)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "%s %s -> %d (%d bytes, %.1f ms%s)",
                environ.get("REQUEST_METHOD", "GET"),
                environ.get("QUERY_STRING", ""),
                response.status,
                len(response.body),
                (time.perf_counter() - started) * 1e3,
                f", shared cache {response.cache}" if response.cache else "",
            )
        if response.body and str(environ.get("REQUEST_METHOD", "GET")).upper() == "HEAD":
            response = Response(response.status, response.headers, b"", response.cache)
        return response

    def __call__(
        self, environ: dict[str, Any], start_response: WSGIStartResponse
    ) -> Iterable[bytes]:
        """WSGI entry point."""
        response = self.respond(environ)
        start_response(response.status_line, response.headers)
        return [response.body]


def make_app(settings: Settings) -> IIPApp:
    """Build the WSGI application for ``settings``."""
    return IIPApp(settings)
