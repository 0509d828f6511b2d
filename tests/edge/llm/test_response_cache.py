"""The response cache: LRU order, TTL, the byte bound, counters, and what counts as deterministic."""

from __future__ import annotations

from fieldline.edge.llm.chat_template import ChatMessage
from fieldline.edge.llm.completions import Recipe
from fieldline.edge.llm.prefetch import HotRequests
from fieldline.edge.llm.response_cache import (
    ENTRY_OVERHEAD_BYTES,
    CachedAnswer,
    ResponseCache,
    cache_key,
    is_deterministic,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def answer(text: str) -> CachedAnswer:
    return CachedAnswer(text, "length", 3, len(text))


def test_hit_miss_and_lru_eviction_by_bytes() -> None:
    size = answer("x" * 100).nbytes
    cache = ResponseCache(max_bytes=3 * size, ttl_s=60)
    for k in "abc":
        assert cache.put(k, answer(k * 100))
    assert cache.get("a") == answer("a" * 100)  # a is now the most recently used
    cache.put("d", answer("d" * 100))  # evicts b, the least recently used
    assert cache.get("b") is None
    assert {k for k in "acd" if cache.get(k)} == set("acd")
    st = cache.stats()
    assert (st.entries, st.bytes, st.evictions) == (3, 3 * size, 1)
    assert (st.hits, st.misses) == (4, 1)
    assert st.bytes <= st.max_bytes


def test_entry_larger_than_the_cache_is_refused_and_nothing_is_lost() -> None:
    cache = ResponseCache(max_bytes=ENTRY_OVERHEAD_BYTES + 10, ttl_s=60)
    assert cache.put("small", answer("0123456789"))
    assert not cache.put("big", answer("x" * 11))
    assert cache.get("small") is not None and cache.get("big") is None


def test_ttl_expires_entries() -> None:
    clock = Clock()
    cache = ResponseCache(max_bytes=10_000, ttl_s=30, clock=clock)
    cache.put("k", answer("hello"))
    clock.now += 29
    assert cache.contains("k") and cache.get("k") is not None
    clock.now += 2
    assert not cache.contains("k")
    assert cache.get("k") is None
    st = cache.stats()
    assert (st.expirations, st.entries, st.bytes) == (1, 0, 0)


def test_clear_counts_an_invalidation_and_frees_bytes() -> None:
    cache = ResponseCache(max_bytes=10_000, ttl_s=30)
    cache.put("k", answer("hello"), prefetched=True)
    cache.clear()
    st = cache.stats()
    assert (st.entries, st.bytes, st.invalidations, st.prefetches) == (0, 0, 1, 1)


def test_keys_depend_on_model_version_and_every_request_field() -> None:
    req = {"prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0.0, "seed": None}
    base = cache_key("m@1", req)
    assert base == cache_key("m@1", dict(reversed(list(req.items()))))  # order-free
    assert base != cache_key("m@2", req)
    assert base != cache_key("m@1", {**req, "max_tokens": 9})
    assert base != cache_key("m@1", {**req, "prompt": [1, 2, 4]})


def test_only_greedy_or_seeded_requests_are_deterministic() -> None:
    assert is_deterministic(0.0, None)
    assert is_deterministic(0.8, 42)
    assert not is_deterministic(0.8, None)


def test_hot_requests_counts_within_the_window_and_ignores_random_sampling() -> None:
    clock = Clock()
    hot = HotRequests(window_s=60, clock=clock)
    a = Recipe(kind="chat", messages=(ChatMessage("user", "a"),), temperature=0.0)
    b = Recipe(kind="completion", prompt="b", temperature=0.0)
    sampled = Recipe(kind="completion", prompt="c", temperature=0.9)
    hot.record(b)
    clock.now += 61  # b falls out of the window
    for r in (a, a, b, sampled, sampled, sampled):
        hot.record(r)
    assert hot.top(5) == [a, b]
    assert hot.top(1) == [a]


def test_hot_requests_hold_one_copy_per_request_and_skip_long_prompts() -> None:
    hot = HotRequests(window_s=60)
    first = Recipe(kind="completion", prompt="same", temperature=0.0)
    for _ in range(5):
        hot.record(Recipe(kind="completion", prompt="same", temperature=0.0))
    assert hot.top(1)[0] is not None and len(hot._interned) == 1
    assert next(iter(hot._interned)) == first
    hot.record(Recipe(kind="completion", prompt="x" * 10_000, temperature=0.0))
    assert len(hot.top(5)) == 1
