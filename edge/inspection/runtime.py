"""The edge's ONNX inspection runtime: one ONNX Runtime session per active model, a micro-batching
worker thread per model, verdicts published and stored through callbacks the owner gives, per-model
metrics and health, and model swaps that drop no request in flight.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram

from fieldline.edge.inspection.model import LoadedModel, ModelLoadError, check_rule, load_model
from fieldline.edge.inspection.worker import (
    InspectionRejected,
    ModelWorker,
    Request,
    Verdict,
    WorkerHooks,
    image_size_problem,
)
from fieldline.shared.config import InspectionSettings
from fieldline.shared.health import HEALTH_WINDOW_S, InspectionModelHealth, p95
from fieldline.shared.policy import InspectionRule, Policy, topic_matches

__all__ = ["InspectionRejected", "InspectionRuntime", "ModelLoadError", "Verdict"]

log = structlog.get_logger(__name__)

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Rejections are all counted; their log lines are limited to one per model and reason this often.
REJECT_LOG_INTERVAL_S = 5.0

PublishFn = Callable[[str, bytes], None]
StoreFn = Callable[["Verdict"], None]
RejectFn = Callable[[str, int | None, str, str], None]  # topic, record seq, reason, detail


class _Metrics:
    """Prometheus metrics of one runtime, registered in the registry its owner gives."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(
            "fieldline_inspection_requests",
            "Inspection requests received (verdicts and rejections)",
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


class _LogLimiter:
    """Lets one log line per key through every interval and counts the ones it held back, so a
    flood of garbage payloads is counted in full but does not flood the log."""

    def __init__(self, interval_s: float):
        self._interval_s = interval_s
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def admit(self, key: tuple[str, str]) -> int | None:
        """None to stay quiet; else how many were held back since the last line for this key."""
        now = time.monotonic()
        with self._lock:
            last, held = self._seen.get(key, (-self._interval_s, 0))
            if now - last < self._interval_s:
                self._seen[key] = (last, held + 1)
                return None
            self._seen[key] = (now, 0)
            return held


def _check_rules(model: LoadedModel, rules: list[InspectionRule]) -> None:
    for rule in rules:
        check_rule(model, rule)


def _fits(model: LoadedModel, rules: list[InspectionRule]) -> bool:
    try:
        _check_rules(model, rules)
    except ModelLoadError:
        return False
    return True


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
        self._hooks = WorkerHooks(
            deliver=self._deliver,
            fail=self._fail,
            observe_batch=lambda model, n: self._metrics.batch_size.labels(model).observe(n),
        )
        self._lock = threading.Lock()  # short sections only: never held while loading or inferring
        self._apply_lock = threading.Lock()  # one configuration change at a time
        self._workers: dict[str, ModelWorker] = {}
        self._rules: tuple[InspectionRule, ...] = ()
        self._load_errors: dict[str, str] = {}  # models with no session at all
        self._swap_errors: dict[str, str] = {}  # models whose newer version failed to load
        self._running = False
        self._reject_log = _LogLimiter(REJECT_LOG_INTERVAL_S)

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
        drained and unloaded. A model that fails to load is reported by health(): its rules
        reject requests ("no_model"), or keep the running older version when there is one.
        Sessions are built without holding the lock that health() and requests take.
        """
        with self._apply_lock:
            rules = tuple(policy.inspections)
            wanted: dict[str, list[InspectionRule]] = {}
            for rule in rules:
                wanted.setdefault(rule.model, []).append(rule)
            loaded: dict[str, LoadedModel] = {}
            load_errors: dict[str, str] = {}
            swap_errors: dict[str, str] = {}
            for name in wanted:
                current = self._workers.get(name)
                if name not in installed:
                    load_errors[name] = "model not installed"
                    log.warning("inspection model not installed", model=name)
                    continue
                version, path = installed[name][0], Path(installed[name][1])
                same = current is not None and (current.model.version, current.model.path) == (
                    version,
                    path,
                )
                try:
                    model = (
                        current.model
                        if same and current
                        else load_model(name, version, path, self.settings)
                    )
                    _check_rules(model, wanted[name])  # refused now, not at the first message
                except ModelLoadError as exc:
                    log.error("inspection model failed to load", model=name, error=str(exc))
                    # A running older version that reads the rules keeps serving; the owner
                    # may roll back.
                    keep = current is not None and not same and _fits(current.model, wanted[name])
                    (swap_errors if keep else load_errors)[name] = str(exc)
                    continue
                if not same:
                    loaded[name] = model
            with self._lock:
                self._rules = rules
                for model in loaded.values():
                    self._install(model)
                for name, worker in self._workers.items():
                    worker.configure(wanted.get(name, []))
                gone = [n for n in self._workers if n not in wanted or n in load_errors]
                retired = [self._workers.pop(n) for n in gone]
                self._load_errors, self._swap_errors = load_errors, swap_errors
        for worker in retired:
            worker.stop()
            log.info("inspection model unloaded", model=worker.name)

    def swap_model(self, name: str, version: str, path: Path) -> None:
        """Load `path` as the new version of `name`, then switch to it: batches in flight finish
        on the old session, queued and later requests run on the new one, none is dropped.
        Raises ModelLoadError (and keeps the old version) when the new one cannot load.
        """
        with self._apply_lock:
            model = load_model(name, version, Path(path), self.settings)
            _check_rules(model, [r for r in self._rules if r.model == name])
            with self._lock:
                self._install(model)
                self._swap_errors.pop(name, None)

    def _install(self, model: LoadedModel) -> None:
        """Swap `model` into its worker, or start a worker for it (caller holds self._lock)."""
        worker = self._workers.get(model.name)
        if worker is not None:
            old = worker.model.version
            worker.swap(model)
            log.info("inspection model swapped", model=model.name, old=old, new=model.version)
            return
        worker = ModelWorker(model, self._hooks)
        worker.configure([r for r in self._rules if r.model == model.name])
        self._workers[model.name] = worker
        self._load_errors.pop(model.name, None)
        if self._running:
            worker.start()
        log.info("inspection model serving", model=model.name, version=model.version)

    # -- requests --------------------------------------------------------------------------

    def rules_for(self, topic: str) -> list[InspectionRule]:
        return [r for r in self._rules if topic_matches(r.topic, topic)]

    def on_inspect(self, topic: str, payload: bytes, record_seq: int | None) -> int:
        """The MQTT hook: enqueue one request per rule whose filter matches; never raises.

        Returns how many rules took the message (0 when none matches). Verdicts go to the
        publish and store callbacks; failures are counted and given to `reject`.
        """
        taken = 0
        try:
            for rule in self.rules_for(topic):
                _, accepted = self._enqueue(rule, topic, payload, record_seq, publish=True)
                taken += accepted
        except Exception:  # the caller is a broker callback: count, log, carry on
            self._metrics.errors.labels("", "internal").inc()
            log.exception("inspection enqueue failed", topic=topic, record_seq=record_seq)
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
        req = Request(rule, topic, payload, record_seq, publish)
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
        if worker.queued_bytes() + len(payload) > self.settings.max_queue_bytes:
            limit = self.settings.max_queue_bytes
            detail = f"inspection queue full: {limit} payload bytes waiting"
            self._fail(worker, req, InspectionRejected("overloaded", detail))
            return req.future, False
        problem = image_size_problem(payload, rule.preprocess, worker.model.sample_shape)
        if problem is not None:  # refused from the header, before decoding into floats
            self._fail(worker, req, InspectionRejected(*problem))
            return req.future, False
        if not worker.submit(req):
            self._fail(worker, req, InspectionRejected("stopped", "model is being unloaded"))
            return req.future, False
        return req.future, True

    # -- results (called from worker threads) ----------------------------------------------

    def _deliver(self, worker: ModelWorker, req: Request, verdict: Verdict) -> None:
        self._metrics.latency.labels(worker.name).observe(verdict.latency_ms / 1e3)
        worker.stats.record(verdict.latency_ms, ok=True)
        # Store first: a verdict in the outbox survives a broker that refuses the publish.
        self._call("store", self._store, verdict)
        if req.publish:
            self._call("publish", self._publish, req.rule.result_topic, verdict.to_json())
        req.future.set_result(verdict)

    def _fail(
        self,
        worker: ModelWorker | None,
        req: Request,
        exc: InspectionRejected,
        *,
        model: str | None = None,
    ) -> None:
        name = worker.name if worker is not None else (model or req.rule.model)
        self._metrics.errors.labels(name, exc.reason).inc()
        if worker is not None:
            worker.stats.record((time.monotonic() - req.enqueued) * 1e3, ok=False)
        suppressed = self._reject_log.admit((name, exc.reason))
        if suppressed is not None:
            log.warning(
                "inspection rejected",
                model=name,
                rule=req.rule.name,
                topic=req.topic,
                record_seq=req.record_seq,
                reason=exc.reason,
                detail=exc.detail[:200],
                suppressed_since_last=suppressed,
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

    def health(self) -> dict[str, InspectionModelHealth]:
        """Per model: loaded, version, providers, totals, and the last window's error rate and
        p95 latency (what a rollout's health gate reads)."""
        with self._lock:
            workers = dict(self._workers)
            errors = dict(self._load_errors)
            swap_errors = dict(self._swap_errors)
        out = {name: InspectionModelHealth(error=error[:2000]) for name, error in errors.items()}
        for name, worker in workers.items():
            stats = worker.stats
            cutoff = time.monotonic() - HEALTH_WINDOW_S
            with stats.lock:
                window = [(ms, ok) for t, ms, ok in stats.window if t >= cutoff]
                totals = (stats.requests, stats.errors, stats.inferences)
            failed = sum(1 for _, ok in window if not ok)
            swap_error = swap_errors.get(name)
            out[name] = InspectionModelHealth(
                loaded=True,
                version=worker.model.version,
                providers=worker.model.providers,
                requests=totals[0],
                errors=totals[1],
                inferences=totals[2],
                queue_depth=worker.depth(),
                window_requests=len(window),
                window_errors=failed,
                error_rate=failed / len(window) if window else 0.0,
                p95_latency_ms=p95([ms for ms, ok in window if ok]),
                error=swap_error[:2000] if swap_error else None,
            )
        return out
