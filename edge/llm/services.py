"""The edge's local-LLM side as one owned unit: the LLM runtime, the response cache, the prefetch
job, the alert explainer and the HTTP gateway, started and stopped in order.

The agent builds one; tests and bench/gateway.py build one the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from fieldline.edge.gateway.app import GatewayError, GatewayServer
from fieldline.edge.gateway.deps import GatewayState, InspectFn
from fieldline.edge.gateway.metrics import GatewayMetrics
from fieldline.edge.llm.explanations import AlertExplainer, PublishFn, StoreFn
from fieldline.edge.llm.prefetch import HotRequests, Prefetcher
from fieldline.edge.llm.response_cache import ResponseCache
from fieldline.edge.llm.runtime import LLMRuntime, ServedModel
from fieldline.shared.config import GatewaySettings, LLMSettings
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


class GatewayStack:
    def __init__(
        self,
        gateway: GatewaySettings,
        llm: LLMSettings,
        policy: Callable[[], Policy],
        *,
        data_dir: Path | None = None,
        inspect: InspectFn | None = None,
        publish: PublishFn | None = None,
        store: StoreFn | None = None,
        extra_registries: list[CollectorRegistry] | None = None,
    ) -> None:
        self.settings = gateway
        self.policy = policy
        self.llm = LLMRuntime(llm)
        self.cache = ResponseCache(gateway.cache_max_bytes, gateway.cache_ttl_s)
        self.hot = HotRequests(gateway.hot_window_s)
        self.metrics = GatewayMetrics(self.cache)
        self.state = GatewayState(
            settings=gateway,
            llm=self.llm,
            cache=self.cache,
            hot=self.hot,
            metrics=self.metrics,
            inspect=inspect,
            extra_registries=list(extra_registries or []),
        )
        self.prefetcher = Prefetcher(
            self.llm, self.cache, self.hot, policy, gateway, metrics=self.metrics
        )
        self.explainer = AlertExplainer(
            self.llm, publish or _nowhere, store or _nowhere_store, metrics=self.metrics
        )
        self.server = GatewayServer(self.state, data_dir) if gateway.enabled else None
        self.error: str | None = None
        self.llm.on_change.append(self._on_model_change)

    @property
    def port(self) -> int | None:
        return self.server.port if self.server else None

    async def start(self) -> None:
        """Start the explainer and the HTTP server; a port that cannot be bound is reported in
        health() and logged, and the rest of the node goes on."""
        self.explainer.start()
        if self.server is not None:
            try:
                await self.server.start()
            except GatewayError as exc:
                self.error = str(exc)
                log.error("gateway not started", error=str(exc))

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
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

    def health(self) -> dict[str, Any]:
        stats = self.cache.stats()
        last = self.prefetcher.last
        return {
            "listening": self.port,
            "error": self.error,
            "cache": {
                "entries": stats.entries,
                "bytes": stats.bytes,
                "hits": stats.hits,
                "misses": stats.misses,
                "prefetches": stats.prefetches,
            },
            "prefetch": last.__dict__ if last else None,
            "explanations_published": self.explainer.published,
        }


def _nowhere(topic: str, payload: bytes) -> None:
    log.debug("no publisher; explanation not published", topic=topic)


def _nowhere_store(topic: str, payload: bytes, ts_ms: int) -> None:
    return None
