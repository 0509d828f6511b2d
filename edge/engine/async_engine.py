"""AsyncLLMEngine: the asyncio front of LLMEngine for the gateway.

A background task steps the engine in one worker thread, so the event loop stays responsive
while the model runs. Requests and aborts are queued to that thread and applied between
steps; a cancelled stream aborts its request, which frees its KV blocks at the next step.
Prompt text is tokenized and output text decoded (incrementally, engine/detokenizer.py) on
that thread too, never on the loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass

import structlog

from fieldline.edge.engine.config import EngineConfig
from fieldline.edge.engine.engine import LLMEngine, RequestOutput
from fieldline.edge.engine.metrics import MetricsSnapshot
from fieldline.edge.engine.sequence import SamplingParams
from fieldline.shared.ids import new_id

log = structlog.get_logger(__name__)

OUTCOMES_KEPT = 4096  # finished or failed requests remembered for health windows


@dataclass(frozen=True)
class RequestOutcome:
    """One request that ended: when (time.monotonic()), how long it took, and whether it failed."""

    at: float
    latency_s: float
    ok: bool


class EngineStoppedError(RuntimeError):
    """The engine stopped (or its step failed) before the request finished."""


@dataclass(frozen=True)
class StreamDelta:
    """What one engine step added to a request (decoded on the step thread, incrementally)."""

    token_ids: list[int]  # tokens new since the previous delta
    text: str  # text new since the previous delta ("" without a tokenizer or mid-character)
    finished: bool
    finish_reason: str | None


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    priority: int


@dataclass(frozen=True)
class _Abort:
    request_id: str


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine | EngineConfig) -> None:
        # A config builds the engine (and loads the model) here, before start().
        self.engine = engine if isinstance(engine, LLMEngine) else LLMEngine(engine)
        self._commands: deque[_Add | _Abort] = deque()  # loop thread -> step thread
        # requests that ended, newest last (the LLM's health window reads them)
        self.outcomes: deque[RequestOutcome] = deque(maxlen=OUTCOMES_KEPT)
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._lock = threading.Lock()  # held by the step thread while it touches the engine
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        assert self._task is None, "already started"
        self._stopping = False
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
        self._task = asyncio.create_task(self._run(), name="engine-loop")

    async def stop(self) -> None:
        """Finish the step in flight, abort every request, and stop the worker thread."""
        if self._task is None:
            return
        self._stopping = True
        self._wake.set()
        await self._task
        self._task = None
        assert self._executor is not None
        self._commands.clear()
        with self._lock:
            for request_id in list(self._streams):
                self.engine.abort(request_id)
        for queue in self._streams.values():
            queue.put_nowait(EngineStoppedError("engine stopped"))
        self._executor.shutdown(wait=True)
        self._executor = None

    async def __aenter__(self) -> AsyncLLMEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- requests --------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncGenerator[tuple[list[int], str], None]:
        """Yield (new token ids, new text) as tokens come."""
        # aclosing: closing this generator early must close the stream now (its abort
        # frees the blocks), not whenever the inner generator is garbage collected.
        async with aclosing(self.stream(prompt, params, request_id, priority)) as deltas:
            async for delta in deltas:
                yield delta.token_ids, delta.text

    async def stream(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncGenerator[StreamDelta, None]:
        """Like generate(), with the finish reason on the last delta.

        Raises ValueError for a request the engine refuses (too long, no tokenizer) and
        EngineStoppedError when the engine stops or fails before the request finishes.
        """
        if self._task is None or self._stopping:
            raise EngineStoppedError("engine is not running")
        request_id = request_id if request_id is not None else new_id("req")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = queue
        self._commands.append(_Add(request_id, prompt, params, priority))
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine already dropped it
                    raise item
                finished = item.finished
                yield StreamDelta(
                    token_ids=item.new_token_ids,
                    text=item.new_text,
                    finished=finished,
                    finish_reason=item.finish_reason,
                )
        finally:
            del self._streams[request_id]
            if not finished:  # cancelled or closed early: free its blocks at the next step
                self._commands.append(_Abort(request_id))
                self._wake.set()

    async def metrics_snapshot(self) -> MetricsSnapshot:
        """Engine metrics, read between steps (in a thread, so the loop never blocks)."""

        def read() -> MetricsSnapshot:
            with self._lock:
                return self.engine.metrics_snapshot()

        return await asyncio.to_thread(read)

    async def cached_prefix_tokens(self, prompt: str | list[int]) -> int:
        """LLMEngine.cached_prefix_tokens, read between steps."""

        def read() -> int:
            with self._lock:
                return self.engine.cached_prefix_tokens(prompt)

        return await asyncio.to_thread(read)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._stopping

    # -- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            if not self._commands and not self.engine.has_unfinished():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                rejected, outputs = await loop.run_in_executor(self._executor, self._step)
            except Exception as exc:
                log.exception("engine step failed; failing its requests")
                self._fail_all(exc)
                continue
            for request_id, error in rejected:
                self._deliver(request_id, error)
            for output in outputs:
                self._deliver(output.request_id, output)
                if output.finished and output.finish_reason != "abort":
                    self._outcome(output.metrics.latency or 0.0, ok=True)

    def _step(self) -> tuple[list[tuple[str, ValueError]], list[RequestOutput]]:
        """On the step thread: apply queued adds and aborts, then run one engine step."""
        rejected: list[tuple[str, ValueError]] = []
        with self._lock:
            while self._commands:
                command = self._commands.popleft()
                if isinstance(command, _Abort):
                    self.engine.abort(command.request_id)
                    continue
                try:
                    self.engine.add_request(
                        command.prompt, command.params, command.priority, command.request_id
                    )
                except ValueError as exc:
                    rejected.append((command.request_id, exc))
            outputs = self.engine.step() if self.engine.has_unfinished() else []
        return rejected, outputs

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        queue = self._streams.get(request_id)
        if queue is not None:  # None: the stream was closed; its abort is queued
            queue.put_nowait(item)

    def _fail_all(self, exc: Exception) -> None:
        for request_id in list(self._streams):
            self._commands.append(_Abort(request_id))
            self._deliver(request_id, EngineStoppedError(f"engine step failed: {exc}"))
            self._outcome(0.0, ok=False)

    def _outcome(self, latency_s: float, *, ok: bool) -> None:
        self.outcomes.append(RequestOutcome(time.monotonic(), latency_s, ok))
