"""The edge's local-LLM side as one owned unit: the LLM runtime, the response cache, the
hot-request tracker, the prefetch job and the alert explainer, started and stopped in order.

The agent builds one and serves it over HTTP with edge/gateway (GatewayServer); the tests'
ThreadedGateway and bench/gateway.py do the same. `choose_llm` picks what it serves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from fieldline.edge.llm.explanations import AlertExplainer, PublishFn, StoreFn
from fieldline.edge.llm.metrics import LlmMetrics
from fieldline.edge.llm.prefetch import HotRequests, Prefetcher
from fieldline.edge.llm.response_cache import ResponseCache
from fieldline.edge.llm.runtime import LLMRuntime, ServedModel
from fieldline.shared.config import GatewaySettings, LLMSettings
from fieldline.shared.health import CacheHealth, LlmHealth, PrefetchHealth
from fieldline.shared.policy import Policy

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class LLMChoice:
    """The LLM artifact to serve: name, version and its installed file (or a directory)."""

    name: str
    version: str
    path: Path


def choose_llm(policy: Policy, active_llms: dict[str, tuple[str, Path]]) -> LLMChoice | None:
    """The policy's llm_model if active, else the only active LLM; None when there is none.

    With several active and none named, the first by name serves (health says so).
    """
    if policy.llm_model is not None:
        if policy.llm_model not in active_llms:
            return None
        version, path = active_llms[policy.llm_model]
        return LLMChoice(policy.llm_model, version, path)
    if not active_llms:
        return None
    name = sorted(active_llms)[0]
    if len(active_llms) > 1:
        log.warning(
            "several LLM artifacts are active and the policy names none (llm_model)",
            serving=name,
            active=sorted(active_llms),
        )
    version, path = active_llms[name]
    return LLMChoice(name, version, path)


class LlmServices:
    """Runtime, response cache, hot requests, prefetcher, explainer; `settings` are the
    gateway's (cache bounds, hot window, prefetch), which configure these services."""

    def __init__(
        self,
        settings: GatewaySettings,
        llm: LLMSettings,
        policy: Callable[[], Policy],
        *,
        publish: PublishFn | None = None,
        store: StoreFn | None = None,
    ) -> None:
        self.llm = LLMRuntime(llm)
        self.cache = ResponseCache(settings.cache_max_bytes, settings.cache_ttl_s)
        self.hot = HotRequests(settings.hot_window_s)
        self.metrics = LlmMetrics(self.cache)
        self.prefetcher = Prefetcher(
            self.llm, self.cache, self.hot, policy, settings, metrics=self.metrics
        )
        self.explainer = AlertExplainer(
            self.llm, publish or _nowhere, store or _nowhere_store, metrics=self.metrics
        )
        self.llm.on_change.append(self._on_model_change)

    async def start(self) -> None:
        self.explainer.start()

    async def stop(self) -> None:
        """Explanations in flight are cancelled, then the model drains and stops."""
        await self.explainer.stop()
        await self.llm.stop()

    async def apply(self, choice: LLMChoice | None) -> None:
        """Serve `choice` (load, swap, drain) or nothing; then warm the caches."""
        if choice is None:
            await self.llm.deactivate()
        else:
            await self.llm.activate(choice.name, choice.version, choice.path)
        self.prefetcher.wake()

    def _on_model_change(self, served: ServedModel | None) -> None:
        # Answers of the old version must never be served for the new one.
        self.cache.clear()

    def health(self) -> LlmHealth:
        return self.llm.health()

    def cache_health(self) -> CacheHealth:
        stats = self.cache.stats()
        return CacheHealth(
            entries=stats.entries,
            bytes=stats.bytes,
            hits=stats.hits,
            misses=stats.misses,
            prefetches=stats.prefetches,
        )

    def prefetch_health(self) -> PrefetchHealth | None:
        last = self.prefetcher.last
        return PrefetchHealth.model_validate(last, from_attributes=True) if last else None


def _nowhere(topic: str, payload: bytes) -> None:
    log.debug("no publisher; explanation not published", topic=topic)


def _nowhere_store(topic: str, payload: bytes, ts_ms: int) -> None:
    return None
