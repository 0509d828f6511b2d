"""The enrollment rate limiter: per address and overall, refusals counted, memory bounded."""

from __future__ import annotations

from fieldline.cloud.tunnel import ratelimit
from fieldline.cloud.tunnel.ratelimit import RateLimiter, peer_address


def test_rate_limiter_per_address_and_overall() -> None:
    now = [0.0]
    limiter = RateLimiter(rate_per_s=1, burst=3, global_rate_per_s=100, clock=lambda: now[0])
    assert [limiter.allow("a") for _ in range(5)] == [True, True, True, False, False]
    assert limiter.allow("b")  # another address has its own bucket
    now[0] += 1.0
    assert limiter.allow("a") and not limiter.allow("a")
    assert limiter.refused == 3


def test_the_overall_limit_holds_across_addresses() -> None:
    now = [0.0]
    limiter = RateLimiter(rate_per_s=1, burst=2, global_rate_per_s=5, clock=lambda: now[0])
    allowed = sum(limiter.allow(f"10.0.0.{i}") for i in range(50))
    assert allowed == 5  # the overall bucket starts with max(burst, rate) tokens
    now[0] += 1.0
    assert sum(limiter.allow(f"10.0.1.{i}") for i in range(50)) == 5


def test_a_flood_from_many_addresses_keeps_memory_bounded() -> None:
    limiter = RateLimiter(rate_per_s=1, burst=3, global_rate_per_s=1e9, clock=lambda: 0.0)
    for i in range(ratelimit.MAX_KEYS * 3):
        limiter.allow(f"2001:db8::{i:x}")
    assert len(limiter) == ratelimit.MAX_KEYS
    # The most recent addresses are the ones kept: their buckets are spent.
    newest = f"2001:db8::{ratelimit.MAX_KEYS * 3 - 1:x}"
    assert [limiter.allow(newest) for _ in range(3)] == [True, True, False]


def test_peer_address() -> None:
    assert peer_address("ipv4:10.0.0.1:5555") == "10.0.0.1"
    assert peer_address("ipv6:[::1]:5555") == "::1"
    assert peer_address("unix:/tmp/sock") == "unix:/tmp/sock"
