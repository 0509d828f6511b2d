"""MQTT ingestion under faults, against a real Mosquitto: kill -9 of the ingesting process, a
broker restart mid-stream, thousands of garbled payloads mixed with valid ones."""

from __future__ import annotations

import io
import json
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import paho.mqtt.client as mqtt
import structlog
import structlog.testing
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from PIL import Image

from fieldline.cli.harness.mosquitto import MosquittoBroker
from fieldline.cli.harness.tcp_proxy import free_port
from fieldline.edge.ingest.mqtt import MqttIngestor
from fieldline.edge.ingest.outbox import DB_FILE, Outbox
from fieldline.shared.config import MqttSettings
from fieldline.shared.policy import Policy, Subscription
from tests.support.polling import wait_until

TOPIC = "plant/line1/sensor/temp"
ROOT = Path(__file__).resolve().parents[2]
PUBLISH_TIMEOUT_S = 120


def publisher(port: int, client_id: str = "test-pub") -> mqtt.Client:
    """A QoS 1 publisher with a persistent session: paho resends what the broker did not ack."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.reconnect_delay_set(0.1, 1)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 600
    c.connect("127.0.0.1", port, clean_start=False, properties=props)
    c.loop_start()
    return c


def publish_all(c: mqtt.Client, payloads: list[bytes], topic: str = TOPIC) -> None:
    infos = [c.publish(topic, p, qos=1) for p in payloads]
    deadline = time.monotonic() + PUBLISH_TIMEOUT_S
    for info in infos:
        info.wait_for_publish(max(0.1, deadline - time.monotonic()))
    assert all(i.is_published() for i in infos), "the broker did not ack every publish"


def reading(i: int) -> bytes:
    return json.dumps({"ts": 1.7e9 + i, "value": i * 0.5, "id": i}).encode()


def stored_ids(data_dir: Path) -> Counter[int]:
    """Reading ids in the outbox, read through a separate connection (as another process would)."""
    conn = sqlite3.connect(data_dir / DB_FILE)
    try:
        rows = conn.execute("SELECT payload FROM records WHERE kind = 'telemetry'").fetchall()
    finally:
        conn.close()
    return Counter(json.loads(p)["id"] for (p,) in rows if p[:1] == b"{")  # images carry no id


def row_count(data_dir: Path) -> int:
    try:
        conn = sqlite3.connect(data_dir / DB_FILE)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM records").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:  # not created yet
        return 0


class IngestProcess:
    """`python -m fieldline.cli.harness.ingestor` in a subprocess, so the test can kill -9 it."""

    def __init__(self, data_dir: Path, port: int):
        self.args = [
            sys.executable,
            "-m",
            "fieldline.cli.harness.ingestor",
            "--data",
            str(data_dir),
            "--port",
            str(port),
            "--topic",
            "plant/#",
            "--client-id",
            "edge-kill9",
        ]
        self.proc: subprocess.Popen[str] | None = None
        self.log = data_dir.parent / "ingest.log"

    def start(self) -> IngestProcess:
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                self.args, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "ready" once subscribed
        assert line.strip() == "ready", f"ingest process did not start: {line!r}"
        return self

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(20)


# The sizes run in ~6 s each here, so they are not marked slow.
def test_kill9_mid_stream_stores_every_reading_once(
    mosquitto: MosquittoBroker, tmp_path: Path, total: int = 20_000
) -> None:
    data = tmp_path / "edge"
    proc = IngestProcess(data, mosquitto.port).start()
    pub = publisher(mosquitto.port)
    try:
        sender = threading.Thread(
            target=publish_all, args=(pub, [reading(i) for i in range(total)]), daemon=True
        )
        sender.start()
        kill_at = random.randint(total // 10, total * 7 // 10)
        wait_until(lambda: row_count(data) >= kill_at, 60, f"{kill_at} rows before the kill")
        proc.kill9()
        killed_with = row_count(data)
        assert killed_with < total, "the kill came after everything was stored"
        proc.start()  # same client id: the broker resumes the session, redelivering unacked ones
        sender.join(PUBLISH_TIMEOUT_S)
        wait_until(lambda: row_count(data) >= total, 60, "every reading after the restart")
        time.sleep(0.5)  # anything extra (a duplicate) would land now
        assert proc.stop() == 0
        # For the record: how many redeliveries the restarted process recognised.
        print([ln for ln in proc.log.read_text().splitlines() if "ingestion stopped" in ln])
    finally:
        proc.kill9()
        pub.loop_stop()
    ids = stored_ids(data)
    assert len(ids) == total, f"{total - len(ids)} readings missing (killed at {killed_with})"
    assert set(ids) == set(range(total))
    dups = {i: n for i, n in ids.items() if n > 1}
    assert not dups, f"{len(dups)} readings stored more than once"


def test_broker_restart_mid_stream_loses_no_qos1_message(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    total = 6000
    outbox = Outbox(tmp_path)
    ing = MqttIngestor(MqttSettings(port=mosquitto.port), outbox, client_id="edge-restart")
    ing.apply_policy(Policy(subscriptions=[Subscription(topic="plant/#")]))
    ing.start()
    pub = publisher(mosquitto.port)
    try:
        assert ing.subscribed.wait(10)
        sender = threading.Thread(
            target=publish_all, args=(pub, [reading(i) for i in range(total)]), daemon=True
        )
        sender.start()
        wait_until(lambda: ing.stored >= total // 4, 60, "a quarter stored")
        mosquitto.restart()  # SIGTERM: saves persistence; both clients reconnect and resume
        sender.join(PUBLISH_TIMEOUT_S)
        assert not sender.is_alive()
        wait_until(lambda: len(stored_ids(tmp_path)) >= total, 60, "every reading")
        time.sleep(0.5)
    finally:
        ing.stop()
        pub.loop_stop()
    ids = stored_ids(tmp_path)
    assert set(ids) == set(range(total)), "a QoS 1 reading was lost"
    # QoS 1 is at least once on the publisher's leg too: a publish whose PUBACK the stopping
    # broker never sent is published again, and the broker takes it as a new message (new
    # packet id). Such copies are allowed; a redelivery of the same broker message is not.
    conn = sqlite3.connect(tmp_path / DB_FILE)
    keys: dict[int, list[str]] = {}
    for key, payload in conn.execute("SELECT delivery, payload FROM records"):
        keys.setdefault(json.loads(payload)["id"], []).append(key)
    conn.close()
    copies = {i: k for i, k in keys.items() if len(k) > 1}
    assert all(len(set(k)) == len(k) for k in copies.values()), copies
    assert len(copies) <= 10, f"{len(copies)} readings published twice"


def _png(size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 30)).save(buf, "JPEG")
    return buf.getvalue()


def garbage_kinds(max_payload: int) -> list[bytes]:
    png, jpeg = _png(), _jpeg()
    broken_crc = bytearray(png)
    broken_crc[40] ^= 0xFF  # inside the first chunk after IHDR: a CRC mismatch
    return [
        b"{not json",
        b"",
        b"\xff\xfe\x00 binary",
        b"x" * (max_payload + 1),  # huge
        json.dumps({"ts": "yesterday", "value": 1}).encode(),
        json.dumps({"ts": 1.7e9, "value": [1, 2]}).encode(),
        json.dumps({"ts": 1.7e9, "values": [1, "a"]}).encode(),
        json.dumps({"ts": 1.7e9, "values": {"a": 1}}).encode(),
        json.dumps({"ts": 1.7e9}).encode(),
        json.dumps(42).encode(),
        json.dumps([]).encode(),
        b'{"ts": 1.7e9, "value": NaN}',
        b'{"ts": 1700000000, "value": ' + b"9" * 400 + b"}",
        b"[" * 50_000,
        png[: len(png) // 2],  # truncated PNG
        bytes(broken_crc),
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 10,
        jpeg[:40] + b"\xff\xd9",  # JPEG cut short, with an end marker glued on
        b"\xff\xd8\xff\xe0 truncated jpeg",
    ]


def test_garbled_payloads_dead_lettered_valid_ones_stored(
    mosquitto: MosquittoBroker, tmp_path: Path, n_garbage: int = 10_000, n_valid: int = 3000
) -> None:
    max_payload = 16 * 1024
    kinds = garbage_kinds(max_payload)
    outbox = Outbox(tmp_path)
    ing = MqttIngestor(
        MqttSettings(port=mosquitto.port, max_payload_bytes=max_payload),
        outbox,
        client_id="edge-garbage",
    )
    ing.apply_policy(Policy(subscriptions=[Subscription(topic="plant/#")]))
    ing.start()
    pub = publisher(mosquitto.port)
    frames = [_png(24), _jpeg(24)]
    valid = [reading(i) for i in range(n_valid)]
    mixed = [kinds[i % len(kinds)] for i in range(n_garbage)] + valid + frames
    random.Random(7).shuffle(mixed)
    try:
        assert ing.subscribed.wait(10)
        publish_all(pub, mixed)
        wait_until(
            lambda: ing.stored + ing.dead_lettered >= len(mixed), 120, "every message handled"
        )
        assert ing.connected  # the ingestor is alive and still connected
        # ...and still ingests after all that.
        publish_all(pub, [reading(n_valid)])
        wait_until(lambda: ing.stored == n_valid + len(frames) + 1, 10, "a reading after garbage")
    finally:
        ing.stop()
        pub.loop_stop()
    stats = outbox.stats()
    assert stats.dead_letters == n_garbage
    assert ing.dead_lettered == n_garbage
    assert set(stored_ids(tmp_path)) == set(range(n_valid + 1))
    kinds_stored = Counter(r.payload[:4] for r in outbox.read_batch(0, 100_000))
    assert kinds_stored[frames[0][:4]] == 1 and kinds_stored[frames[1][:4]] == 1
    reasons = " | ".join(r for _, r, _ in outbox.dead_letters(10_000))
    for expected in ("not JSON", "exceeds", "broken PNG", "broken JPEG", "finite", "empty"):
        assert expected in reasons, f"no dead letter says {expected!r}"
    metric = ing.metrics.messages.labels("dead_letter")._value.get()
    assert metric == n_garbage


def test_an_unreachable_broker_is_logged_rate_limited_and_counted_in_health(
    tmp_path: Path,
) -> None:
    port = free_port()  # nothing listens there
    outbox = Outbox(tmp_path)
    ing = MqttIngestor(MqttSettings(port=port), outbox, client_id="edge-nobroker")
    with structlog.testing.capture_logs() as logs:
        ing.start()
        try:
            wait_until(lambda: ing.health().connect_failures >= 2, 20, "two failed connects")
        finally:
            ing.stop()
    health = ing.health()
    assert not health.connected and health.connect_failures >= 2
    lines = [e for e in logs if e["event"] == "mqtt broker unreachable; retrying"]
    assert len(lines) == 1 and lines[0]["broker"] == f"127.0.0.1:{port}"
    outbox.close()
