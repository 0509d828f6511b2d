"""Prometheus metrics of the LLM services: the engine (fieldline_engine_*), the response cache,
prefetch runs and alert explanations. The gateway's /metrics shows them beside its HTTP counters
(edge/gateway/metrics.py).

The names keep their fieldline_gateway_ prefix (cache, prefetch runs, explanations): deploy/'s
alert rules and dashboards use them, so they must not change when the code moves.
The engine's numbers come from a snapshot read between engine steps (refresh()); the collector
only turns the latest snapshot into Prometheus families.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from fieldline.edge.engine.metrics import LatencySummary, MetricsSnapshot
from fieldline.edge.llm.response_cache import ResponseCache
from fieldline.edge.llm.runtime import LLMRuntime

QUANTILES = (("0.5", "p50"), ("0.95", "p95"))


@dataclass(frozen=True)
class EngineReading:
    model: str
    version: str
    snapshot: MetricsSnapshot


def _summary(name: str, doc: str, s: LatencySummary) -> Metric:
    m = Metric(name, doc, "summary")
    for q, attr in QUANTILES:
        m.add_sample(name, {"quantile": q}, getattr(s, attr))
    m.add_sample(f"{name}_count", {}, s.count)
    m.add_sample(f"{name}_sum", {}, s.total)
    return m


class EngineCollector(Collector):
    """Exports the last engine snapshot handed to update(); nothing when no model serves."""

    def __init__(self) -> None:
        self.reading: EngineReading | None = None

    def update(self, reading: EngineReading | None) -> None:
        self.reading = reading

    def collect(self) -> Iterator[Metric]:
        r = self.reading
        if r is None:
            return
        s = r.snapshot
        info = GaugeMetricFamily(
            "fieldline_engine_model", "The LLM serving (1)", labels=["model", "version"]
        )
        info.add_metric([r.model, r.version], 1)
        yield info
        yield GaugeMetricFamily("fieldline_engine_running", "Requests running", value=s.num_running)
        yield GaugeMetricFamily("fieldline_engine_waiting", "Requests waiting", value=s.num_waiting)
        yield GaugeMetricFamily(
            "fieldline_engine_kv_usage_ratio", "Share of KV blocks in use", value=s.kv_usage
        )
        yield GaugeMetricFamily(
            "fieldline_engine_token_budget", "Per-step token budget", value=s.token_budget
        )
        yield CounterMetricFamily(
            "fieldline_engine_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            value=s.prefix_cache_queries,
        )
        yield CounterMetricFamily(
            "fieldline_engine_prefix_cache_hits",
            "Prompt tokens found in the prefix cache",
            value=s.prefix_cache_hits,
        )
        yield CounterMetricFamily(
            "fieldline_engine_preemptions", "Sequences preempted", value=s.num_preemptions
        )
        yield CounterMetricFamily(
            "fieldline_engine_requests_finished",
            "Requests finished (aborted ones included)",
            value=s.num_requests_finished,
        )
        yield CounterMetricFamily(
            "fieldline_engine_generated_tokens", "Tokens generated", value=s.num_generated_tokens
        )
        yield _summary(
            "fieldline_engine_time_to_first_token_seconds", "Time to first token", s.ttft
        )
        yield _summary("fieldline_engine_inter_token_latency_seconds", "Inter-token latency", s.itl)
        yield _summary(
            "fieldline_engine_request_latency_seconds", "Arrival to finish", s.request_latency
        )


class CacheCollector(Collector):
    """The response cache's counters and size."""

    def __init__(self, cache: ResponseCache) -> None:
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        st = self.cache.stats()
        for name, doc, value in (
            ("hits", "Requests answered from the response cache", st.hits),
            ("misses", "Cacheable requests not in the cache", st.misses),
            ("prefetches", "Answers stored by the prefetch job", st.prefetches),
            ("evictions", "Entries dropped for room", st.evictions),
            ("expirations", "Entries dropped for age", st.expirations),
            ("invalidations", "Cache clears on a model change", st.invalidations),
        ):
            yield CounterMetricFamily(f"fieldline_gateway_cache_{name}", doc, value=value)
        yield GaugeMetricFamily("fieldline_gateway_cache_entries", "Entries", value=st.entries)
        yield GaugeMetricFamily("fieldline_gateway_cache_bytes", "Bytes held", value=st.bytes)


class LlmMetrics:
    """The LLM services' metrics, in one registry."""

    def __init__(self, cache: ResponseCache) -> None:
        self.registry = CollectorRegistry()
        self.engine = EngineCollector()
        self.registry.register(self.engine)
        self.registry.register(CacheCollector(cache))
        self.prefetch_runs = Counter(
            "fieldline_gateway_prefetch_runs",
            "Prefetch job runs by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.explanations = Counter(
            "fieldline_gateway_explanations",
            "Alert explanations by outcome",
            ["outcome"],
            registry=self.registry,
        )

    async def refresh(self, llm: LLMRuntime) -> None:
        """Read the serving engine's snapshot (between steps) for the next scrape."""
        served = llm.current
        reading = None
        if served is not None and served.engine.running:
            snapshot = await served.engine.metrics_snapshot()
            reading = EngineReading(served.name, served.version, snapshot)
        self.engine.update(reading)
