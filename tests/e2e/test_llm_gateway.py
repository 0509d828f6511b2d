"""End to end: an LLM checkpoint pushed with the CLI (int8), loaded by an edge process with an
autotuned config that reaches the cloud, chat through the node's gateway with the openai
client, and alert explanations for defect verdicts on MQTT beside the verdicts."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fieldline.cli.harness.classifier import make_frame, train_classifier
from fieldline.cli.harness.mosquitto import MosquittoBroker
from fieldline.cli.harness.processes import fieldline_cmd
from tests.e2e.conftest import EDGE_ENV, Fleet, edge_status, wait_until
from tests.support.tiny_llm import write_tiny_llama

FRAMES = "plant1/line-a/camera/frames"
VERDICTS = "plant1/line-a/verdicts"
EXPLAIN = "Part on {topic} is {label} (score {score}). Say what to check:"


class Listener:
    """Collects verdicts and explanations with their arrival times."""

    def __init__(self, port: int) -> None:
        self.got: list[tuple[float, str, dict]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"{VERDICTS}/#", qos=1)  # the verdicts and the explanations
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:  # type: ignore[no-untyped-def]
        with self._lock:
            self.got.append((time.monotonic(), msg.topic, json.loads(msg.payload)))

    def on(self, topic: str) -> list[tuple[float, dict]]:
        with self._lock:
            return [(t, p) for t, top, p in self.got if top == topic]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_llm_artifact_to_gateway_chat_and_alert_explanations(
    fleet: Fleet, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    from openai import OpenAI

    checkpoint = write_tiny_llama(tmp_path / "tiny-llm")
    env = {**os.environ, "FIELDLINE_URL": fleet.url, "FIELDLINE_API_KEY": fleet.key}
    push = subprocess.run(
        fieldline_cmd(
            "artifact",
            "push",
            str(checkpoint),
            "--name",
            "assistant",
            "--version",
            "1",
            "--kind",
            "llm",
            "--quantize",
            "int8",
            "--json",
        ),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert push.returncode == 0, push.stderr
    manifest = json.loads(push.stdout)
    assert manifest["kind"] == "llm" and manifest["quantization"] == "int8"
    assert manifest["metadata"]["format"] == "checkpoint-tar/1"
    q = manifest["metadata"]["quantization"]
    assert q["method"] == "int8_weight_only" and q["bytes_after"] < q["bytes_before"]

    # a directory that is not a checkpoint is refused before any upload
    bad = subprocess.run(
        fieldline_cmd(
            "artifact", "push", str(tmp_path), "--name", "x", "--version", "1", "--kind", "llm"
        ),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert bad.returncode == 2 and "config.json" in bad.stderr

    classifier = train_classifier(tmp_path / "clf", seconds_budget=1.5)
    rule = classifier.rule(name="parts", topic=FRAMES, model="classifier", result_topic=VERDICTS)
    rule_doc = {
        **rule.model_dump(mode="json"),
        "explain_template": EXPLAIN,
        "explain_max_tokens": 8,
    }
    with fleet.admin() as admin:
        admin.push_artifact(classifier.onnx_path, name="classifier", version="1.0", kind="onnx")
        admin.assign("classifier@1.0", "line=a")
        admin.assign("assistant@1", "line=a")
        admin.apply_policy(
            {
                "name": "line-a",
                "inspections": [rule_doc],
                "prefetch_prompts": ["why did the press line stop"],
                "sync_interval_s": 0.5,
            },
            "line=a",
        )
    EDGE_ENV.update(
        {
            "FIELDLINE_MQTT__PORT": str(mosquitto.port),
            "FIELDLINE_LLM__KV_CACHE_BYTES": str(8 * 1024 * 1024),
        }
    )
    try:
        fleet.enroll_edge("edge-a", {"line": "a"})
    finally:
        EDGE_ENV.pop("FIELDLINE_MQTT__PORT")
        EDGE_ENV.pop("FIELDLINE_LLM__KV_CACHE_BYTES")

    # the node loads the LLM with an autotuned config and the cloud sees that config
    def llm_health() -> dict | None:
        llm = (fleet.node_of("edge-a").get("health") or {}).get("llm") or {}
        return llm if llm.get("state") == "serving" else None

    llm = wait_until(llm_health, 180, "the edge to serve the LLM")
    tuned = llm["engine_config"]
    assert llm["version"] == "1" and tuned["num_blocks"] >= 1 and tuned["kv_cache_bytes"] is None
    assert tuned["num_blocks"] * 16 * 2 * 2 * 2 * 16 * 4 <= 8 * 1024 * 1024  # the KV budget
    assert tuned["max_num_seqs"] >= 1 and tuned["max_prefill_chunk"] >= 16

    port = json.loads((fleet.root / "edge-a" / "gateway.json").read_text())["port"]
    gateway = f"http://127.0.0.1:{port}"

    def gateway_metric(name: str) -> float:
        for line in httpx.get(f"{gateway}/metrics", timeout=10).text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    # the listed prompt is warmed (as a chat turn and as a completion) before anyone asks
    wait_until(
        lambda: gateway_metric("fieldline_gateway_cache_prefetches_total") >= 2, 60, "prefetch"
    )
    client = OpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["assistant"]
    chat = client.chat.completions.create(
        model="assistant",
        messages=[{"role": "user", "content": "why did the press line stop"}],
        temperature=0,
    )
    assert chat.system_fingerprint == "assistant@1" and chat.usage is not None
    assert gateway_metric("fieldline_gateway_cache_hits_total") == 1
    status = edge_status(fleet.root / "edge-a")

    # defect verdicts get an explanation on VERDICTS/explanations, after the verdict
    listener = Listener(mosquitto.port)
    try:
        time.sleep(0.5)
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        pub.connect("127.0.0.1", mosquitto.port)
        pub.loop_start()
        rng = np.random.default_rng(3)
        for k in range(6):
            pub.publish(FRAMES, make_frame(k % 2 == 0, rng), qos=1).wait_for_publish(30)
        pub.loop_stop()
        pub.disconnect()
        wait_until(lambda: len(listener.on(VERDICTS)) >= 6, 60, "6 verdicts")
        defects = [(t, v) for t, v in listener.on(VERDICTS) if v["defect"]]
        assert defects
        topic = f"{VERDICTS}/explanations"
        wait_until(lambda: len(listener.on(topic)) >= len(defects), 90, "an explanation per defect")
        explained = listener.on(topic)
        by_seq = {v["record_seq"]: t for t, v in defects}
        assert len(explained) == len(defects)
        for t, e in explained:
            assert e["llm"] == "assistant@1" and e["label"] and isinstance(e["explanation"], str)
            assert e["record_seq"] in by_seq and t >= by_seq[e["record_seq"]]
        node_id = status["node_id"]
        with fleet.admin() as admin:
            wait_until(
                lambda: (
                    len(admin.records(node=node_id, kind="event", topic=topic)["records"])
                    >= len(defects)
                ),
                60,
                "explanations synced to the cloud as events",
            )
    finally:
        listener.close()
