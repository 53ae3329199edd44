"""The one exception hierarchy; ``app.py`` turns each class into a response in one table."""

from __future__ import annotations


class IIPServerError(Exception):
    """Base of every error the server raises on purpose."""

    status = 500

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


class ConfigError(IIPServerError):
    """A setting (environment variable or option) has a value the server cannot use."""


class ProtocolError(IIPServerError):
    """IIP protocol errors, answered as ``Error/<len>:<code> <arg>`` lines in one body.

    ``lines`` holds every error of the request in order (earlier ``2 2`` errors included).
    """

    status = 400

    def __init__(self, code: str, argument: str) -> None:
        super().__init__(f"{code} {argument}")
        self.lines: list[tuple[str, str]] = [(code, argument)]

    @classmethod
    def of(cls, lines: list[tuple[str, str]]) -> ProtocolError:
        """Build one error carrying several lines."""
        error = cls(*lines[0])
        error.lines = list(lines)
        return error


class BadRequest(IIPServerError):
    """A parameter the client sent is invalid (a plain-text 400)."""

    status = 400


class BannerError(IIPServerError):
    """A request iipsrv answers with its HTML banner and 400 (empty request, negative tile)."""

    status = 400


class UnsupportedImage(BannerError):
    """The file exists but is not an image format any source can read."""


class NotFound(IIPServerError):
    """Something the client named does not exist (a plain-text 404)."""

    status = 404


class ImageNotFound(NotFound):
    """The image path names no readable file or image sequence."""


class ResolutionNotFound(NotFound):
    """The requested resolution level does not exist."""


class TileNotFound(NotFound):
    """The requested tile does not exist at that resolution."""


class ImageReadError(NotFound):
    """The image file could not be read (corrupt, truncated, replaced while open)."""


class VisiomaticError(IIPServerError):
    """An error in the VisiOmatic 3 dialect, answered as JSON ``{"detail": [...]}``."""

    def __init__(
        self, status: int, message: str, loc: str | None = None, raw: str | None = None,
        kind: str = "value_error",
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.loc = loc
        self.raw = raw
        self.kind = kind

    def detail(self) -> dict[str, object]:
        """The FastAPI-style error entry."""
        entry: dict[str, object] = {"type": self.kind}
        if self.loc is not None:
            entry["loc"] = ["query", self.loc]
        entry["msg"] = self.message
        if self.raw is not None:
            entry["input"] = self.raw
        return entry


class NotImplementedCommand(IIPServerError):
    """A command of the IIP protocol that this server does not implement yet."""

    status = 501


class NotModified(Exception):
    """The image has not changed since the client's If-Modified-Since: answer 304."""

    status = 304

    def __init__(self, last_modified: float) -> None:
        super().__init__("not modified")
        self.last_modified = last_modified
