"""The LLM services' response cache: LRU with a TTL, bounded in bytes, for deterministic requests only.

Keys hash the model version and the normalized request (the exact engine input and the
sampling parameters), so a new model version never sees the old one's answers; the owner also
clears the cache on a version change to give the bytes back at once.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ENTRY_OVERHEAD_BYTES = 256  # bookkeeping per entry, counted against the byte bound


@dataclass(frozen=True)
class CachedAnswer:
    """What a finished generation leaves for a repeat: enough to rebuild any response shape."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

    @property
    def nbytes(self) -> int:
        return len(self.text.encode()) + ENTRY_OVERHEAD_BYTES


@dataclass(frozen=True)
class CacheStats:
    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    prefetches: int  # entries stored by the prefetch job
    evictions: int  # dropped for room (LRU)
    expirations: int  # dropped for age (TTL)
    invalidations: int  # clears on a model version change


def is_deterministic(temperature: float, seed: int | None) -> bool:
    """Only these requests are cached: the same input gives the same output."""
    return temperature == 0 or seed is not None


def cache_key(model_version: str, request: dict[str, Any]) -> str:
    """sha256 of the model version and the normalized request (sorted-key JSON)."""
    text = json.dumps({"model": model_version, "request": request}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class _Entry:
    answer: CachedAnswer
    stored_at: float
    nbytes: int


class ResponseCache:
    """Thread-safe; get() counts a hit or a miss, put() evicts least recently used entries."""

    def __init__(
        self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.prefetches = 0
        self.evictions = self.expirations = self.invalidations = 0

    def get(self, key: str, *, count: bool = True) -> CachedAnswer | None:
        """The answer under `key` if present and fresh (and mark it recently used)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and self._clock() - entry.stored_at > self.ttl_s:
                self._drop(key)
                self.expirations += 1
                entry = None
            if entry is None:
                self.misses += count
                return None
            self._entries.move_to_end(key)
            self.hits += count
            return entry.answer

    def contains(self, key: str) -> bool:
        """Fresh and present, without counting or touching the LRU order."""
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and self._clock() - entry.stored_at <= self.ttl_s

    def put(self, key: str, answer: CachedAnswer, *, prefetched: bool = False) -> bool:
        """Store an answer; False when it alone is larger than the whole cache."""
        nbytes = answer.nbytes
        with self._lock:
            if nbytes > self.max_bytes:
                return False
            if key in self._entries:
                self._drop(key)
            while self._bytes + nbytes > self.max_bytes and self._entries:
                self._drop(next(iter(self._entries)))
                self.evictions += 1
            self._entries[key] = _Entry(answer, self._clock(), nbytes)
            self._bytes += nbytes
            self.prefetches += prefetched
            return True

    def clear(self) -> None:
        """Forget every answer (a model version change)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self.invalidations += 1

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                entries=len(self._entries),
                bytes=self._bytes,
                max_bytes=self.max_bytes,
                hits=self.hits,
                misses=self.misses,
                prefetches=self.prefetches,
                evictions=self.evictions,
                expirations=self.expirations,
                invalidations=self.invalidations,
            )

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.nbytes
