"""In-process caches: a thread-safe LRU bounded by the bytes of what it holds."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

import numpy as np

V = TypeVar("V", bytes, np.ndarray)
K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

#: Bookkeeping bytes charged per entry on top of its data.
ENTRY_OVERHEAD = 200


def _size(value: bytes | np.ndarray) -> int:
    return int(value.nbytes) if isinstance(value, np.ndarray) else len(value)


class ByteLRU(Generic[V]):
    """Least-recently-used map holding at most ``limit`` bytes (0 disables it).

    Arrays are stored read-only so a cached tile cannot be changed by a caller.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(0, int(limit))
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: Hashable) -> V | None:
        """Return the value for ``key`` and mark it recently used, or None."""
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: V) -> None:
        """Store ``value``; evict least-recently-used entries until within the limit."""
        cost = _size(value) + ENTRY_OVERHEAD
        if cost > self.limit:
            return
        if isinstance(value, np.ndarray):
            value.flags.writeable = False
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= _size(old) + ENTRY_OVERHEAD
            self._items[key] = value
            self._bytes += cost
            while self._bytes > self.limit:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= _size(evicted) + ENTRY_OVERHEAD
                self.evictions += 1

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def size(self) -> int:
        """Bytes currently charged."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


class EntryLRU(Generic[K, T]):
    """Least-recently-used map holding at most ``limit`` entries; thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, int(limit))
        self._items: OrderedDict[K, T] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> T | None:
        """Return the value for ``key`` and mark it recently used, or None."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: T) -> None:
        """Store ``value``, evicting the least recently used entries beyond the limit."""
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.limit:
                self._items.popitem(last=False)

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
