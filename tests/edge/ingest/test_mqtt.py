"""MQTT ingestion into the outbox against a real Mosquitto: exactly once, garbage, back-pressure."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from fieldline.cli.harness.mosquitto import MosquittoBroker
from fieldline.edge.ingest.mqtt import MqttIngestor
from fieldline.edge.ingest.mqtt_client import catch_log_exception
from fieldline.edge.ingest.outbox import NewRecord, Outbox
from fieldline.shared.config import MqttSettings
from fieldline.shared.limits import MAX_RECORD_PAYLOAD_BYTES
from fieldline.shared.policy import InspectionRule, Policy, Retention, Subscription
from tests.support.polling import wait_until

TOPIC = "plant/line1/sensor/temp"


def publisher(port: int) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="", protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def publish_all(c: mqtt.Client, payloads: list[bytes], topic: str = TOPIC) -> None:
    infos = [c.publish(topic, p, qos=1) for p in payloads]
    for info in infos:
        info.wait_for_publish(30)


def readings(start: int, n: int) -> list[bytes]:
    return [
        json.dumps({"ts": 1.7e9 + i, "value": i * 0.5, "id": i}).encode()
        for i in range(start, start + n)
    ]


def ids_in(outbox: Outbox) -> list[int]:
    out = []
    for r in outbox.read_batch(0, 10_000_000):
        with contextlib.suppress(ValueError, KeyError):  # verdicts and garbage carry no id
            out.append(json.loads(r.payload)["id"])
    return out


def ingestor(broker: MosquittoBroker, outbox: Outbox, cid: str = "edge-test", **kw) -> MqttIngestor:  # type: ignore[no-untyped-def]
    ing = MqttIngestor(MqttSettings(port=broker.port, **kw), outbox, client_id=cid)
    ing.apply_policy(Policy(subscriptions=[Subscription(topic="plant/#")]))
    ing.start()
    assert ing.subscribed.wait(10), "no SUBACK from the broker"
    return ing


def test_readings_stored_exactly_once(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    ing = ingestor(mosquitto, outbox)
    pub = publisher(mosquitto.port)
    publish_all(pub, readings(0, 2000))
    wait_until(lambda: len(ids_in(outbox)) >= 2000, 30, "2000 readings")
    ing.stop()
    pub.loop_stop()
    ids = ids_in(outbox)
    assert sorted(ids) == list(range(2000))
    seqs = [r.seq for r in outbox.read_batch(0, 10_000)]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_garbage_is_dead_lettered_and_valid_ones_stored(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    outbox = Outbox(tmp_path)
    ing = ingestor(mosquitto, outbox)
    pub = publisher(mosquitto.port)
    garbage = [
        b"{not json",
        b"",
        b"x" * (5 * 1024 * 1024),
        json.dumps({"ts": "yesterday", "value": 1}).encode(),
        json.dumps({"ts": 1.7e9, "value": [1, 2]}).encode(),
        json.dumps({"ts": 1.7e9, "values": [1, "a"]}).encode(),
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 10,
        b"\xff\xd8\xff\xe0 truncated jpeg",
        b"\xff\xfe\x00 binary",
        json.dumps(42).encode(),
        b"[" * 100_000,  # deeper than json can recurse
        b'{"ts": 1700000000, "value": ' + b"9" * 400 + b"}",  # overflows a float
    ]
    mixed: list[bytes] = []
    good = readings(0, 300)
    for i, g in enumerate(good):
        mixed.append(g)
        mixed.append(garbage[i % len(garbage)])
    publish_all(pub, mixed)
    wait_until(lambda: outbox.stats().dead_letters >= 300, 30, "garbage dead-lettered")
    wait_until(lambda: len(ids_in(outbox)) >= 300, 30, "valid readings")
    assert ing.connected
    assert sorted(ids_in(outbox)) == list(range(300))
    assert outbox.stats().dead_letters == 300
    reasons = {r for _, r, _ in outbox.dead_letters(1000)}
    assert any("not JSON" in r for r in reasons) and any("exceeds" in r for r in reasons)
    ing.stop()
    pub.loop_stop()


def test_a_message_over_the_cloud_record_limit_is_dead_lettered_with_the_reason(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    outbox = Outbox(tmp_path)
    ing = ingestor(mosquitto, outbox, max_payload_bytes=MAX_RECORD_PAYLOAD_BYTES)
    pub = publisher(mosquitto.port)
    publish_all(pub, [b"x" * (MAX_RECORD_PAYLOAD_BYTES + 1)])
    wait_until(lambda: ing.health().dead_lettered == 1, 30, "the oversize message dead-lettered")
    ing.stop()
    pub.loop_stop()
    assert outbox.stats().rows == 0 and outbox.read_batch(0, 10) == []
    [(topic, reason, size)] = outbox.dead_letters()
    assert (topic, size) == (TOPIC, MAX_RECORD_PAYLOAD_BYTES + 1)
    assert f"exceeds the record limit of {MAX_RECORD_PAYLOAD_BYTES} bytes" in reason
    health = ing.health()
    assert (health.refused, health.dead_lettered, health.stored) == (1, 1, 0)
    assert outbox.stats().dead_letters == 1


def test_broker_restart_loses_nothing(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    ing = ingestor(mosquitto, outbox)
    ing.stop()  # the session (and its subscription) persists in the broker
    pub = publisher(mosquitto.port)
    publish_all(pub, readings(0, 1500))  # queued for the offline persistent session
    pub.loop_stop()
    pub.disconnect()
    time.sleep(1.5)  # autosave_interval 1
    mosquitto.restart()
    ing2 = ingestor(mosquitto, Outbox(tmp_path))
    pub2 = publisher(mosquitto.port)
    publish_all(pub2, readings(1500, 500))
    wait_until(lambda: len(ids_in(outbox)) >= 2000, 30, "all readings after the restart")
    assert sorted(ids_in(outbox)) == list(range(2000))
    ing2.stop()
    pub2.loop_stop()


def test_backpressure_holds_acks_until_sync_frees_room(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    outbox = Outbox(tmp_path, Retention(max_rows=100, max_bytes=1024 * 1024, keep_synced_s=0))
    # 100 verdicts fill it: they are never dropped.
    outbox.commit_batch([NewRecord("verdict", "v", 1, b"{}") for _ in range(100)])
    ing = ingestor(mosquitto, outbox, receive_maximum=50)
    pub = publisher(mosquitto.port)
    t = threading.Thread(target=publish_all, args=(pub, readings(0, 400)))
    t.start()
    wait_until(lambda: ing.health().backpressure, 10, "the ingestor to hold its acks")
    assert ids_in(outbox) == []  # nothing stored, nothing acked: the broker holds them
    assert outbox.stats().rows == 100
    outbox.mark_synced(100)  # the cloud took the verdicts
    outbox.prune()
    # Room for 100 rows at a time: telemetry drops oldest as more arrives; ingestion catches up.
    wait_until(lambda: outbox.stats().last_seq >= 100 + 400, 30, "ingestion to catch up")
    t.join(30)
    stats = outbox.stats()
    assert stats.rows <= 100
    assert stats.dropped == 400 - len(ids_in(outbox))
    assert ids_in(outbox)[-1] == 399
    ing.stop()
    pub.loop_stop()


def test_telemetry_drops_oldest_but_verdicts_stay(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path, Retention(max_rows=100, max_bytes=1024 * 1024))
    outbox.commit_batch([NewRecord("verdict", "v", 1, b"{}") for _ in range(30)])
    for i in range(10):
        outbox.commit_batch(
            [
                NewRecord("telemetry", "t", 1, json.dumps({"id": i * 20 + j}).encode())
                for j in range(20)
            ]
        )
    stats = outbox.stats()
    assert stats.rows == 100
    assert stats.dropped == 130
    kinds = [r.kind for r in outbox.read_batch(0, 1000)]
    assert kinds.count("verdict") == 30
    assert ids_in(outbox) == list(range(130, 200))


def test_catch_log_exception_counts_a_raising_callback_by_name() -> None:
    counted: list[str] = []

    def _on_message(*_: object) -> None:
        raise RuntimeError("a bug in a handler")

    wrapped = catch_log_exception(_on_message, counted.append)
    wrapped(None, None, None)  # returns: the network loop that called it goes on
    assert counted == ["on_message"]


def test_a_raising_inspection_hook_is_counted_and_ingestion_goes_on(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    outbox = Outbox(tmp_path)
    registry = CollectorRegistry()
    seen: list[int] = []

    def on_inspect(topic: str, payload: bytes, seq: int) -> None:
        seen.append(seq)
        raise RuntimeError("inspection hook bug")

    ing = MqttIngestor(
        MqttSettings(port=mosquitto.port),
        outbox,
        client_id="edge-hook",
        on_inspect=on_inspect,
        registry=registry,
    )
    rule = InspectionRule(name="r", topic="plant/#", model="m", result_topic="plant/verdicts")
    ing.apply_policy(Policy(inspections=[rule]))
    ing.start()
    assert ing.subscribed.wait(10), "no SUBACK from the broker"
    pub = publisher(mosquitto.port)
    publish_all(pub, readings(0, 5))
    wait_until(lambda: len(seen) == 5, 30, "the hook called for every stored reading")
    ing.stop()
    pub.loop_stop()
    assert sorted(ids_in(outbox)) == list(range(5))
    errors = registry.get_sample_value("fieldline_edge_mqtt_errors_total", {"where": "on_inspect"})
    assert errors == 5


def test_max_payload_bytes_cannot_exceed_what_the_cloud_stores() -> None:
    assert MqttSettings().max_payload_bytes == MAX_RECORD_PAYLOAD_BYTES
    with pytest.raises(ValidationError, match="less than or equal"):
        MqttSettings(max_payload_bytes=MAX_RECORD_PAYLOAD_BYTES + 1)
