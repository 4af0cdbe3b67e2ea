"""`ByteLRU`: a thread-safe least-recently-used cache bounded in bytes, computing each key once.

    cache = ByteLRU(max_bytes=2 * 2**30, size_of=lambda entry: entry.nbytes)
    entry, computed = cache.get_or_compute(key, lambda: expensive(key))

Concurrent `get_or_compute` calls for one key run `compute` once: the first
caller computes, the others wait for its result (or its exception, which each
of them re-raises; nothing is cached then). Past `max_bytes`, the least
recently used entries are dropped; the newest entry is kept even when it alone
is larger.
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import Future
from typing import Any, Callable, Hashable, Optional


class ByteLRU:
    def __init__(self, max_bytes: int, size_of: Callable[[Any], int]) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0; got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._size_of = size_of
        self._entries: collections.OrderedDict[Hashable, tuple[Any, int]] = collections.OrderedDict()
        self._pending: dict[Hashable, Future] = {}
        self._lock = threading.Lock()
        self.nbytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, key: Hashable) -> Optional[Any]:
        """The entry for `key` (now the most recently used), or None."""
        with self._lock:
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
            return self._entries[key][0]

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._insert(key, value)

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """(entry, whether this call computed it)."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][0], False
            future = self._pending.get(key)
            owner = future is None
            if owner:
                future = self._pending[key] = Future()
        if not owner:
            return future.result(), False
        try:
            value = compute()
        except BaseException as err:
            with self._lock:
                del self._pending[key]
            future.set_exception(err)
            raise
        with self._lock:
            del self._pending[key]
            self._insert(key, value)
        future.set_result(value)
        return value, True

    def _insert(self, key: Hashable, value: Any) -> None:
        if key in self._entries:
            self.nbytes -= self._entries.pop(key)[1]
        size = int(self._size_of(value))
        self._entries[key] = (value, size)
        self.nbytes += size
        while self.nbytes > self.max_bytes and len(self._entries) > 1:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.nbytes -= dropped
