"""Alert explanations and /v1/inspect: a real ONNX classifier, the real engine, the gateway; the
verdict is answered and stored before any explanation, explanations go beside it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from fieldline.cli.harness.classifier import TrainedClassifier, make_frame, train_classifier
from fieldline.edge.inspection.runtime import InspectionRuntime, Verdict
from fieldline.edge.llm.services import LLMChoice, LlmServices
from fieldline.shared.config import GatewaySettings, InspectionSettings, LLMSettings
from fieldline.shared.policy import Policy
from tests.support.polling import wait_until
from tests.support.tiny_llm import ThreadedGateway, write_tiny_llama

RESULTS = "line1/verdicts"
TEMPLATE = "Part on {topic} is {label} (score {score}, {model}@{model_version}). Why?"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedClassifier:
    return train_classifier(tmp_path_factory.mktemp("clf"), seconds_budget=1.5)


class Node:
    """The inspection runtime, the LLM services and their gateway wired as the agent wires them."""

    def __init__(self, trained: TrainedClassifier, llm_dir: Path, template: str | None) -> None:
        rule = trained.rule(
            name="parts",
            topic="line1/camera/+",
            model="defects",
            result_topic=RESULTS,
            explain_template=template,
            explain_max_tokens=6,
        )
        self.policy = Policy(inspections=[rule])
        self.lock = threading.Lock()
        self.events: list[tuple[float, str, object]] = []  # (time, what, payload)
        self.runtime = InspectionRuntime(
            self._publish, self._store, settings=InspectionSettings(), registry=CollectorRegistry()
        )
        self.gw = ThreadedGateway(
            GatewaySettings(port=0),
            LLMSettings(device="cpu", autotune=False, kv_cache_bytes=8 * 1024 * 1024),
            self.policy,
        )

    def start(self, llm_dir: Path) -> Node:
        self.gw.start()
        services = self.gw.services
        assert services is not None
        self.gw.state.inspect = lambda rule, payload, publish: self.runtime.submit(
            rule, payload, publish=publish
        )
        services.explainer._publish = self._publish_explanation  # type: ignore[method-assign]
        services.explainer._store = self._store_explanation  # type: ignore[method-assign]
        self.services: LlmServices = services
        self.runtime.start()
        self.runtime.apply_policy(self.policy, {"defects": ("1", self.trained_path)})
        self.gw.call(services.apply(LLMChoice("assistant", "1", llm_dir)))
        return self

    def _publish(self, topic: str, payload: bytes) -> None:
        with self.lock:
            self.events.append((time.monotonic(), "verdict-published", json.loads(payload)))

    def _store(self, verdict: Verdict) -> None:
        with self.lock:
            self.events.append((time.monotonic(), "verdict-stored", verdict))
        rule = self.policy.inspections[0]
        self.services.explainer.on_verdict(verdict, rule)  # as DataPlane._store_verdict does

    def _publish_explanation(self, topic: str, payload: bytes) -> None:
        with self.lock:
            self.events.append((time.monotonic(), topic, json.loads(payload)))

    def _store_explanation(self, topic: str, payload: bytes, ts_ms: int) -> None:
        with self.lock:
            self.events.append((time.monotonic(), "explanation-stored", json.loads(payload)))

    def of(self, what: str) -> list[tuple[float, object]]:
        with self.lock:
            return [(t, p) for t, w, p in self.events if w == what]

    def stop(self) -> None:
        self.runtime.stop()
        self.gw.stop()


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("llm") / "tiny")


@pytest.fixture
def node(trained: TrainedClassifier, llm_dir: Path) -> Iterator[Node]:
    n = Node(trained, llm_dir, TEMPLATE)
    n.trained_path = trained.onnx_path  # type: ignore[attr-defined]
    n.start(llm_dir)
    yield n
    n.stop()


def test_defect_verdicts_get_explanations_after_the_verdict(node: Node) -> None:
    rng = np.random.default_rng(0)
    url = node.gw.url
    answers = []
    for k in range(6):
        frame = make_frame(k % 2 == 0, rng)
        started = time.monotonic()
        r = httpx.post(
            f"{url}/v1/inspect", params={"rule": "parts", "publish": True}, content=frame
        )
        assert r.status_code == 200, r.text
        answers.append((started, time.monotonic(), r.json()))
    defects = [a for a in answers if a[2]["defect"]]
    assert len(defects) == 3 and all(a[2]["rule"] == "parts" for a in answers)
    topic = f"{RESULTS}/explanations"
    wait_until(
        lambda: len(node.of(topic)) == 3 and len(node.of("explanation-stored")) == 3,
        60,
        "three explanations published and stored",
        poll_s=0.05,
    )
    stored = {v.ts_ms: t for t, v in node.of("verdict-stored")}  # type: ignore[attr-defined]
    for t, e in node.of(topic):
        assert e["llm"] == "assistant@1" and e["label"] == "defect"  # type: ignore[index]
        assert t > stored[e["verdict_ts_ms"]]  # type: ignore[index]
    assert len(node.of("verdict-published")) == 6  # publish=True: every verdict on RESULTS
    # good parts get no explanation
    assert {e["verdict_ts_ms"] for _, e in node.of(topic)} == {  # type: ignore[index]
        a[2]["ts_ms"] for a in defects
    }


def test_inspect_errors(node: Node) -> None:
    url = node.gw.url
    frame = make_frame(True, np.random.default_rng(1))
    assert (
        httpx.post(f"{url}/v1/inspect", params={"rule": "nope"}, content=frame).status_code == 404
    )
    assert httpx.post(f"{url}/v1/inspect", params={"rule": "parts"}, content=b"").status_code == 422
    bad = httpx.post(f"{url}/v1/inspect", params={"rule": "parts"}, content=b"\x89PNG garbage")
    assert bad.status_code == 422 and bad.json()["error"]["message"]
    big = httpx.post(
        f"{url}/v1/inspect", params={"rule": "parts"}, content=b"x" * (4 * 1024 * 1024 + 1)
    )
    assert big.status_code == 413
