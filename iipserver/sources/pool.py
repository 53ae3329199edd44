"""A bounded pool of opened sources: metadata by entries, open files by count, mtime-checked."""

from __future__ import annotations

import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from iipserver.errors import ImageReadError, UnsupportedImage
from iipserver.sources import open_source
from iipserver.sources.base import ImageSource
from iipserver.sources.paths import image_file


@dataclass(frozen=True)
class FileStamp:
    """What identifies one version of a file: replaced or rewritten files get a new stamp."""

    mtime: float
    mtime_ns: int
    size: int
    inode: int
    mode: int = stat.S_IFREG
    """``st_mode``: only regular files and directories (zarr) are opened."""

    @classmethod
    def of(cls, path: str) -> FileStamp:
        """Stat ``path``."""
        st = os.stat(image_file(path)[0])
        return cls(st.st_mtime, st.st_mtime_ns, st.st_size, st.st_ino, st.st_mode)


@dataclass(frozen=True)
class OpenedImage:
    """A source together with the file version it was opened from."""

    path: str
    stamp: FileStamp
    source: ImageSource


class SourcePool:
    """Keep opened sources for reuse across requests.

    At most ``max_entries`` sources are remembered (-1: no limit, 0: none) and at most
    ``max_open`` of them keep their file open; each lookup stats the file and reopens it when
    its mtime, size or inode changed.
    """

    def __init__(
        self,
        max_entries: int,
        max_open: int,
        opener: Callable[[str], ImageSource] = open_source,
    ) -> None:
        self._max_entries = max_entries
        self._max_open = max(1, max_open)
        self._opener = opener
        self._entries: OrderedDict[str, OpenedImage] = OrderedDict()
        self._open: OrderedDict[str, ImageSource] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, path: str, stamp: FileStamp | None = None) -> OpenedImage:
        """Return the opened image at real path ``path``, opening or reopening it if needed;
        ``stamp`` is the file's stamp if the caller has just taken it.

        Raises:
            ImageReadError, UnsupportedImage: the file cannot be opened as an image (FIFOs,
                devices and sockets are refused before anything opens them: no hang).
        """
        if stamp is None:
            try:
                stamp = FileStamp.of(path)
            except OSError as exc:
                raise ImageReadError("Unable to open file") from exc
        if not (stat.S_ISREG(stamp.mode) or stat.S_ISDIR(stamp.mode)):
            raise UnsupportedImage("Unsupported image type")
        with self._lock:
            entry = self._entries.get(path)
            if entry is not None and entry.stamp == stamp:
                self._entries.move_to_end(path)
                self.hits += 1
                self._touch_open(path, entry.source)
                return entry
        opened = OpenedImage(path, stamp, self._opener(path))
        self.misses += 1
        with self._lock:
            old = self._entries.pop(path, None)
            if old is not None:
                self._open.pop(path, None)
                old.source.close()
            if self._max_entries != 0:
                self._entries[path] = opened
                while self._max_entries > 0 and len(self._entries) > self._max_entries:
                    evicted_path, evicted = self._entries.popitem(last=False)
                    self._open.pop(evicted_path, None)
                    evicted.source.close()
            self._touch_open(path, opened.source)
        return opened

    def _touch_open(self, path: str, source: ImageSource) -> None:
        self._open[path] = source
        self._open.move_to_end(path)
        while len(self._open) > self._max_open:
            _, idle = self._open.popitem(last=False)
            idle.close()

    def clear(self) -> None:
        """Forget every source and close every file."""
        with self._lock:
            for entry in self._entries.values():
                entry.source.close()
            for source in self._open.values():
                source.close()
            self._entries.clear()
            self._open.clear()

    def __len__(self) -> int:
        return len(self._entries)
