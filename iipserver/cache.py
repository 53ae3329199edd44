"""Caches: in-process LRUs (by bytes, by entries) and the shared memcached response cache."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

V = TypeVar("V", bytes, np.ndarray)
K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

log = logging.getLogger(__name__)

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


class SharedCache(Protocol):
    """A cache of whole encoded responses shared by processes and machines (fail-open)."""

    def get(self, key: str) -> bytes | None:
        """Return the stored value or None (a miss, or the cache is unreachable)."""
        ...

    def set(self, key: str, value: bytes) -> None:
        """Store ``value``; failures are counted and ignored."""
        ...

    def stats(self) -> dict[str, int]:
        """Counters of this process."""
        ...


class NoSharedCache:
    """The shared cache turned off."""

    def get(self, key: str) -> bytes | None:
        """Always a miss."""
        return None

    def set(self, key: str, value: bytes) -> None:
        """Store nothing."""

    def stats(self) -> dict[str, int]:
        """No counters."""
        return {}


#: memcached's longest key, in bytes.
MAX_KEY = 250
_SAFE_KEY = re.compile(r"^[\x21-\x7e]+$")


def shared_key(prefix: str, material: str) -> str:
    """A memcached key: ``prefix:material`` when it is short and printable, else hashed."""
    key = f"{prefix}:{material}"
    if len(key.encode()) <= MAX_KEY and _SAFE_KEY.match(key):
        return key
    digest = hashlib.sha256(material.encode("utf-8", "surrogateescape")).hexdigest()
    return f"{prefix}:sha256:{digest}"


class MemcachedCache:
    """memcached through pylibmc: consistent hashing over ``servers``, binary protocol, no
    delay, short timeouts; an unreachable server is a miss and is retried after a second.

    Clients are made per thread and after fork, on first use.
    """

    BEHAVIORS = {
        "tcp_nodelay": True,
        "ketama": True,
        "connect_timeout": 50,  # ms
        "send_timeout": 100_000,  # µs
        "receive_timeout": 100_000,  # µs
    }
    #: Seconds during which a failed client is not used; then a new one reconnects.
    RETRY = 1.0

    def __init__(self, servers: Sequence[str], expiry: int) -> None:
        self.servers = list(servers)
        self.expiry = int(expiry)
        self._local = threading.local()
        self._pid = os.getpid()
        self.counts = {
            "hits": 0, "misses": 0, "stores": 0, "errors": 0, "too_big": 0, "skipped": 0,
        }  # fmt: skip

    def _client(self) -> Any | None:
        """This thread's client, or None while a recent failure keeps it off."""
        if self._pid != os.getpid():  # forked: never share a connection with the parent
            self._pid = os.getpid()
            self._local = threading.local()
        if time.monotonic() < getattr(self._local, "down_until", 0.0):
            self.counts["skipped"] += 1
            return None
        client = getattr(self._local, "client", None)
        if client is None:
            import pylibmc

            client = pylibmc.Client(self.servers, binary=True, behaviors=self.BEHAVIORS)
            self._local.client = client
        return client

    def _failed(self, what: str, exc: Exception) -> None:
        self.counts["errors"] += 1
        self._local.client = None
        self._local.down_until = time.monotonic() + self.RETRY
        log.info("memcached %s failed (%s); retrying in %.0f s", what, exc, self.RETRY)

    def get(self, key: str) -> bytes | None:
        """Return the stored value or None; errors count and are a miss."""
        import pylibmc

        client = self._client()
        if client is None:
            return None
        try:
            value = client.get(key)
        except pylibmc.Error as exc:
            self._failed("get", exc)
            return None
        self.counts["hits" if value is not None else "misses"] += 1
        return None if value is None else bytes(value)

    def set(self, key: str, value: bytes) -> None:
        """Store ``value`` for the expiry; a value too big for memcached is skipped."""
        import pylibmc

        client = self._client()
        if client is None:
            return
        try:
            client.set(key, value, time=self.expiry)
            self.counts["stores"] += 1
        except pylibmc.TooBig:
            self.counts["too_big"] += 1
        except pylibmc.Error as exc:
            self._failed("set", exc)

    def stats(self) -> dict[str, int]:
        """Counters of this process."""
        return dict(self.counts)


def parse_servers(text: str) -> list[str]:
    """``host[:port],host2[:port]`` (commas or spaces) to pylibmc server specs."""
    servers = []
    for item in re.split(r"[,\s]+", text.strip()):
        if item:
            servers.append(item if ":" in item.rsplit("]", 1)[-1] else f"{item}:11211")
    return servers


def shared_cache(servers: str, expiry: int) -> SharedCache:
    """The shared cache for the ``MEMCACHED_SERVERS`` setting (empty: off)."""
    parsed = parse_servers(servers)
    return MemcachedCache(parsed, expiry) if parsed else NoSharedCache()
