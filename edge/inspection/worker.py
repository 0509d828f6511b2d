"""One inspection model's worker: a request queue and a thread that micro-batches it through the
model's current ONNX Runtime session, pre- and post-processing each request as its rule says.
"""

from __future__ import annotations

import io
import json
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field

import numpy as np
import structlog
from PIL import Image

from fieldline.edge.inspection.model import LoadedModel
from fieldline.edge.inspection.postprocess import decide
from fieldline.edge.inspection.preprocess import (
    Box,
    ClassArea,
    Geometry,
    PayloadError,
    Region,
    fit_to_input,
    preprocess_frame,
)
from fieldline.shared.clock import now_ms
from fieldline.shared.health import HEALTH_WINDOW_S
from fieldline.shared.limits import MAX_IMAGE_PIXELS
from fieldline.shared.policy import InspectionRule, Preprocess

log = structlog.get_logger(__name__)

# health() looks at the last HEALTH_WINDOW_S seconds, or this many requests if fewer.
HEALTH_WINDOW_MAX = 20_000
STOP_TIMEOUT_S = 10.0


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
    # Where the defect is (detect: boxes; segment: areas per defect label and regions), in the
    # original image's pixels; empty for classify and anomaly and left out of their JSON.
    boxes: tuple[Box, ...] = ()
    areas: tuple[ClassArea, ...] = ()
    regions: tuple[Region, ...] = ()

    def to_json(self) -> bytes:
        data = asdict(self)
        for key in _LOCATING_FIELDS:
            if not data[key]:
                del data[key]
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Verdict:
        fields = json.loads(data)
        for key, kind in _LOCATING_FIELDS.items():
            fields[key] = tuple(kind(**item) for item in fields.get(key, ()))
        return cls(**fields)


_LOCATING_FIELDS: dict[str, type] = {"boxes": Box, "areas": ClassArea, "regions": Region}


def image_size_problem(
    payload: bytes, pre: Preprocess, sample_shape: tuple[int | None, ...]
) -> tuple[str, str] | None:
    """(reason, detail) when an image payload cannot fit the rule and the model, read from its
    header alone: a frame the model refuses is never decoded into floats (hundreds of MiB)."""
    if pre.decoder != "image":
        return None
    try:
        with Image.open(io.BytesIO(payload)) as img:
            width, height = img.size
    except Exception:  # not an image: the decoder refuses it with its own reason
        return None
    if width * height > MAX_IMAGE_PIXELS:
        return "too_large", f"image of {width}x{height} pixels (at most {MAX_IMAGE_PIXELS})"
    if pre.resize is not None or None in sample_shape:
        return None  # resized to the rule's size after a bounded decode, or a dynamic input
    channels = 1 if pre.grayscale else 3
    if width * height * channels != math.prod(sample_shape):  # type: ignore[arg-type]
        shown = "x".join(str(d) for d in sample_shape)
        return "shape", (
            f"image of {width}x{height}x{channels} does not fit model input {shown}: "
            "set the rule's preprocess.resize"
        )
    return None


@dataclass(slots=True)
class Request:
    """One payload waiting for a verdict under one rule."""

    rule: InspectionRule
    topic: str
    payload: bytes
    record_seq: int | None
    publish: bool
    enqueued: float = field(default_factory=time.monotonic)
    future: Future[Verdict] = field(default_factory=Future)


@dataclass
class Stats:
    """Plain counters behind health(), kept beside the Prometheus ones."""

    requests: int = 0
    errors: int = 0
    inferences: int = 0
    # (monotonic t, latency ms, ok) of recent requests
    window: deque[tuple[float, float, bool]] = field(
        default_factory=lambda: deque(maxlen=HEALTH_WINDOW_MAX)
    )
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, latency_ms: float, ok: bool) -> None:
        now = time.monotonic()
        with self.lock:
            self.errors += not ok
            self.window.append((now, latency_ms, ok))
            while self.window and self.window[0][0] < now - HEALTH_WINDOW_S:
                self.window.popleft()


@dataclass(frozen=True)
class WorkerHooks:
    """Where a worker sends its results: the runtime that owns it."""

    deliver: Callable[[ModelWorker, Request, Verdict], None]
    fail: Callable[[ModelWorker, Request, InspectionRejected], None]
    observe_batch: Callable[[str, int], None]  # model name, samples in one inference call


class ModelWorker:
    """One model's request queue and the thread that batches it through the current session."""

    def __init__(self, model: LoadedModel, hooks: WorkerHooks):
        self._hooks = hooks
        self._model = model  # replaced whole by swap(); a batch keeps the one it started with
        self.name = model.name
        self.max_batch = 1
        self.max_wait_s = 0.0
        self.stats = Stats()
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._queued_bytes = 0  # payload bytes in _queue (under _close_lock)
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
        # The health window describes the version serving now (a rollout gate reads it).
        with self.stats.lock:
            self.stats.window.clear()

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
                self._hooks.fail(self, req, InspectionRejected("stopped", "runtime stopped"))

    def depth(self) -> int:
        return self._queue.qsize()

    def queued_bytes(self) -> int:
        return self._queued_bytes

    def submit(self, req: Request) -> bool:
        """Queue a request; False once the worker is stopping."""
        with self._close_lock:
            if self._closed:
                return False
            self._queued_bytes += len(req.payload)
            self._queue.put(req)
            return True

    def _take(self, *, block: bool = True, timeout: float | None = None) -> Request | None:
        """The next queued item (raises queue.Empty), its bytes no longer counted as waiting."""
        item = self._queue.get(block, timeout)
        if item is not None:
            with self._close_lock:
                self._queued_bytes -= len(item.payload)
        return item

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._take()
            if first is None:
                break
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    item = self._take(block=remaining > 0, timeout=max(remaining, 0) or None)
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
                        self._hooks.fail(self, req, InspectionRejected("internal", str(exc)))

    def _run_batch(self, batch: list[Request]) -> None:
        model = self._model
        groups: dict[tuple[int, ...], list[tuple[Request, np.ndarray, Geometry | None]]] = {}
        for req in batch:
            try:
                sample, geometry = preprocess_frame(req.payload, req.rule.preprocess)
                sample = fit_to_input(sample, model.sample_shape)
            except PayloadError as exc:
                self._hooks.fail(self, req, InspectionRejected(exc.reason, exc.detail))
                continue
            except Exception as exc:  # a decoder bug fails this request, not its whole batch
                log.exception("payload pre-processing failed", model=self.name)
                self._hooks.fail(self, req, InspectionRejected("internal", repr(exc)))
                continue
            groups.setdefault(sample.shape, []).append((req, sample, geometry))
        for items in groups.values():
            chunk = len(items) if model.dynamic_batch else 1
            for start in range(0, len(items), chunk):
                self._infer(model, items[start : start + chunk])

    def _infer(
        self, model: LoadedModel, items: list[tuple[Request, np.ndarray, Geometry | None]]
    ) -> None:
        # x: [B, *sample_shape]
        x = np.stack([s for _, s, _ in items]).astype(model.input_dtype, copy=False)
        try:
            output = model.session.run(None, {model.input_name: x})[0]
        except Exception as exc:  # ORT errors are untyped; count them per request
            for req, _, _ in items:
                self._hooks.fail(self, req, InspectionRejected("inference", str(exc)))
            return
        self._hooks.observe_batch(self.name, len(items))
        with self.stats.lock:
            self.stats.inferences += 1
        for i, (req, _, geometry) in enumerate(items):
            try:
                decision = decide(output[i], req.rule.postprocess, geometry)
            except PayloadError as exc:
                self._hooks.fail(self, req, InspectionRejected(exc.reason, exc.detail))
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
                boxes=decision.boxes,
                areas=decision.areas,
                regions=decision.regions,
                latency_ms=round((time.monotonic() - req.enqueued) * 1e3, 3),
                ts_ms=now_ms(),
            )
            self._hooks.deliver(self, req, verdict)
