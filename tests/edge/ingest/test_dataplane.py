"""The data plane as the agent runs it, on a real Mosquitto and a real ONNX model: the desired
state's policy is applied, a matching message is inspected, its verdict published on the result
topic and stored, and the data plane's health is typed."""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fieldline.cli.harness.mosquitto import MosquittoBroker
from fieldline.edge.ingest import dataplane as dataplane_module
from fieldline.edge.ingest.dataplane import DataPlane
from fieldline.edge.ingest.outbox import DB_FILE, NewRecord, Outbox, RecordTooLarge
from fieldline.edge.store import EdgeStore
from fieldline.shared.config import EdgeSettings, MqttSettings
from fieldline.shared.health import DataPlaneHealth
from fieldline.shared.limits import MAX_RECORD_PAYLOAD_BYTES
from fieldline.shared.schemas import ArtifactState, DesiredState
from tests.support.onnx_models import INPUT_SHAPE, inspection_policy, tiny_classifier
from tests.support.polling import wait_until

FRAMES = "plant1/line1/camera/frames"  # matches the policy's inspection rule
READINGS = "plant1/line1/temp"
VERDICTS = "plant1/verdicts"
TIMEOUT_S = 30


def subscriber(port: int, topic: str) -> tuple[mqtt.Client, queue.Queue[bytes]]:
    got: queue.Queue[bytes] = queue.Queue()
    subscribed = queue.Queue[bool]()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="line-system", protocol=mqtt.MQTTv5)
    c.on_message = lambda _c, _u, msg: got.put(bytes(msg.payload))
    c.on_subscribe = lambda *_: subscribed.put(True)
    c.connect("127.0.0.1", port)
    c.subscribe(topic, qos=1)
    c.loop_start()
    subscribed.get(timeout=TIMEOUT_S)
    return c, got


def installed_model(store: EdgeStore, path: Path) -> None:
    store.set_artifact(
        name="detector",
        version="1",
        sha256="0" * 64,
        kind="onnx",
        state=ArtifactState.active,
        path=str(tiny_classifier(path)),
    )
    store.set_active("detector", "1")


def test_policy_applied_message_inspected_verdict_published_and_stored(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    store = EdgeStore(tmp_path / "edge")
    installed_model(store, tmp_path / "detector.onnx")
    settings = EdgeSettings(data_dir=tmp_path / "edge", mqtt=MqttSettings(port=mosquitto.port))
    plane = DataPlane(settings, store, "node_test", send=lambda _msg: False)  # offline: no tunnel
    line, verdicts = subscriber(mosquitto.port, VERDICTS)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="camera", protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    plane.start()
    try:
        policy = inspection_policy("detector", subscriptions=[{"topic": READINGS}])
        plane.apply(DesiredState(node_id="node_test", generation=1, policy=policy))
        assert plane.ingestor is not None and plane.ingestor.subscribed.wait(TIMEOUT_S)

        frame = json.dumps([0.25] * (3 * 8 * 8)).encode()
        assert INPUT_SHAPE == (3, 8, 8)
        pub.publish(FRAMES, frame, qos=1).wait_for_publish(TIMEOUT_S)
        pub.publish(READINGS, b'{"ts": 1700000000, "value": 21.5}', qos=1).wait_for_publish(10)

        verdict = json.loads(verdicts.get(timeout=TIMEOUT_S))
        assert (verdict["rule"], verdict["model"], verdict["model_version"]) == (
            "detector-rule",
            "detector",
            "1",
        )
        assert verdict["topic"] == FRAMES and verdict["label"] in ("ok", "defect")
        wait_until(lambda: plane.health().mqtt.stored == 2, TIMEOUT_S, "the reading stored too")
        rows = plane.outbox.read_batch(0, 100)
        by_kind = {(r.kind, r.topic): r for r in rows}
        assert set(by_kind) == {
            ("telemetry", FRAMES),
            ("telemetry", READINGS),
            ("verdict", VERDICTS),
        }
        assert by_kind[("telemetry", FRAMES)].payload == frame
        assert verdict["record_seq"] == by_kind[("telemetry", FRAMES)].seq
        assert json.loads(by_kind[("verdict", VERDICTS)].payload) == verdict

        health = plane.health()
        assert isinstance(health, DataPlaneHealth)
        assert health.mqtt.connected and health.mqtt.configured
        assert (health.mqtt.stored, health.mqtt.dead_lettered) == (2, 0)
        assert health.outbox.rows == 3 and health.outbox.unsynced == 3
        assert health.verdicts_published == 1 and health.verdicts_dropped == 0
        model = health.inspection["detector"]
        assert model.loaded and model.version == "1" and model.requests == 1
        assert model.p95_latency_ms is not None and model.error_rate == 0.0
        assert plane.model_health()["detector"].serving
        # The JSON a heartbeat carries parses back to the same health.
        assert DataPlaneHealth.model_validate_json(health.model_dump_json()) == health
    finally:
        plane.stop()
        for client in (pub, line):
            client.loop_stop()
            client.disconnect()
        store.close()


def test_verdicts_and_events_wait_for_room_and_are_never_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dataplane_module, "STORE_RETRY_S", 0.01)
    store = EdgeStore(tmp_path / "edge")
    installed_model(store, tmp_path / "detector.onnx")
    plane = DataPlane(
        EdgeSettings(data_dir=tmp_path / "edge"), store, "node_test", lambda _m: False
    )
    plane.start()
    stopped = False
    try:
        policy = inspection_policy("detector", retention={"max_rows": 100})
        plane.apply(DesiredState(node_id="node_test", generation=1, policy=policy))
        with pytest.raises(RecordTooLarge):  # larger than the cloud stores
            plane.store_event("plant1/events", b"x" * (MAX_RECORD_PAYLOAD_BYTES + 1), 1)
        # Only verdicts and events left, and sync behind: the outbox is full.
        plane.outbox.append([NewRecord("verdict", VERDICTS, 1, b"{}")] * 100)
        event = threading.Thread(target=plane.store_event, args=("plant1/events", b"{}", 1))
        event.start()
        frame = json.dumps([0.25] * (3 * 8 * 8)).encode()
        waiting = plane.inspection.submit("detector-rule", frame)
        time.sleep(0.5)
        assert not waiting.done() and event.is_alive()  # both wait; nothing is dropped
        plane.outbox.mark_synced(100)  # the cloud acked: room again
        assert waiting.result(timeout=TIMEOUT_S).model == "detector"
        event.join(TIMEOUT_S)
        kinds = [r.kind for r in plane.outbox.read_batch(100, 10)]
        assert sorted(kinds) == ["event", "verdict"]
        health = plane.health()
        assert (health.verdicts_dropped, health.events_dropped) == (0, 1)
        # Full again, then stopped while a verdict waits: that one is dropped and counted.
        plane.outbox.append([NewRecord("verdict", VERDICTS, 1, b"{}")] * 98)
        late = plane.inspection.submit("detector-rule", frame)
        time.sleep(0.3)
        plane.stop()
        stopped = True
        assert late.result(timeout=TIMEOUT_S).model == "detector"
        assert plane.verdicts_dropped == 1
        sample = plane.registry.get_sample_value
        assert (
            sample("fieldline_edge_records_dropped_total", {"kind": "verdict", "reason": "full"})
            == 1
        )
        assert (
            sample("fieldline_edge_records_dropped_total", {"kind": "event", "reason": "refused"})
            == 1
        )
    finally:
        if not stopped:
            plane.stop()
        store.close()


def test_a_recreated_outbox_gets_the_next_epoch_and_an_old_one_keeps_0(tmp_path: Path) -> None:
    def epoch_of(data: Path) -> int:
        store = EdgeStore(data)
        plane = DataPlane(EdgeSettings(data_dir=data), store, "node_test", lambda _m: False)
        try:
            return plane.sync.epoch
        finally:
            plane.stop()
            store.close()

    data = tmp_path / "edge"
    assert epoch_of(data) == 1  # a fresh install
    assert epoch_of(data) == 1  # reopened: the same sequence space
    for suffix in ("", "-wal", "-shm"):
        (data / f"{DB_FILE}{suffix}").unlink(missing_ok=True)
    assert epoch_of(data) == 2  # deleted while stopped: sequences restart in a new epoch
    # An outbox from before epochs, on a node that never had one, keeps 0 (its cloud records).
    old = tmp_path / "old"
    old.mkdir()
    Outbox(old).close()
    conn = sqlite3.connect(old / DB_FILE)
    conn.execute("DELETE FROM counters")
    conn.commit()
    conn.close()
    assert epoch_of(old) == 0
