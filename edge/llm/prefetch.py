"""Prefetch: warm the response cache and the engine's prefix cache before anyone asks.

One run (an APScheduler job, and right after a model or policy change) warms
(a) the prompts the policy lists, as a chat turn and as a completion, greedy;
(b) the most requested deterministic requests of the last window that are not cached;
(c) the KV prefix blocks of the policy's prompt templates (their text before the first
    placeholder, as a completion prompt and as the start of a user turn).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from fieldline.edge.engine.sequence import SamplingParams
from fieldline.edge.llm.chat_template import ChatMessage
from fieldline.edge.llm.completions import (
    PRIORITY_PREFETCH,
    GenerationRequest,
    Recipe,
    complete,
    prepare,
    run_to_end,
)
from fieldline.edge.llm.metrics import LlmMetrics
from fieldline.edge.llm.response_cache import ResponseCache
from fieldline.edge.llm.runtime import LLMRuntime, ModelUnavailable, ServedModel
from fieldline.shared.config import GatewaySettings
from fieldline.shared.policy import Policy, template_prefix

log = structlog.get_logger(__name__)

HOT_MAX_EVENTS = 20_000  # requests remembered for "most requested" (oldest forgotten first)
# Longer requests are not tracked as hot: bounds the memory the tracker may hold.
HOT_MAX_PROMPT_CHARS = 4096
COMPLETION_DEFAULT_MAX_TOKENS = 16  # as the gateway's /v1/completions
# Marks where a template's fixed text ends inside a rendered chat prompt.
CUT_MARK = "\u2063fieldline-template-cut\u2063"
# The last tokens of a template prefix may merge with the text that fills it in; leave them.
BOUNDARY_TOKENS = 1


class HotRequests:
    """Deterministic requests the gateway served, with their times, to find the hot ones.

    Equal requests share one stored Recipe, and long ones are not tracked, so the memory held
    stays bounded by HOT_MAX_EVENTS and HOT_MAX_PROMPT_CHARS.
    """

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._events: deque[tuple[float, Recipe]] = deque()
        self._counts: Counter[Recipe] = Counter()
        self._interned: dict[Recipe, Recipe] = {}

    def record(self, recipe: Recipe) -> None:
        if not recipe.deterministic or _prompt_chars(recipe) > HOT_MAX_PROMPT_CHARS:
            return
        if len(self._events) >= HOT_MAX_EVENTS:
            self._forget_oldest()
        stored = self._interned.setdefault(recipe, recipe)  # one copy per distinct request
        self._counts[stored] += 1
        self._events.append((self._clock(), stored))

    def top(self, n: int) -> list[Recipe]:
        """The n most requested recipes of the last window, most requested first."""
        cutoff = self._clock() - self.window_s
        while self._events and self._events[0][0] < cutoff:
            self._forget_oldest()
        return [recipe for recipe, _ in self._counts.most_common(n)]

    def _forget_oldest(self) -> None:
        _, recipe = self._events.popleft()
        self._counts[recipe] -= 1
        if self._counts[recipe] <= 0:
            del self._counts[recipe], self._interned[recipe]


def _prompt_chars(recipe: Recipe) -> int:
    if recipe.kind == "chat":
        return sum(len(m.content) for m in recipe.messages)
    return len(recipe.prompt)


@dataclass
class PrefetchReport:
    model: str | None = None
    prompts_warmed: int = 0  # answers computed and cached (listed and hot)
    prompts_fresh: int = 0  # already cached, left alone
    prefixes_warmed: int = 0  # template prefixes computed into the prefix cache
    prefixes_fresh: int = 0
    errors: int = 0


class Prefetcher:
    def __init__(
        self,
        llm: LLMRuntime,
        cache: ResponseCache,
        hot: HotRequests,
        policy: Callable[[], Policy],
        settings: GatewaySettings,
        metrics: LlmMetrics | None = None,
    ) -> None:
        self.llm = llm
        self.cache = cache
        self.hot = hot
        self.policy = policy
        self.settings = settings
        self.metrics = metrics
        self.last: PrefetchReport | None = None
        self._lock = asyncio.Lock()
        self._pending: asyncio.Task[PrefetchReport | None] | None = None
        self._queued = False  # a woken run waits for the lock and has not started

    def wake(self) -> None:
        """Run soon (a model or policy change), after any run in progress; a woken run that
        has not started yet covers later wakes."""
        if not self._queued:
            self._queued = True
            self._pending = asyncio.get_running_loop().create_task(self._woken())

    async def settled(self) -> None:
        """Wait for the woken run, if any (tests and the bench wait for the warm-up)."""
        if self._pending is not None:
            await asyncio.shield(self._pending)

    async def run_once(self) -> PrefetchReport | None:
        """One warm-up pass; None when no model serves."""
        async with self._lock:
            return await self._run_locked()

    async def _woken(self) -> PrefetchReport | None:
        async with self._lock:
            self._queued = False
            try:
                return await self._run_locked()
            except Exception:  # nobody awaits this task: say so here
                log.exception("prefetch run failed")
                self._count("failed")
                return None

    async def _run_locked(self) -> PrefetchReport | None:
        try:
            async with self.llm.lease() as served:
                report = await self._run(served, self.policy())
        except ModelUnavailable:
            self._count("no_model")
            return None
        self.last = report
        self._count("ok" if not report.errors else "errors")
        log.info("prefetch done", **report.__dict__)
        return report

    def listed_recipes(self, policy: Policy) -> list[Recipe]:
        """The requests a listed prompt stands for: a one-turn chat and a completion, greedy."""
        recipes = []
        for prompt in policy.prefetch_prompts:
            recipes.append(
                Recipe(
                    kind="chat",
                    messages=(ChatMessage("user", prompt),),
                    max_tokens=policy.prefetch_max_tokens or self.settings.default_max_tokens,
                    temperature=0.0,
                )
            )
            recipes.append(
                Recipe(
                    kind="completion",
                    prompt=prompt,
                    max_tokens=policy.prefetch_max_tokens or COMPLETION_DEFAULT_MAX_TOKENS,
                    temperature=0.0,
                )
            )
        return recipes

    def template_prompts(self, served: ServedModel, template: str) -> list[list[int]]:
        """Token ids of a template's fixed prefix, in completion form and chat form.

        Blocking (template rendering, tokenizer): _run calls it in a worker thread.
        """
        prefix = template_prefix(template)
        if not prefix:
            return []
        forms = [served.encode(prefix)]
        if served.engine.engine.tokenizer is not None:
            rendered = served.chat_prompt([ChatMessage("user", prefix + CUT_MARK)])
            if CUT_MARK in rendered:
                forms.append(served.encode(rendered.split(CUT_MARK, 1)[0]))
        return [ids[:-BOUNDARY_TOKENS] for ids in forms if len(ids) > BOUNDARY_TOKENS]

    async def _run(self, served: ServedModel, policy: Policy) -> PrefetchReport:
        report = PrefetchReport(model=served.ref)
        recipes = self.listed_recipes(policy) + self.hot.top(self.settings.hot_top_n)
        for recipe in dict.fromkeys(recipes):
            try:
                req = await prepare(served, recipe)
                if req.cache_key is None or self.cache.contains(req.cache_key):
                    report.prompts_fresh += 1
                    continue
                await complete(served, req, self.cache, priority=PRIORITY_PREFETCH, prefetched=True)
                report.prompts_warmed += 1
            except ValueError as exc:  # a prompt this model cannot take (too long, ...)
                report.errors += 1
                log.warning("prefetch prompt refused", error=str(exc))
        block = served.config.block_size
        for template in policy.prompt_templates:
            try:
                forms = await asyncio.to_thread(self.template_prompts, served, template)
            except ValueError as exc:
                report.errors += 1
                log.warning("prefetch template refused", error=str(exc))
                continue
            for ids in forms:
                full = (len(ids) - 1) // block * block
                if full == 0 or await served.engine.cached_prefix_tokens(ids) >= full:
                    report.prefixes_fresh += 1
                    continue
                await self._warm_prefix(served, ids)
                report.prefixes_warmed += 1
        return report

    async def _warm_prefix(self, served: ServedModel, ids: list[int]) -> None:
        """Prefill `ids` so its full blocks stay in the prefix cache (one token is sampled)."""
        req = GenerationRequest(ids, SamplingParams(temperature=0.0, max_tokens=1), (), None)
        await run_to_end(served, req, PRIORITY_PREFETCH)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.prefetch_runs.labels(outcome).inc()
