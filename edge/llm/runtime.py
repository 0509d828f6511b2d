"""The edge's LLM: loads the active LLM artifact into the engine and swaps versions safely.

A new version is unpacked, autotuned for this device and loaded while the old one keeps
serving; then new requests go to it, the old version's requests in flight finish (drain) and
the old engine stops. Each request holds a lease on the model it started on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import structlog

from fieldline.edge.engine.async_engine import AsyncLLMEngine
from fieldline.edge.engine.config import EngineConfig
from fieldline.edge.llm.chat_template import ChatMessage, ChatTemplate, load_chat_template
from fieldline.shared.config import LLMSettings
from fieldline.shared.health import (
    HEALTH_WINDOW_S,
    EngineConfigReport,
    LlmHealth,
    ModelHealth,
    p95,
)
from fieldline.shared.llm_artifact import unpack_checkpoint

log = structlog.get_logger(__name__)

CHECKPOINT_DIR = "checkpoint"  # unpacked beside the installed artifact file
STOP_DRAIN_S = 5.0  # on shutdown, requests in flight get this long before they are aborted


class ModelUnavailable(Exception):
    """No LLM is serving (none assigned, still loading, or it failed to load)."""


class ServedModel:
    """One loaded version: its engine, its tuned config, its chat template, its leases."""

    def __init__(
        self,
        name: str,
        version: str,
        engine: AsyncLLMEngine,
        config: EngineConfig,
        chat_template: ChatTemplate,
    ) -> None:
        self.name = name
        self.version = version
        self.engine = engine
        self.config = config
        self.chat_template = chat_template
        self.loaded_at = time.time()
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        tokenizer = engine.engine.tokenizer
        # Does encode() put a BOS in front by itself? Then a template's own BOS text goes.
        self._adds_bos = tokenizer is not None and bool(tokenizer.encode(""))

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt; ValueError when empty or when text meets no tokenizer."""
        return self.engine.engine.encode(prompt)

    def chat_prompt(self, messages: list[ChatMessage]) -> str:
        text = self.chat_template.render(messages)
        bos = self.chat_template.bos_token
        if self._adds_bos and bos and text.startswith(bos):
            text = text[len(bos) :]
        return text

    def chat_ids(self, messages: list[ChatMessage]) -> list[int]:
        if self.engine.engine.tokenizer is None:
            raise ValueError(f"{self.name} has no tokenizer.json: chat needs one")
        return self.encode(self.chat_prompt(messages))


class LLMRuntime:
    """Owned by the agent; the gateway, the prefetch job and the explainer lease from it."""

    def __init__(self, settings: LLMSettings) -> None:
        self.settings = settings
        self.current: ServedModel | None = None
        self.error: str | None = None
        self.loading: str | None = None
        self.failed: tuple[str, str] | None = None  # (name, version) of the last failed load
        # Called with the new model (None: none) after every switch: the cache clears here.
        self.on_change: list[Callable[[ServedModel | None], None]] = []
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()

    # -- leases ----------------------------------------------------------------------------

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[ServedModel]:
        """The model now serving, kept alive (not retired) until the block exits."""
        served = self.current
        if served is None or not served.engine.running:
            raise ModelUnavailable(self.unavailable_reason())
        served.inflight += 1
        served.idle.clear()
        try:
            yield served
        finally:
            served.inflight -= 1
            if served.inflight == 0:
                served.idle.set()

    def unavailable_reason(self) -> str:
        if self.loading:
            return f"the LLM {self.loading} is loading"
        if self.error:
            return f"no LLM is serving: {self.error}"
        return "no LLM artifact is active on this node"

    # -- activation ------------------------------------------------------------------------

    async def activate(self, name: str, version: str, artifact: Path) -> bool:
        """Load `artifact` (an installed tar, or a checkpoint directory) as name@version and
        switch to it; the old version drains. False (and health() says why) when it failed:
        the old version then keeps serving."""
        async with self._lock:
            cur = self.current
            if cur is not None and (cur.name, cur.version) == (name, version):
                return True
            self.loading = f"{name}@{version}"
            try:
                served = await asyncio.to_thread(self._load, name, version, artifact)
                await served.engine.start()
            except Exception as exc:  # a bad artifact must not take the node down
                self.error = f"{name}@{version} failed to load: {exc}"
                self.failed = (name, version)
                log.exception("LLM failed to load", model=name, version=version)
                return False
            finally:
                self.loading = None
            self.current, self.error, self.failed = served, None, None
            log.info(
                "LLM serving",
                model=served.ref,
                previous=cur.ref if cur else None,
                engine_config=json.loads(served.config.to_json()),
            )
            self._changed(served)
            if cur is not None:
                self._retire(cur, self.settings.drain_timeout_s)
            return True

    async def deactivate(self) -> None:
        """No LLM is assigned any more: stop serving (requests in flight drain)."""
        async with self._lock:
            cur, self.current, self.error = self.current, None, None
            if cur is not None:
                log.info("LLM unloaded", model=cur.ref)
                self._changed(None)
                self._retire(cur, self.settings.drain_timeout_s)

    async def stop(self) -> None:
        async with self._lock:
            cur, self.current = self.current, None
            if cur is not None:
                self._retire(cur, STOP_DRAIN_S)
        await self.retired()

    async def retired(self) -> None:
        """Wait until every version being retired has drained and stopped its engine."""
        for task in list(self._retiring):
            with suppress(asyncio.CancelledError):
                await task

    def _changed(self, served: ServedModel | None) -> None:
        for callback in self.on_change:
            try:
                callback(served)
            except Exception:
                log.exception("LLM change callback failed")

    def _retire(self, old: ServedModel, timeout_s: float) -> None:
        async def drain() -> None:
            try:
                await asyncio.wait_for(old.idle.wait(), timeout_s)
            except TimeoutError:
                log.warning("drain timed out; aborting the rest", model=old.ref, left=old.inflight)
            await old.engine.stop()
            log.info("LLM version retired", model=old.ref)

        task = asyncio.create_task(drain(), name=f"retire-{old.ref}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _load(self, name: str, version: str, artifact: Path) -> ServedModel:
        """Unpack, autotune and load (blocking: runs in a worker thread)."""
        checkpoint = artifact
        if artifact.is_file():
            checkpoint = unpack_checkpoint(
                artifact,
                artifact.parent / CHECKPOINT_DIR,
                max_total_bytes=self.settings.max_unpacked_bytes,
            )
        config = EngineConfig(
            model=str(checkpoint),
            device=self._device(),
            dtype=self._dtype(),
            max_model_len=self.settings.max_model_len,
        )
        if self.settings.autotune:
            from fieldline.edge.engine.autotune import autotune

            config = autotune(config, self.settings.slo_itl_p95_ms, self.settings.kv_cache_bytes)
        else:
            config = dataclasses.replace(
                config,
                kv_cache_bytes=self.settings.kv_cache_bytes,
                slo_itl_p95_ms=self.settings.slo_itl_p95_ms,
            )
        engine = AsyncLLMEngine(config)
        return ServedModel(name, version, engine, config, load_chat_template(checkpoint))

    def _device(self) -> str:
        if self.settings.device != "auto":
            return self.settings.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def _dtype(self) -> str:
        if self.settings.dtype != "auto":
            return self.settings.dtype
        return "float16" if self._device().startswith("cuda") else "float32"

    # -- observed state --------------------------------------------------------------------

    def model_health(self) -> dict[str, ModelHealth]:
        """The LLM as a rollout gate sees it: loaded or why not, and the last window's requests,
        failures and p95 latency. A version that failed to load is what is reported for its
        name, even while the previous version keeps serving."""
        report: dict[str, ModelHealth] = {}
        cur = self.current
        if cur is not None:
            outcomes = list(cur.engine.outcomes)
            window = [o for o in outcomes if o.at >= time.monotonic() - HEALTH_WINDOW_S]
            failed = sum(1 for o in window if not o.ok)
            ok_ms = [o.latency_s * 1000.0 for o in window if o.ok]
            report[cur.name] = ModelHealth(
                name=cur.name,
                version=cur.version,
                kind="llm",
                loaded=True,
                serving=cur.engine.running,
                requests=len(outcomes),
                errors=sum(1 for o in outcomes if not o.ok),
                window_s=HEALTH_WINDOW_S,
                window_requests=len(window),
                window_errors=failed,
                error_rate=failed / len(window) if window else 0.0,
                p95_latency_ms=p95(ok_ms),
            )
        if self.failed is not None and self.error:
            name, version = self.failed
            report[name] = ModelHealth(
                name=name, version=version, kind="llm", error=self.error[:2000]
            )
        return report

    def health(self) -> LlmHealth:
        """What the node reports about its LLM, the tuned engine config included."""
        cur = self.current
        state = "serving" if cur else ("loading" if self.loading else "none")
        if self.error and not cur:
            state = "failed"
        return LlmHealth(
            state=state,
            loaded=cur is not None,
            model=cur.name if cur else None,
            version=cur.version if cur else None,
            loading=self.loading is not None,
            loading_ref=self.loading,
            error=self.error[:2000] if self.error else None,
            inflight=cur.inflight if cur else 0,
            retiring=len(self._retiring),
            engine_config=engine_config_report(cur.config) if cur else None,
            chat_template=("default" if cur.chat_template.is_default else "checkpoint")
            if cur
            else None,
        )


def engine_config_report(config: EngineConfig) -> EngineConfigReport:
    """The knobs of `config` that health reports (the checkpoint path and seed stay local)."""
    return EngineConfigReport(
        **{name: getattr(config, name) for name in EngineConfigReport.model_fields}
    )
