"""Confine image paths to FILESYSTEM_PREFIX: join, resolve symlinks, then check (policy §4)."""

from __future__ import annotations

import os
import threading
import time

from iipserver.errors import ImageNotFound

#: Seconds a path resolution is reused. Resolving follows every component with ``lstat``
#: (~30 µs for a short path, a sixth of a cached tile's cost); a symlink changed inside the
#: data root is seen after at most this long (docs/decisions.md, "Path resolution cache").
RESOLVE_TTL = 2.0
_RESOLVE_KEPT = 4096
_resolved: dict[tuple[str, str, str], tuple[float, str]] = {}
_roots: dict[str, tuple[float, str | None]] = {}
_lock = threading.Lock()


def clear_resolutions() -> None:
    """Forget every remembered resolution (SIGHUP, tests)."""
    with _lock:
        _resolved.clear()
        _roots.clear()


def _missing(requested: str) -> ImageNotFound:
    shown = requested.replace("\x00", "")
    return ImageNotFound(f"{shown} is neither a file nor part of an image sequence")


def confinement_root(prefix: str) -> str | None:
    """Return the real directory every image must lie in, or None when no prefix is set."""
    if not prefix:
        return None
    now = time.monotonic()
    known = _roots.get(prefix)
    if known is not None and now - known[0] < RESOLVE_TTL:
        return known[1]
    directory = prefix if prefix.endswith("/") or os.path.isdir(prefix) else os.path.dirname(prefix)
    root = os.path.realpath(directory or ".")
    with _lock:
        _roots[prefix] = (now, root)
    return root


def resolve(requested: str, prefix: str, suffix: str = "") -> str:
    """Return the real path of image ``requested`` (already URL-decoded) under ``prefix``.

    The path is built as iipsrv builds it (prefix + path + suffix, verbatim), then resolved with
    symlinks followed, and refused unless it lies inside the prefix's real directory. A NUL
    byte or a ``..`` component is refused outright. With no prefix (iipsrv's default) any path
    is allowed except those with ``..`` components.

    Raises:
        ImageNotFound: the path is refused or names nothing; the message shows only
            ``requested``, never the server's own paths.
    """
    key = (requested, prefix, suffix)
    now = time.monotonic()
    known = _resolved.get(key)
    if known is not None and now - known[0] < RESOLVE_TTL:
        return known[1]
    real = _resolve(requested, prefix, suffix)
    with _lock:
        if len(_resolved) >= _RESOLVE_KEPT:
            _resolved.clear()
        _resolved[key] = (now, real)
    return real


def split_selector(path: str) -> tuple[str, str | None]:
    """Split ``file.fits[SEL]`` into the file and the HDU selector ``SEL``; a path with no
    trailing ``[…]`` (or an empty one) has no selector."""
    if path.endswith("]"):
        start = path.rfind("[")
        if start > 0 and "/" not in path[start:] and path[start + 1 : -1].strip():
            return path[:start], path[start + 1 : -1]
    return path, None


def image_file(path: str) -> tuple[str, str | None]:
    """The file to open for a resolved image path and its HDU selector: ``split_selector``,
    unless a file of that very name exists."""
    file, selector = split_selector(path)
    if selector is not None and os.path.lexists(path):
        return path, None
    return file, selector


def _resolve(requested: str, prefix: str, suffix: str) -> str:
    try:
        return _resolve_file(requested, prefix, suffix)
    except ImageNotFound:
        file, selector = split_selector(requested)
        if selector is None or "\x00" in selector or len(selector) > 80:
            raise
    # ``file.fits[SCI]``: the file is resolved and confined, the selector kept verbatim
    try:
        return _resolve_file(file, prefix, suffix) + f"[{selector}]"
    except ImageNotFound:
        raise _missing(requested) from None


def _resolve_file(requested: str, prefix: str, suffix: str) -> str:
    if not requested or "\x00" in requested or len(requested) > 4096:
        raise _missing(requested)
    parts = requested.replace("\\", "/").split("/")
    if ".." in parts:
        raise _missing(requested)
    full = prefix + requested + suffix
    root = confinement_root(prefix)
    try:
        real = os.path.realpath(full)
    except (OSError, ValueError):
        raise _missing(requested) from None
    if root is not None and not (real == root or real.startswith(root.rstrip("/") + "/")):
        raise _missing(requested)
    if not os.path.exists(real):
        raise _missing(requested)
    return real


def _named_like(stem: str) -> tuple[str, list[str]]:
    """The directory of ``stem`` and the names in it that start like ``stem``'s last part.

    Plain string matching, not ``glob``: a glob pattern made of a client's path is compiled to
    a regular expression and cached, a memory and CPU cost per distinct missing path.
    """
    directory, base = os.path.split(stem)
    try:
        names = os.listdir(directory or ".")
    except (OSError, ValueError):
        return directory, []
    return directory, [name for name in names if name.startswith(base)]


def find_sequence(requested: str, prefix: str, pattern: str) -> tuple[str, str]:
    """Find an image sequence ``<prefix><path><pattern>XXX_YYY.<ext>`` (spec §6 step 4).

    Returns:
        (stem, extension): files are ``f"{stem}{x:03d}_{y:03d}.{extension}"``.

    Raises:
        ImageNotFound: no sequence, several extensions, or a match outside the prefix.
    """
    if not requested or "\x00" in requested or ".." in requested.replace("\\", "/").split("/"):
        raise _missing(requested)
    stem = prefix + requested + pattern
    directory, names = _named_like(stem)
    first = os.path.basename(stem) + "000_090."
    matches = [
        os.path.join(directory, name)
        for name in names
        if name.startswith(first) and len(name) > len(first) and not name.startswith(".")
    ]
    if len(matches) != 1:
        raise _missing(requested)
    extension = matches[0].rsplit(".", 1)[1]
    root = confinement_root(prefix)
    real = os.path.realpath(matches[0])
    if root is not None and not real.startswith(root.rstrip("/") + "/"):
        raise _missing(requested)
    return stem, extension


def sequence_angles(stem: str, extension: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Horizontal angles (files ``*_090``) and vertical angles (files ``000_*``), ascending."""
    _, names = _named_like(stem)
    base = os.path.basename(stem)
    suffix = "." + extension
    horizontal, vertical = set(), set()
    for name in names:
        if not name.endswith(suffix):
            continue
        middle = name[len(base) : -len(suffix)]  # XXX_YYY
        x, sep, y = middle.rpartition("_")
        if sep and y == "090" and x.isdigit():
            horizontal.add(int(x))
        if sep and x == "000" and y.isdigit():
            vertical.add(int(y))
    return tuple(sorted(horizontal)) or (0,), tuple(sorted(vertical)) or (90,)
