"""Engine metrics: counters and recent latency windows; snapshot() hands out plain values.

Nothing here registers Prometheus metrics: the gateway reads snapshots and exports them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from fieldline.edge.engine.scheduler import SchedulerStats
from fieldline.shared.health import percentile

LATENCY_WINDOW = 1024  # samples kept per latency series for percentiles


@dataclass(frozen=True)
class LatencySummary:
    """Seconds. count and total grow forever (Prometheus summary style); the rest are over
    the last LATENCY_WINDOW samples."""

    count: int
    total: float
    p50: float
    p95: float
    max: float
    recent: tuple[float, ...]


@dataclass(frozen=True)
class MetricsSnapshot:
    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of KV blocks not free
    kv_slots_live: int  # slots holding tokens of running requests
    kv_slots_allocated: int  # slots in blocks running requests hold
    prefix_cache_queries: int  # tokens looked up in the prefix cache
    prefix_cache_hits: int  # tokens found there
    num_preemptions: int
    token_budget: int  # current per-step token budget (moves in SLO mode)
    num_requests_finished: int
    num_generated_tokens: int
    ttft: LatencySummary
    itl: LatencySummary
    request_latency: LatencySummary

    @property
    def prefix_cache_hit_rate(self) -> float:
        return (
            self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        )


class LatencySeries:
    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.window: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        self.window.append(seconds)

    def summary(self) -> LatencySummary:
        ordered = sorted(self.window)
        return LatencySummary(
            count=self.count,
            total=self.total,
            p50=percentile(ordered, 0.50) or 0.0,
            p95=percentile(ordered, 0.95) or 0.0,
            max=ordered[-1] if ordered else 0.0,
            recent=tuple(self.window),
        )


class EngineMetrics:
    def __init__(self) -> None:
        self.ttft = LatencySeries()
        self.itl = LatencySeries()
        self.request_latency = LatencySeries()
        self.num_requests_finished = 0
        self.num_generated_tokens = 0

    def snapshot(self, stats: SchedulerStats) -> MetricsSnapshot:
        return MetricsSnapshot(
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
            kv_usage=stats.blocks.usage,
            kv_slots_live=stats.kv_slots_live,
            kv_slots_allocated=stats.kv_slots_allocated,
            prefix_cache_queries=stats.blocks.prefix_cache_queries,
            prefix_cache_hits=stats.blocks.prefix_cache_hits,
            num_preemptions=stats.num_preemptions,
            token_budget=stats.token_budget,
            num_requests_finished=self.num_requests_finished,
            num_generated_tokens=self.num_generated_tokens,
            ttft=self.ttft.summary(),
            itl=self.itl.summary(),
            request_latency=self.request_latency.summary(),
        )
