"""The inspection runtime on real ONNX Runtime sessions of the demo classifier trained in the test."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from fieldline.cli.harness.classifier import TrainedClassifier, make_frame, train_classifier
from fieldline.cloud.artifacts.quantize import quantize_onnx
from fieldline.edge.inspection.model import ModelLoadError, choose_providers
from fieldline.edge.inspection.runtime import InspectionRejected, InspectionRuntime, Verdict
from fieldline.shared.config import InspectionSettings
from fieldline.shared.policy import InspectionRule, Policy
from tests.support.polling import wait_until

RESULT_TOPIC = "line1/verdicts"
TIMEOUT_S = 30


@dataclass(frozen=True)
class DemoModels:
    trained: TrainedClassifier
    int8_path: Path


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoModels:
    out = tmp_path_factory.mktemp("demo")
    trained = train_classifier(out, seconds_budget=1.5)
    assert trained.heldout_accuracy > 0.95
    int8 = out / "defect_classifier.int8.onnx"
    quantize_onnx(trained.onnx_path, int8, trained.calibration_path)
    return DemoModels(trained, int8)


@dataclass
class Sink:
    """What the owner's callbacks received."""

    published: list[tuple[str, bytes]] = field(default_factory=list)
    stored: list[Verdict] = field(default_factory=list)
    rejected: list[tuple[str, int | None, str]] = field(default_factory=list)

    def publish(self, topic: str, payload: bytes) -> None:
        self.published.append((topic, payload))

    def store(self, verdict: Verdict) -> None:
        self.stored.append(verdict)

    def reject(self, topic: str, seq: int | None, reason: str, detail: str) -> None:
        self.rejected.append((topic, seq, reason))


def rule(demo: DemoModels, **kw: object) -> InspectionRule:
    base: dict[str, object] = {
        "name": "frames",
        "topic": "line1/camera/+",
        "model": "defects",
        "result_topic": RESULT_TOPIC,
        "max_batch": 8,
        "max_wait_ms": 20,
    }
    base.update(kw)
    return demo.trained.rule(**base)  # type: ignore[arg-type]


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
def runtime(sink: Sink) -> Iterator[InspectionRuntime]:
    rt = InspectionRuntime(
        sink.publish,
        sink.store,
        settings=InspectionSettings(intra_op_threads=1),
        registry=CollectorRegistry(),
        reject=sink.reject,
    )
    rt.start()
    try:
        yield rt
    finally:
        rt.stop()


def results(futures: list[Future[Verdict]]) -> list[Verdict]:
    return [f.result(timeout=TIMEOUT_S) for f in futures]


def test_verdicts_match_known_frames_and_reach_callbacks(
    demo: DemoModels, runtime: InspectionRuntime, sink: Sink
) -> None:
    runtime.apply_policy(
        Policy(inspections=[rule(demo)]), {"defects": ("1.0.0", demo.trained.onnx_path)}
    )
    rng = np.random.default_rng(1234)
    truth = [bool(i % 2) for i in range(40)]
    frames = [make_frame(d, rng) for d in truth]
    for seq, frame in enumerate(frames):
        assert runtime.on_inspect(f"line1/camera/{seq % 3}", frame, seq) == 1
    assert runtime.on_inspect("line2/camera/1", frames[0], 99) == 0  # no rule matches

    wait_until(lambda: len(sink.published) >= len(frames), TIMEOUT_S, "a verdict per frame")
    assert len(sink.published) == len(sink.stored) == len(frames)
    verdicts = sorted((Verdict.from_json(p) for t, p in sink.published), key=lambda v: v.record_seq)
    assert {t for t, _ in sink.published} == {RESULT_TOPIC}
    assert [v.record_seq for v in verdicts] == list(range(len(frames)))
    correct = sum(v.defect == d for v, d in zip(verdicts, truth, strict=True))
    assert correct >= 0.95 * len(frames)
    for v in verdicts:
        assert v.label == ("defect" if v.defect else "good")
        assert v.rule == "frames" and v.model == "defects" and v.model_version == "1.0.0"
        assert 0.5 <= v.score <= 1.0 and v.latency_ms > 0 and v.ts_ms > 0
        assert v.topic.startswith("line1/camera/")
    assert sorted(sink.stored, key=lambda v: v.record_seq) == verdicts
    health = runtime.health()["defects"]
    assert health.loaded and health.requests == 40 and health.errors == 0
    assert health.providers == ["CPUExecutionProvider"]
    assert health.p95_latency_ms > 0


def _batch_stats(runtime: InspectionRuntime) -> tuple[float, float]:
    count = runtime.registry.get_sample_value(
        "fieldline_inspection_batch_size_count", {"model": "defects"}
    )
    total = runtime.registry.get_sample_value(
        "fieldline_inspection_batch_size_sum", {"model": "defects"}
    )
    return count or 0.0, total or 0.0


@pytest.mark.parametrize(("max_batch", "max_calls"), [(8, 24), (1, 64)])
def test_concurrent_requests_are_micro_batched(
    demo: DemoModels, runtime: InspectionRuntime, max_batch: int, max_calls: int
) -> None:
    runtime.apply_policy(
        Policy(inspections=[rule(demo, max_batch=max_batch, max_wait_ms=50)]),
        {"defects": ("1", demo.trained.onnx_path)},
    )
    rng = np.random.default_rng(7)
    frames = [make_frame(i % 2 == 0, rng) for i in range(64)]
    futures: list[Future[Verdict]] = []
    lock = threading.Lock()

    def client(part: list[bytes]) -> None:
        for frame in part:
            f = runtime.submit("frames", frame)
            with lock:
                futures.append(f)

    threads = [threading.Thread(target=client, args=(frames[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results(futures)) == 64
    calls, samples = _batch_stats(runtime)
    assert samples == 64
    assert calls <= max_calls
    if max_batch == 1:
        assert calls == 64
    else:
        assert calls < 64 / 2  # batches of several requests, not one call each
    assert runtime.health()["defects"].inferences == calls


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_malformed_payloads_are_counted_not_raised(
    demo: DemoModels, runtime: InspectionRuntime, sink: Sink
) -> None:
    array_rule = rule(
        demo,
        name="arrays",
        topic="line1/array",
        preprocess={"decoder": "array", "scale": 1.0},
    )
    runtime.apply_policy(
        Policy(inspections=[rule(demo), array_rule]), {"defects": ("1", demo.trained.onnx_path)}
    )
    rng = np.random.default_rng(3)
    good = make_frame(False, rng)
    bmp = io.BytesIO()
    Image.new("L", (64, 64)).save(bmp, format="BMP")
    garbled = {
        "garbage": (b"\x00\x01not an image", "image"),
        "truncated": (good[: len(good) // 2], "image"),
        "empty": (b"", "empty"),
        "huge": (b"\x89PNG" + b"\x00" * (17 * 1024 * 1024), "too_large"),
        "bmp": (bmp.getvalue(), "image"),
    }
    arrays = {
        "bad_json": (b'{"values": [1, 2,', "json"),
        "wrong_types": (b'["a", {"b": 1}]', "array"),
        "ragged": (b"[[1, 2], [3]]", "array"),
        "nan": (b"[NaN, 1]", "array"),
        "wrong_shape": (b"[1, 2, 3]", "shape"),
        "object": (b'{"value": 3}', "array"),
    }
    futures: dict[str, Future[Verdict]] = {}
    valid: list[Future[Verdict]] = []
    for name, (payload, _) in garbled.items():
        futures[name] = runtime.submit("frames", payload)
        valid.append(runtime.submit("frames", good))
    for name, (payload, _) in arrays.items():
        futures[name] = runtime.submit("arrays", payload)
    ok_array = np.zeros(64 * 64, dtype=np.float32).tolist()  # flat list, reshaped to [1, 64, 64]
    valid.append(runtime.submit("arrays", str(ok_array).encode()))

    for name, (_, reason) in {**garbled, **arrays}.items():
        with pytest.raises(InspectionRejected) as err:
            futures[name].result(timeout=TIMEOUT_S)
        assert err.value.reason == reason, name
        got = runtime.registry.get_sample_value(
            "fieldline_inspection_errors_total", {"model": "defects", "reason": reason}
        )
        assert got and got >= 1
    verdicts = results(valid)  # the runtime lives on and serves every valid request
    assert all(not v.defect for v in verdicts[: len(garbled)])
    assert verdicts[-1].rule == "arrays"
    health = runtime.health()["defects"]
    assert health.errors == len(garbled) + len(arrays)
    assert health.requests == len(garbled) + len(arrays) + len(valid)
    assert len(sink.rejected) == len(garbled) + len(arrays)


def test_swap_model_under_load_drops_nothing(
    demo: DemoModels, runtime: InspectionRuntime, sink: Sink
) -> None:
    runtime.apply_policy(
        Policy(inspections=[rule(demo, max_wait_ms=2)]),
        {"defects": ("fp32", demo.trained.onnx_path)},
    )
    rng = np.random.default_rng(5)
    frames = [make_frame(i % 3 == 0, rng) for i in range(16)]
    futures: list[Future[Verdict]] = []
    stop = threading.Event()

    def client() -> None:
        i = 0
        while not stop.is_set() or i < 200:
            futures.append(runtime.submit("frames", frames[i % len(frames)], record_seq=i))
            i += 1
            if i % 8 == 0:
                time.sleep(0.001)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        versions = ["int8", "fp32-b", "int8-b"]
        paths = [demo.int8_path, demo.trained.onnx_path, demo.int8_path]
        for version, path in zip(versions, paths, strict=True):
            time.sleep(0.15)
            runtime.swap_model("defects", version, path)
    finally:
        stop.set()
        thread.join()
    verdicts = results(futures)  # raises if any request was dropped or failed
    assert len(verdicts) == len(futures) >= 200
    assert [v.record_seq for v in verdicts] == list(range(len(futures)))
    seen = {v.model_version for v in verdicts}
    assert {"fp32", "int8-b"} <= seen
    assert verdicts[-1].model_version == "int8-b"
    assert runtime.health()["defects"].version == "int8-b"
    assert runtime.health()["defects"].errors == 0


def test_failed_swap_keeps_serving_the_old_version(
    demo: DemoModels, runtime: InspectionRuntime, tmp_path: Path
) -> None:
    installed = {"defects": ("1", demo.trained.onnx_path)}
    runtime.apply_policy(Policy(inspections=[rule(demo)]), installed)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError):
        runtime.swap_model("defects", "2", broken)
    runtime.apply_policy(Policy(inspections=[rule(demo)]), {"defects": ("2", broken)})
    health = runtime.health()["defects"]
    assert health.loaded and health.version == "1" and "cannot load" in health.error
    frame = make_frame(True, np.random.default_rng(0))
    assert runtime.submit("frames", frame).result(timeout=TIMEOUT_S).model_version == "1"


def test_apply_policy_loads_unloads_and_reports_missing_models(
    demo: DemoModels, runtime: InspectionRuntime, sink: Sink
) -> None:
    two = Policy(
        inspections=[rule(demo), rule(demo, name="other", model="absent", result_topic="x/y")]
    )
    runtime.apply_policy(two, {"defects": ("1", demo.trained.onnx_path)})
    health = runtime.health()
    assert health["defects"].loaded and not health["absent"].loaded
    with pytest.raises(InspectionRejected) as err:
        runtime.submit("other", b"x").result(timeout=TIMEOUT_S)
    assert err.value.reason == "no_model"

    runtime.apply_policy(Policy(), {})
    assert runtime.health() == {}
    assert runtime.on_inspect("line1/camera/1", b"x", 1) == 0
    with pytest.raises(InspectionRejected) as err:
        runtime.submit("frames", b"x").result(timeout=TIMEOUT_S)
    assert err.value.reason == "no_rule"


def test_a_raising_callback_is_counted_and_the_verdict_still_stored(demo: DemoModels) -> None:
    stored: list[Verdict] = []

    def publish(topic: str, payload: bytes) -> None:
        raise ConnectionError("broker gone")

    with InspectionRuntime(publish, stored.append) as rt:
        rt.apply_policy(Policy(inspections=[rule(demo)]), {"defects": ("1", demo.int8_path)})
        frame = make_frame(False, np.random.default_rng(2))
        rt.on_inspect("line1/camera/0", frame, 1)
        rt.on_inspect("line1/camera/0", frame, 2)
        rt.submit("frames", frame).result(timeout=TIMEOUT_S)
        rt.stop()  # answers everything queued before returning
        assert [v.record_seq for v in stored] == [1, 2, None]
        assert (
            rt.registry.get_sample_value(
                "fieldline_inspection_callback_errors_total", {"callback": "publish"}
            )
            == 2
        )


def test_providers_keep_config_order_and_fall_back_to_cpu() -> None:
    assert choose_providers(
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    ) == ["CPUExecutionProvider"]
    assert choose_providers(["NoSuchExecutionProvider"]) == ["CPUExecutionProvider"]


def test_policy_applied_before_start_serves_after_start_and_stop_drains(
    demo: DemoModels, sink: Sink
) -> None:
    rt = InspectionRuntime(sink.publish, sink.store, registry=CollectorRegistry())
    try:
        rt.apply_policy(Policy(inspections=[rule(demo)]), {"defects": ("1", demo.int8_path)})
        frame = make_frame(True, np.random.default_rng(9))
        with pytest.raises(InspectionRejected) as err:
            rt.submit("frames", frame).result(timeout=TIMEOUT_S)
        assert err.value.reason == "stopped"
        rt.start()
        queued = [rt.submit("frames", frame, record_seq=i) for i in range(100)]
    finally:
        rt.stop()
    assert [f.result(timeout=0).record_seq for f in queued] == list(range(100))
    assert rt.on_inspect("line1/camera/1", frame, 1) == 0  # stopped: refused, not queued


def test_a_flood_of_garbage_mixed_with_frames_loses_no_valid_frame(
    demo: DemoModels, runtime: InspectionRuntime, sink: Sink
) -> None:
    runtime.apply_policy(
        Policy(inspections=[rule(demo, max_wait_ms=1)]), {"defects": ("1", demo.int8_path)}
    )
    rng = np.random.default_rng(21)
    frames = [make_frame(i % 2 == 1, rng) for i in range(8)]
    garbage = [
        b"",
        b"{not json",
        b"\x89PNG\r\n\x1a\n" + bytes(200),
        frames[0][:-40],
        frames[1][:100] + bytes(rng.integers(0, 256, 300, dtype=np.uint8)),
        bytes(rng.integers(0, 256, 5000, dtype=np.uint8)),
    ]
    n_valid = n_bad = 0
    for seq in range(3000):
        if seq % 3 == 0:
            runtime.on_inspect("line1/camera/a", frames[seq % len(frames)], seq)
            n_valid += 1
        else:
            runtime.on_inspect("line1/camera/b", garbage[seq % len(garbage)], seq)
            n_bad += 1
    wait_until(
        lambda: len(sink.stored) + len(sink.rejected) >= 3000, TIMEOUT_S, "an answer per request"
    )
    assert len(sink.stored) == len(sink.published) == n_valid
    assert len(sink.rejected) == n_bad
    assert {v.record_seq for v in sink.stored} == set(range(0, 3000, 3))
    health = runtime.health()["defects"]
    assert (health.requests, health.errors) == (3000, n_bad)
