"""A bounded memo safe to share between the event loop and worker threads. Pure; no I/O.

Rule outcomes and rendered signatures are memoised per tenant, and big messages are processed in
worker threads (``asyncio.to_thread``) while the loop processes small ones, so the same memo is
used from several threads. A lock makes every read, insert and reset one step: no caller ever
sees a half-reset memo, and the size bound holds exactly.

    >>> m: Memo[str, int] = Memo(2)
    >>> m.get_or_compute("a", lambda: 1), m.get_or_compute("a", lambda: 2)
    (1, 1)

How it fails: it does not; a full memo is emptied and refilled (a cost, never a wrong answer).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Memo(Generic[K, V]):
    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._data: dict[K, V] = {}
        self._lock = threading.Lock()

    def get_or_compute(self, key: K, compute: Callable[[], V]) -> V:
        """The memoised value for ``key``; ``compute`` runs outside the lock (it may be slow and
        pure: two threads may both compute a missing key, and either answer is the answer)."""
        with self._lock:
            if key in self._data:
                return self._data[key]
        value = compute()
        with self._lock:
            if len(self._data) >= self._max:
                self._data.clear()
            self._data[key] = value
        return value

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)
