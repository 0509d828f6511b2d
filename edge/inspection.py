"""The edge's ONNX inspection runtime: one ONNX Runtime session per active model, a micro-batching
worker thread per model, verdicts published and stored through callbacks the owner gives, per-model
metrics and health, and model swaps that drop no request in flight.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram

from fieldline.edge.inspection_model import LoadedModel, ModelLoadError, load_model
from fieldline.edge.preprocess import (
    PayloadError,
    fit_to_input,
    postprocess_output,
    preprocess_payload,
)
from fieldline.shared.clock import now_ms
from fieldline.shared.config import InspectionSettings
from fieldline.shared.policy import InspectionRule, Policy, topic_matches

log = structlog.get_logger(__name__)

HEALTH_WINDOW_S = 60.0
STOP_TIMEOUT_S = 10.0
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

PublishFn = Callable[[str, bytes], None]
StoreFn = Callable[["Verdict"], None]
RejectFn = Callable[[str, int | None, str, str], None]  # topic, record seq, reason, detail


class InspectionRejected(Exception):
    """A request that produced no verdict; `reason` is a short, bounded category."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of one inspection, as published on the result topic and stored."""

    rule: str
    model: str
    model_version: str
    topic: str
    record_seq: int | None
    label: str
    score: float
    defect: bool
    latency_ms: float
    ts_ms: int

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Verdict:
        return cls(**json.loads(data))


class _Metrics:
    """Prometheus metrics of one runtime, registered in the registry its owner gives."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(
            "fieldline_inspection_requests",
            "Inspection requests accepted",
            ["model"],
            registry=registry,
        )
        self.errors = Counter(
            "fieldline_inspection_errors",
            "Inspection requests that produced no verdict",
            ["model", "reason"],
            registry=registry,
        )
        self.latency = Histogram(
            "fieldline_inspection_latency_seconds",
            "Enqueue-to-verdict latency",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.batch_size = Histogram(
            "fieldline_inspection_batch_size",
            "Samples per inference call",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.callback_errors = Counter(
            "fieldline_inspection_callback_errors",
            "Publish or store callbacks that raised",
            ["callback"],
            registry=registry,
        )


@dataclass(slots=True)
class _Request:
    rule: InspectionRule
    topic: str
    payload: bytes
    record_seq: int | None
    publish: bool
    enqueued: float = field(default_factory=time.monotonic)
    future: Future[Verdict] = field(default_factory=Future)


@dataclass
class _Stats:
    """Plain counters behind health(), kept beside the Prometheus ones."""

    requests: int = 0
    errors: int = 0
    inferences: int = 0
    window: deque[tuple[float, float, bool]] = field(default_factory=deque)  # (t, ms, ok)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, latency_ms: float, ok: bool) -> None:
        now = time.monotonic()
        with self.lock:
            self.errors += not ok
            self.window.append((now, latency_ms, ok))
            while self.window and self.window[0][0] < now - HEALTH_WINDOW_S:
                self.window.popleft()


class _ModelWorker:
    """One model's request queue and the thread that batches it through the current session."""

    def __init__(self, runtime: InspectionRuntime, model: LoadedModel):
        self._runtime = runtime
        self._model = model  # replaced whole by swap(); a batch keeps the one it started with
        self.name = model.name
        self.max_batch = 1
        self.max_wait_s = 0.0
        self.stats = _Stats()
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._closed = False
        self._close_lock = threading.Lock()  # no request slips in behind the stop sentinel
        self._thread = threading.Thread(target=self._loop, name=f"inspect-{self.name}", daemon=True)

    @property
    def model(self) -> LoadedModel:
        return self._model

    def configure(self, rules: list[InspectionRule]) -> None:
        """Batch as large as the most generous rule allows, wait no longer than the strictest."""
        if not rules:
            return
        self.max_batch = max(r.max_batch for r in rules) if self._model.dynamic_batch else 1
        self.max_wait_s = min(r.max_wait_ms for r in rules) / 1000.0

    def swap(self, model: LoadedModel) -> None:
        self._model = model

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish what is queued, then end the thread."""
        with self._close_lock:
            self._closed = True
            self._queue.put(None)
        if self._thread.ident is not None:
            self._thread.join(STOP_TIMEOUT_S)
        if self._thread.is_alive():
            log.error("inspection worker did not stop in time", model=self.name)
        while True:  # anything the thread left behind gets an answer too
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                break
            if req is not None:
                self._runtime._fail(self, req, InspectionRejected("stopped", "runtime stopped"))

    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, req: _Request) -> bool:
        """Queue a request; False once the worker is stopping."""
        with self._close_lock:
            if self._closed:
                return False
            self._queue.put(req)
            return True

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    item = (
                        self._queue.get(timeout=remaining)
                        if remaining > 0
                        else self._queue.get_nowait()
                    )
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            try:
                self._run_batch(batch)
            except Exception as exc:  # the worker must outlive any bug in one batch
                log.exception("inspection batch failed", model=self.name)
                for req in batch:
                    if not req.future.done():
                        self._runtime._fail(self, req, InspectionRejected("internal", str(exc)))

    def _run_batch(self, batch: list[_Request]) -> None:
        model = self._model
        groups: dict[tuple[int, ...], list[tuple[_Request, np.ndarray]]] = {}
        for req in batch:
            try:
                sample = preprocess_payload(req.payload, req.rule.preprocess)
                sample = fit_to_input(sample, model.sample_shape)
            except PayloadError as exc:
                self._runtime._fail(self, req, InspectionRejected(exc.reason, exc.detail))
                continue
            groups.setdefault(sample.shape, []).append((req, sample))
        for items in groups.values():
            chunk = len(items) if model.dynamic_batch else 1
            for start in range(0, len(items), chunk):
                self._infer(model, items[start : start + chunk])

    def _infer(self, model: LoadedModel, items: list[tuple[_Request, np.ndarray]]) -> None:
        # x: [B, *sample_shape]
        x = np.stack([s for _, s in items]).astype(model.input_dtype, copy=False)
        try:
            output = model.session.run(None, {model.input_name: x})[0]
        except Exception as exc:  # ORT errors are untyped; count them per request
            for req, _ in items:
                self._runtime._fail(self, req, InspectionRejected("inference", str(exc)))
            return
        self._runtime._metrics.batch_size.labels(self.name).observe(len(items))
        with self.stats.lock:
            self.stats.inferences += 1
        for i, (req, _) in enumerate(items):
            try:
                decision = postprocess_output(output[i], req.rule.postprocess)
            except PayloadError as exc:
                self._runtime._fail(self, req, InspectionRejected(exc.reason, exc.detail))
                continue
            verdict = Verdict(
                rule=req.rule.name,
                model=model.name,
                model_version=model.version,
                topic=req.topic,
                record_seq=req.record_seq,
                label=decision.label,
                score=round(decision.score, 6),
                defect=decision.defect,
                latency_ms=round((time.monotonic() - req.enqueued) * 1e3, 3),
                ts_ms=now_ms(),
            )
            self._runtime._deliver(self, req, verdict)


class InspectionRuntime:
    """Runs the inspection rules of the active policy on the installed ONNX models.

    The owner gives `publish(topic, bytes)` (the agent publishes with QoS 1) and
    `store(verdict)` (the agent writes it to the outbox as kind "verdict"), optionally
    `reject(topic, record_seq, reason, detail)` for requests that yield no verdict.
    Start with start(), configure with apply_policy(), feed with on_inspect() or submit().
    """

    def __init__(
        self,
        publish: PublishFn,
        store: StoreFn,
        *,
        settings: InspectionSettings | None = None,
        registry: CollectorRegistry | None = None,
        reject: RejectFn | None = None,
    ):
        self.settings = settings or InspectionSettings()
        self.registry = registry if registry is not None else CollectorRegistry()
        self._publish = publish
        self._store = store
        self._reject = reject
        self._metrics = _Metrics(self.registry)
        self._lock = threading.RLock()  # guards configuration, never held during inference
        self._workers: dict[str, _ModelWorker] = {}
        self._rules: tuple[InspectionRule, ...] = ()
        self._load_errors: dict[str, str] = {}  # models with no session at all
        self._swap_errors: dict[str, str] = {}  # models whose newer version failed to load
        self._running = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            self._running = True
            for worker in self._workers.values():
                worker.start()

    def stop(self) -> None:
        """Answer every queued request (verdict or rejection), then stop the workers."""
        with self._lock:
            self._running = False
            workers = list(self._workers.values())
            self._workers.clear()
        for worker in workers:
            worker.stop()

    def __enter__(self) -> InspectionRuntime:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- configuration ---------------------------------------------------------------------

    def apply_policy(self, policy: Policy, installed: dict[str, tuple[str, Path]]) -> None:
        """Run `policy.inspections` on the installed models (name -> (version, .onnx path)).

        New models are loaded, changed versions swapped in, models no rule needs any more are
        drained and unloaded. A model that fails to load is reported by health() and its rules
        reject requests ("no_model"); the other rules run.
        """
        with self._lock:
            rules = tuple(policy.inspections)
            wanted: dict[str, list[InspectionRule]] = {}
            for rule in rules:
                wanted.setdefault(rule.model, []).append(rule)
            self._load_errors = {}
            self._swap_errors = {}
            for name, model_rules in wanted.items():
                if name not in installed:
                    self._load_errors[name] = "model not installed"
                    log.warning("inspection model not installed", model=name)
                    continue
                version, path = installed[name]
                try:
                    self._ensure_model(name, version, Path(path))
                except ModelLoadError as exc:
                    log.error("inspection model failed to load", model=name, error=str(exc))
                    if name not in self._workers:
                        self._load_errors[name] = str(exc)
                        continue
                    # A running older version keeps serving; the owner may roll back.
                    self._swap_errors[name] = str(exc)
                self._workers[name].configure(model_rules)
            gone = [n for n in self._workers if n not in wanted]
            retired = [self._workers.pop(n) for n in gone]
            self._rules = rules
        for worker in retired:
            worker.stop()
            log.info("inspection model unloaded", model=worker.name)

    def swap_model(self, name: str, version: str, path: Path) -> None:
        """Load `path` as the new version of `name`, then switch to it: batches in flight finish
        on the old session, queued and later requests run on the new one, none is dropped.
        Raises ModelLoadError (and keeps the old version) when the new one cannot load.
        """
        new = load_model(name, version, Path(path), self.settings)
        with self._lock:
            worker = self._workers.get(name)
            if worker is None:
                # Not active yet: serve it now, for the rules that name it.
                worker = self._add_worker(new)
                log.info("inspection model added", model=name, version=version)
                return
            old = worker.model
            worker.swap(new)
            self._swap_errors.pop(name, None)
        log.info("inspection model swapped", model=name, old=old.version, new=version)

    def _add_worker(self, model: LoadedModel) -> _ModelWorker:
        worker = _ModelWorker(self, model)
        worker.configure([r for r in self._rules if r.model == model.name])
        self._workers[model.name] = worker
        self._load_errors.pop(model.name, None)
        if self._running:
            worker.start()
        return worker

    def _ensure_model(self, name: str, version: str, path: Path) -> None:
        worker = self._workers.get(name)
        if worker is None:
            self._add_worker(load_model(name, version, path, self.settings))
        elif (worker.model.version, worker.model.path) != (version, path):
            self.swap_model(name, version, path)

    # -- requests --------------------------------------------------------------------------

    def rules_for(self, topic: str) -> list[InspectionRule]:
        return [r for r in self._rules if topic_matches(r.topic, topic)]

    def on_inspect(self, topic: str, payload: bytes, record_seq: int | None) -> int:
        """The MQTT hook: enqueue one request per rule whose filter matches; never raises.

        Returns how many rules took the message (0 when none matches). Verdicts go to the
        publish and store callbacks; failures are counted and given to `reject`.
        """
        taken = 0
        for rule in self.rules_for(topic):
            _, accepted = self._enqueue(rule, topic, payload, record_seq, publish=True)
            taken += accepted
        return taken

    def submit(
        self,
        rule_name: str,
        payload: bytes,
        *,
        topic: str | None = None,
        record_seq: int | None = None,
        publish: bool = False,
    ) -> Future[Verdict]:
        """Inspect one payload under a named rule (the gateway's /v1/inspect, tests, benches).

        The future gives the Verdict or raises InspectionRejected. The verdict is stored
        always and published on the rule's result topic only when `publish` is true.
        """
        rule = next((r for r in self._rules if r.name == rule_name), None)
        if rule is None:
            future: Future[Verdict] = Future()
            future.set_exception(InspectionRejected("no_rule", f"no inspection rule {rule_name}"))
            return future
        future, _ = self._enqueue(rule, topic or rule.topic, payload, record_seq, publish=publish)
        return future

    def _enqueue(
        self,
        rule: InspectionRule,
        topic: str,
        payload: bytes,
        record_seq: int | None,
        *,
        publish: bool,
    ) -> tuple[Future[Verdict], bool]:
        """Queue one request; the bool says whether it was queued (else it is already failed)."""
        req = _Request(rule, topic, payload, record_seq, publish)
        worker = self._workers.get(rule.model)
        self._metrics.requests.labels(rule.model).inc()
        if worker is None or not self._running:
            reason = "no_model" if self._running else "stopped"
            detail = self._load_errors.get(rule.model, f"model {rule.model} is not loaded")
            self._fail(worker, req, InspectionRejected(reason, detail), model=rule.model)
            return req.future, False
        with worker.stats.lock:
            worker.stats.requests += 1
        if worker.depth() >= self.settings.max_queue:
            self._fail(worker, req, InspectionRejected("overloaded", "inspection queue full"))
            return req.future, False
        if not worker.submit(req):
            self._fail(worker, req, InspectionRejected("stopped", "model is being unloaded"))
            return req.future, False
        return req.future, True

    # -- results (called from worker threads) ----------------------------------------------

    def _deliver(self, worker: _ModelWorker, req: _Request, verdict: Verdict) -> None:
        self._metrics.latency.labels(worker.name).observe(verdict.latency_ms / 1e3)
        worker.stats.record(verdict.latency_ms, ok=True)
        # Store first: a verdict in the outbox survives a broker that refuses the publish.
        self._call("store", self._store, verdict)
        if req.publish:
            self._call("publish", self._publish, req.rule.result_topic, verdict.to_json())
        req.future.set_result(verdict)

    def _fail(
        self,
        worker: _ModelWorker | None,
        req: _Request,
        exc: InspectionRejected,
        *,
        model: str | None = None,
    ) -> None:
        name = worker.name if worker is not None else (model or req.rule.model)
        self._metrics.errors.labels(name, exc.reason).inc()
        if worker is not None:
            worker.stats.record((time.monotonic() - req.enqueued) * 1e3, ok=False)
        log.warning(
            "inspection rejected",
            model=name,
            rule=req.rule.name,
            topic=req.topic,
            record_seq=req.record_seq,
            reason=exc.reason,
            detail=exc.detail[:200],
        )
        if self._reject is not None:
            self._call("reject", self._reject, req.topic, req.record_seq, exc.reason, exc.detail)
        req.future.set_exception(exc)

    def _call(self, which: str, fn: Callable[..., None], *args: Any) -> None:
        """Run an owner callback; one that raises is logged and counted, never fatal."""
        try:
            fn(*args)
        except Exception:
            self._metrics.callback_errors.labels(which).inc()
            log.exception("inspection callback failed", callback=which)

    # -- observed state --------------------------------------------------------------------

    def health(self) -> dict[str, dict[str, Any]]:
        """Per model: loaded, version, providers, totals, and the last window's error rate and
        p95 latency (what a rollout's health gate reads)."""
        out: dict[str, dict[str, Any]] = {}
        with self._lock:
            workers = dict(self._workers)
            errors = dict(self._load_errors)
            swap_errors = dict(self._swap_errors)
        for name, worker in workers.items():
            stats = worker.stats
            cutoff = time.monotonic() - HEALTH_WINDOW_S
            with stats.lock:
                window = [(ms, ok) for t, ms, ok in stats.window if t >= cutoff]
                totals = (stats.requests, stats.errors, stats.inferences)
            ok_ms = [ms for ms, ok in window if ok]
            failed = sum(1 for _, ok in window if not ok)
            out[name] = {
                "loaded": True,
                "version": worker.model.version,
                "providers": worker.model.providers,
                "requests": totals[0],
                "errors": totals[1],
                "inferences": totals[2],
                "queue_depth": worker.depth(),
                "window_s": HEALTH_WINDOW_S,
                "window_requests": len(window),
                "error_rate": failed / len(window) if window else 0.0,
                "p95_latency_ms": float(np.percentile(ok_ms, 95)) if ok_ms else None,
                "error": swap_errors.get(name),
            }
        for name, error in errors.items():
            out[name] = {"loaded": False, "error": error, "requests": 0, "errors": 0}
        return out
