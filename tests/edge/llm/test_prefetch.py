"""Prefetch over the real engine and a tiny random Llama: listed prompts are cached before any
request, a model change invalidates and re-warms, wakes coalesce; the hot-request tracker on
an injected clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from fieldline.edge.llm.chat_template import ChatMessage
from fieldline.edge.llm.completions import Recipe, build_request
from fieldline.edge.llm.prefetch import HOT_MAX_PROMPT_CHARS, HotRequests
from fieldline.edge.llm.services import LLMChoice, LlmServices
from fieldline.shared.config import GatewaySettings, LLMSettings
from fieldline.shared.policy import Policy
from tests.support.tiny_llm import write_tiny_llama

LLM = LLMSettings(device="cpu", autotune=False, kv_cache_bytes=4 * 1024 * 1024)
GATEWAY = GatewaySettings(port=0, hot_top_n=0)
LISTED = "inspect the weld seam and report defects"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(2)
    return write_tiny_llama(tmp_path_factory.mktemp("prefetch") / "tiny")


def runs(services: LlmServices, outcome: str) -> float:
    return services.metrics.prefetch_runs.labels(outcome)._value.get()  # type: ignore[no-any-return]


def test_listed_prompts_are_cached_before_any_request_and_a_new_model_invalidates(
    checkpoint: Path,
) -> None:
    async def main() -> None:
        services = LlmServices(GATEWAY, LLM, lambda: Policy(prefetch_prompts=[LISTED]))
        await services.start()
        await services.apply(LLMChoice("assistant", "1", checkpoint))
        await services.prefetcher.settled()
        served = services.llm.current
        assert served is not None
        recipes = services.prefetcher.listed_recipes(Policy(prefetch_prompts=[LISTED]))
        assert {r.kind for r in recipes} == {"chat", "completion"}
        v1_keys = [build_request(served, r).cache_key for r in recipes]
        assert all(k is not None and services.cache.contains(k) for k in v1_keys)
        report = services.prefetch_health()
        assert report is not None and report.model == "assistant@1"
        assert (report.prompts_warmed, report.prompts_fresh, report.errors) == (2, 0, 0)
        assert services.cache_health().prefetches == 2 and services.cache_health().hits == 0

        invalidations = services.cache.stats().invalidations
        await services.apply(LLMChoice("assistant", "2", checkpoint))
        await services.prefetcher.settled()
        assert services.cache.stats().invalidations == invalidations + 1
        assert not any(services.cache.contains(k) for k in v1_keys if k is not None)
        served = services.llm.current
        assert served is not None and served.ref == "assistant@2"
        v2_keys = [build_request(served, r).cache_key for r in recipes]
        assert all(k is not None and services.cache.contains(k) for k in v2_keys)

        # an unchanged cache is left alone by the next run
        report2 = await services.prefetcher.run_once()
        assert report2 is not None and (report2.prompts_warmed, report2.prompts_fresh) == (0, 2)
        await services.stop()

    asyncio.run(main())


def test_wakes_while_a_run_waits_coalesce_and_no_model_is_counted(checkpoint: Path) -> None:
    async def main() -> None:
        services = LlmServices(GATEWAY, LLM, lambda: Policy(prefetch_prompts=[LISTED]))
        await services.start()
        services.prefetcher.wake()
        await services.prefetcher.settled()
        assert runs(services, "no_model") == 1 and services.prefetcher.last is None
        await services.llm.activate("assistant", "1", checkpoint)
        for _ in range(3):
            services.prefetcher.wake()  # one queued run covers them all
        await services.prefetcher.settled()
        assert runs(services, "ok") == 1
        await services.stop()

    asyncio.run(main())


def chat(text: str, temperature: float = 0.0) -> Recipe:
    return Recipe(kind="chat", messages=(ChatMessage("user", text),), temperature=temperature)


def test_hot_requests_are_the_most_asked_of_the_window() -> None:
    now = [1000.0]
    hot = HotRequests(window_s=60.0, clock=lambda: now[0])
    for _ in range(3):
        hot.record(chat("oven"))
    hot.record(chat("belt"))
    hot.record(chat("sampled", temperature=0.7))  # not deterministic: never cached, not hot
    hot.record(chat("x" * (HOT_MAX_PROMPT_CHARS + 1)))  # too long to track
    assert hot.top(5) == [chat("oven"), chat("belt")]
    now[0] += 30
    for _ in range(3):
        hot.record(chat("belt"))
    assert hot.top(1) == [chat("belt")]
    now[0] += 45  # the first four requests left the window
    assert hot.top(5) == [chat("belt")]
    now[0] += 60
    assert hot.top(5) == []
