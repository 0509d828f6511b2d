"""Alert explanations: for a defect verdict whose rule names a prompt template, ask the LLM for a
short explanation and publish it beside the verdict (RESULT_TOPIC/explanations by default).

The inspection worker only hands the verdict over (a thread-safe call_soon, microseconds); the
verdict is stored and published before and regardless of any explanation. Explanations run at
the engine's lowest priority, at most MAX_PENDING at once; beyond that they are dropped and
counted, never queued without bound.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import structlog

from fieldline.edge.inspection.runtime import Verdict
from fieldline.edge.llm.chat_template import ChatMessage
from fieldline.edge.llm.completions import PRIORITY_EXPLAIN, Recipe, prepare, run_to_end
from fieldline.edge.llm.metrics import LlmMetrics
from fieldline.edge.llm.runtime import LLMRuntime, ModelUnavailable
from fieldline.shared.clock import now_ms
from fieldline.shared.policy import InspectionRule

log = structlog.get_logger(__name__)

MAX_PENDING = 32

PublishFn = Callable[[str, bytes], None]
StoreFn = Callable[[str, bytes, int], None]  # topic, payload, ts_ms (blocking: a SQLite write)


def explain_prompt(rule: InspectionRule, verdict: Verdict) -> str:
    assert rule.explain_template is not None
    return rule.explain_template.format(
        label=verdict.label,
        score=f"{verdict.score:.3f}",
        topic=verdict.topic,
        rule=verdict.rule,
        model=verdict.model,
        model_version=verdict.model_version,
    )


class AlertExplainer:
    def __init__(
        self,
        llm: LLMRuntime,
        publish: PublishFn,
        store: StoreFn,
        metrics: LlmMetrics | None = None,
    ) -> None:
        self.llm = llm
        self._publish = publish
        self._store = store
        self.metrics = metrics
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.published = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        self._loop = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def on_verdict(self, verdict: Verdict, rule: InspectionRule | None) -> None:
        """Called on inspection worker threads after the verdict is stored; never blocks."""
        if rule is None or not verdict.defect or not rule.explain_template:
            return
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._submit, verdict, rule)
        except RuntimeError:  # the loop closed while stopping
            self._count("stopped")

    def _submit(self, verdict: Verdict, rule: InspectionRule) -> None:
        if self._loop is None:
            return
        if len(self._tasks) >= MAX_PENDING:
            self._count("dropped_busy")
            return
        task = self._loop.create_task(self._explain(verdict, rule))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _explain(self, verdict: Verdict, rule: InspectionRule) -> None:
        started = time.monotonic()
        try:
            async with self.llm.lease() as served:
                recipe = Recipe(
                    kind="chat",
                    messages=(ChatMessage("user", explain_prompt(rule, verdict)),),
                    max_tokens=rule.explain_max_tokens,
                    temperature=0.0,
                )
                answer = await run_to_end(served, await prepare(served, recipe), PRIORITY_EXPLAIN)
                model = served.ref
        except ModelUnavailable:
            self._count("no_model")
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            self._count("error")
            log.exception("alert explanation failed", rule=rule.name)
            return
        body: dict[str, Any] = {
            "rule": verdict.rule,
            "topic": verdict.topic,
            "record_seq": verdict.record_seq,
            "verdict_ts_ms": verdict.ts_ms,
            "label": verdict.label,
            "score": verdict.score,
            "llm": model,
            "explanation": answer.text.strip(),
            "finish_reason": answer.finish_reason,
            "latency_ms": round((time.monotonic() - started) * 1000, 1),
            "ts_ms": now_ms(),
        }
        payload = json.dumps(body, separators=(",", ":")).encode()
        topic = rule.explanation_topic
        try:
            self._publish(topic, payload)
            await asyncio.to_thread(self._store, topic, payload, body["ts_ms"])
        except Exception:
            self._count("error")
            log.exception("alert explanation could not be published or stored", topic=topic)
            return
        self.published += 1
        self._count("published")

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.explanations.labels(outcome).inc()
