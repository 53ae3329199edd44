"""Request strings: URI_MAP rewriting, ``&``/``=`` tokenising and iipsrv's URL decoding."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

_HEX = frozenset(b"0123456789abcdefABCDEF")

#: Protocol names URI_MAP may map to, and the command each becomes.
_MAPPED_COMMANDS = {"iip": "fif", "iiif": "iiif", "zoomify": "zoomify", "deepzoom": "deepzoom"}


@dataclass(frozen=True)
class Token:
    """One ``name=argument`` pair of a request string, in request order."""

    name: str
    """Command name as typed (used verbatim in ``2 2`` errors)."""
    argument: str
    """Raw argument, not URL-decoded."""

    @property
    def key(self) -> str:
        """Case-folded command name used for dispatch."""
        return self.name.lower()


def request_string(environ: Mapping[str, object], uri_map: str) -> str:
    """Return the IIP request string of a WSGI request.

    The query string is used raw (not URL-decoded). With ``URI_MAP="prefix=>protocol"``, a request
    whose path starts with ``/prefix/`` becomes ``<cmd>=<rest of path>`` as iipsrv does.
    """
    query = str(environ.get("QUERY_STRING", "") or "")
    if uri_map:
        prefix, _, protocol = uri_map.partition("=>")
        prefix = prefix.strip().strip("/")
        command = _MAPPED_COMMANDS.get(protocol.strip().lower())
        uri = str(environ.get("REQUEST_URI", "") or "")
        if not uri:
            uri = str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", ""))
        path = uri.split("?", 1)[0]
        if command and (not prefix or path.startswith("/" + prefix + "/")):
            rest = path[len(prefix) + 2 :] if prefix else path.lstrip("/")
            return f"{command}={rest}"
    return query


def tokenize(request: str) -> list[Token]:
    """Split a request string into tokens exactly as iipsrv does.

    Empty tokens are skipped; a token without ``=`` is its own command and argument (``INV``,
    ``OBJ``); pairs with an empty name or an empty argument are dropped silently.
    """
    tokens = []
    for part in request.split("&"):
        if not part:
            continue
        name, sep, argument = part.partition("=")
        if not sep:
            argument = name
        if not name or not argument:
            continue
        tokens.append(Token(name, argument))
    return tokens


def url_decode(text: str) -> str:
    """Decode ``+`` and ``%XY`` escapes once, as iipsrv's ``URL::decode`` does.

    A ``%`` not followed by two hex digits is kept literally. Unlike iipsrv, ``%00`` becomes a NUL
    character (which path resolution then refuses) instead of being dropped. The input is a WSGI
    string (bytes as latin-1); the output is UTF-8 text with undecodable bytes kept as surrogates.
    """
    raw = text.encode("latin-1", "surrogateescape") if "%" in text or "+" in text else None
    if raw is None:
        return text.encode("latin-1", "surrogateescape").decode("utf-8", "surrogateescape")
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c == 0x2B:  # '+'
            out.append(0x20)
            i += 1
        elif c == 0x25 and i + 2 < n and raw[i + 1] in _HEX and raw[i + 2] in _HEX:
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(c)
            i += 1
    return out.decode("utf-8", "surrogateescape")
