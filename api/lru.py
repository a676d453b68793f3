"""The API's in-process caches: one thread-safe LRU map with an optional time to live, used for
the API-key lookups (api.auth.KeyCache, with TTL), rendered certificates (api.routers.jobs) and
rendered reports (api.routers.report)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class LruCache(Generic[V]):
    """At most `size` entries, the least recently used dropped first; with `ttl_s`, an entry
    older than ttl_s seconds (monotonic clock) is dropped when next looked up."""

    def __init__(self, size: int, ttl_s: float | None = None) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self._data: OrderedDict[Hashable, tuple[V, float | None]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            hit = self._data.get(key)
            if hit is None:
                return None
            value, expires = hit
            if expires is not None and expires < time.monotonic():
                del self._data[key]
                return None
            self._data.move_to_end(key)
            return value

    def put(self, key: Hashable, value: V) -> None:
        expires = None if self.ttl_s is None else time.monotonic() + self.ttl_s
        with self._lock:
            self._data[key] = (value, expires)
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
