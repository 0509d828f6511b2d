"""Issue 13's image findings through the gateway's real /v1/inspect on a real ONNX Runtime
session: a frame that cannot fit the model is refused from its header, before it is decoded
into floats (measured with tracemalloc), and the queue is bounded in payload bytes."""

from __future__ import annotations

import io
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from fieldline.edge.inspection.runtime import InspectionRuntime
from fieldline.shared.config import GatewaySettings, InspectionSettings, LLMSettings
from fieldline.shared.policy import InspectionRule, Policy
from tests.support.onnx_models import tiny_classifier
from tests.support.tiny_llm import ThreadedGateway

MIB = 1024 * 1024
# Decoding 4000x4000 RGB costs 48 MiB as uint8 and 192 MiB as float32.
HUGE_SIDE = 4000
MAX_PEAK = 16 * MIB
SIDE = 16  # the model's input: [N, 3, 16, 16]


def _runtime(model: Path, **settings: int) -> InspectionRuntime:
    rt = InspectionRuntime(
        lambda topic, payload: None,
        lambda verdict: None,
        settings=InspectionSettings(intra_op_threads=1, **settings),  # type: ignore[arg-type]
        registry=CollectorRegistry(),
    )
    rule = InspectionRule.model_validate(
        {
            "name": "frames",
            "topic": "line1/camera/+",
            "model": "defects",
            "result_topic": "line1/verdicts",
            # frames come at the model's size: no resize, so a bigger one cannot fit
            "preprocess": {"decoder": "image", "resize": None},
            "postprocess": {"labels": ["ok", "defect"], "defect_labels": ["defect"]},
        }
    )
    rt.apply_policy(Policy(inspections=[rule]), {"defects": ("1", model)})
    rt.start()
    return rt


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ThreadedGateway, InspectionRuntime]]:
    model = tiny_classifier(tmp_path_factory.mktemp("bounds") / "tiny.onnx", side=SIDE)
    rt = _runtime(model, max_queue_bytes=MIB)
    g = ThreadedGateway(GatewaySettings(port=0), llm=LLMSettings(device="cpu", autotune=False))
    g.start()
    g.state.inspect = lambda rule, payload, publish: rt.submit(rule, payload, publish=publish)
    yield g, rt
    g.stop()
    rt.stop()


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 90, 90)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_frame_that_cannot_fit_is_refused_before_decoding(
    gateway: tuple[ThreadedGateway, InspectionRuntime],
) -> None:
    g, _ = gateway
    huge = _png(HUGE_SIDE, HUGE_SIDE)
    assert len(huge) < MIB  # a solid frame compresses to almost nothing
    tracemalloc.start()
    try:
        r = httpx.post(f"{g.url}/v1/inspect", params={"rule": "frames"}, content=huge, timeout=60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"status {r.status_code}, peak traced memory {peak / MIB:.1f} MiB")
    assert r.status_code == 422, r.text
    assert "does not fit model input" in r.json()["error"]["message"]
    assert peak < MAX_PEAK


def test_a_fitting_frame_still_gets_a_verdict(
    gateway: tuple[ThreadedGateway, InspectionRuntime],
) -> None:
    g, _ = gateway
    frame = _png(SIDE, SIDE)
    r = httpx.post(f"{g.url}/v1/inspect", params={"rule": "frames"}, content=frame, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["label"] in ("ok", "defect")


def test_the_queue_is_bounded_in_bytes(gateway: tuple[ThreadedGateway, InspectionRuntime]) -> None:
    g, rt = gateway
    over = b"\x89PNG" + b"\0" * MIB  # alone over the 1 MiB bound: refused without queueing
    r = httpx.post(f"{g.url}/v1/inspect", params={"rule": "frames"}, content=over, timeout=60)
    assert r.status_code == 503, r.text
    assert "payload bytes waiting" in r.json()["error"]["message"]
    # Many smaller frames at once: whatever is refused is refused for bytes, nothing is lost.
    frame = b"\x89PNG" + b"\0" * (300 * 1024)
    futures = []
    lock = threading.Lock()

    def send() -> None:
        f = rt.submit("frames", frame)
        with lock:
            futures.append(f)

    threads = [threading.Thread(target=send) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reasons = set()
    for f in futures:
        exc = f.exception(timeout=30)
        assert exc is not None  # not a real PNG: refused by the decoder, or for bytes
        reasons.add(getattr(exc, "reason", "?"))
    assert reasons <= {"image", "overloaded"}
    assert rt._workers["defects"].queued_bytes() == 0
