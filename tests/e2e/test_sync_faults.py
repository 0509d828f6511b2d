"""End to end: sync that never loses and never stalls, with real cloud and edge processes, real
Mosquitto and real SQLite files: poison records, a recreated outbox.db, cloud kill -9."""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from PIL import Image

from fieldline.cli.harness.mosquitto import MosquittoBroker
from fieldline.cli.harness.processes import fieldline_cmd
from fieldline.shared.health import NodeHealth
from fieldline.shared.limits import MAX_RECORD_PAYLOAD_BYTES, MIB
from tests.e2e.conftest import EDGE_ENV, Fleet, edge_status
from tests.support.polling import wait_until

READINGS = "plant1/line-a/sensor/temp"
FRAMES = "plant1/line-a/camera/frames"
POLICY = {
    "name": "sync",
    "subscriptions": [{"topic": "plant1/#", "kind": "telemetry"}],
    "sync_interval_s": 0.5,
}


class Publisher:
    """QoS 1 readings with unique ids, and frames, into the plant broker."""

    def __init__(self, port: int):
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def readings(self, start: int, n: int) -> None:
        infos = [
            self.client.publish(READINGS, json.dumps({"value": i * 0.1, "id": i}), qos=1)
            for i in range(start, start + n)
        ]
        for info in infos:
            info.wait_for_publish(120)

    def frame(self, payload: bytes) -> None:
        self.client.publish(FRAMES, payload, qos=1).wait_for_publish(60)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def noise_png(nbytes: int) -> bytes:
    """A PNG of random pixels (incompressible) of about nbytes."""
    side = int((nbytes / 3) ** 0.5) + 1
    pixels = np.random.default_rng(7).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def cloud_pages(fleet: Fleet, node_id: str, **filters: object) -> list[dict]:
    out: list[dict] = []
    cursor = None
    with fleet.admin() as admin:
        while True:
            page = admin.records(node=node_id, limit=1000, cursor=cursor, **filters)
            out.extend(page["records"])
            cursor = page["next_cursor"]
            if not cursor:
                return out


def reading_ids(fleet: Fleet, node_id: str) -> list[int]:
    return [
        r["payload"]["id"]
        for r in cloud_pages(fleet, node_id, topic=READINGS)
        if isinstance(r["payload"], dict)
    ]


def records_cli(fleet: Fleet, *args: str) -> dict:
    out = subprocess.run(
        fieldline_cmd("records", *args, "--url", fleet.url, "--key", fleet.key, "--json"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


@pytest.fixture
def plant(fleet: Fleet, mosquitto: MosquittoBroker) -> Iterator[tuple[Fleet, str, Publisher]]:
    """A cloud with a plain telemetry policy and one enrolled edge subscribed to the broker."""
    with fleet.admin() as admin:
        admin.apply_policy(POLICY, "line=a")
    EDGE_ENV["FIELDLINE_MQTT__PORT"] = str(mosquitto.port)
    try:
        fleet.enroll_edge("edge-a", {"line": "a"})
        wait_until(lambda: fleet.node_of("edge-a")["online"], 60, "the edge online")
        node_id = edge_status(fleet.root / "edge-a")["node_id"]
        pub = Publisher(mosquitto.port)
        pub.readings(1_000_000, 1)  # a first reading: the subscription is in place
        wait_until(lambda: cloud_pages(fleet, node_id), 30, "the first reading synced")
        yield fleet, node_id, pub
        pub.close()
    finally:
        EDGE_ENV.pop("FIELDLINE_MQTT__PORT", None)


def test_a_poison_record_never_stalls_sync(plant) -> None:  # type: ignore[no-untyped-def]
    fleet, node_id, pub = plant
    started = time.monotonic()
    pub.readings(0, 5000)
    frame = noise_png(2 * MIB)  # a camera frame within the shared record bound: stored, synced
    pub.frame(frame)
    pub.frame(b"\x89PNG" + b"x" * (MAX_RECORD_PAYLOAD_BYTES + 1))  # over it: refused at ingest
    pub.readings(5000, 5000)
    wait_until(lambda: len(reading_ids(fleet, node_id)) >= 10_001, 30, "every reading in the cloud")
    assert time.monotonic() - started < 30
    ids = [i for i in reading_ids(fleet, node_id) if i != 1_000_000]
    assert len(ids) == 10_000 and sorted(ids) == list(range(10_000))  # each exactly once
    frames = cloud_pages(fleet, node_id, topic=FRAMES)
    assert len(frames) == 1 and frames[0]["payload_encoding"] == "base64"
    # The oversize frame is the edge's dead letter, with its reason; the cloud never saw it.
    wait_until(
        lambda: NodeHealth.model_validate(fleet.node_of("edge-a")["health"]).dataplane.mqtt.refused,
        15,
        "the refusal in the edge's health",
    )
    conn = sqlite3.connect(fleet.root / "edge-a" / "outbox.db")
    (reason,) = conn.execute("SELECT reason FROM dead_letters").fetchone()
    conn.close()
    assert f"exceeds the record limit of {MAX_RECORD_PAYLOAD_BYTES} bytes" in reason

    # A row the cloud refuses (as an older edge version stored it): the cloud's dead letter,
    # and the records around it are stored and acked.
    fleet.edges["edge-a"].stop()
    conn = sqlite3.connect(fleet.root / "edge-a" / "outbox.db")
    conn.execute(
        "INSERT INTO records (kind, topic, ts_ms, payload, size) VALUES "
        "('alarm', 'plant1/line-a/alarm', 1, x'7b7d', 2)"
    )
    conn.commit()
    conn.close()
    fleet.start_edge("edge-a")
    pub.readings(10_000, 100)
    wait_until(lambda: len(reading_ids(fleet, node_id)) >= 10_101, 30, "readings after it")
    dead = records_cli(fleet, "--dead", "--node", node_id)["dead"]
    assert [(d["kind"], d["size"]) for d in dead] == [("alarm", 2)]
    assert "kind 'alarm' is not one of" in dead[0]["reason"]
    assert dead[0]["seq"] > 10_000


def test_a_deleted_outbox_is_a_new_sequence_space(plant) -> None:  # type: ignore[no-untyped-def]
    fleet, node_id, pub = plant
    pub.readings(0, 200)
    wait_until(lambda: len(reading_ids(fleet, node_id)) >= 201, 30, "the first readings")
    fleet.edges["edge-a"].stop()
    for suffix in ("", "-wal", "-shm"):
        (fleet.root / "edge-a" / f"outbox.db{suffix}").unlink(missing_ok=True)
    fleet.start_edge("edge-a")
    pub.readings(200, 200)  # sequences 1.. again, in a new epoch
    wait_until(lambda: len(reading_ids(fleet, node_id)) >= 401, 30, "readings after restart")
    ids = [i for i in reading_ids(fleet, node_id) if i != 1_000_000]
    assert sorted(ids) == list(range(400))
    epochs = {r["epoch"] for r in cloud_pages(fleet, node_id)}
    assert epochs == {1, 2}


def test_cloud_kill9_with_batches_in_flight_resumes_at_once(plant) -> None:  # type: ignore[no-untyped-def]
    fleet, node_id, pub = plant
    assert fleet.cloud is not None
    fleet.cloud.kill()
    pub.readings(0, 20_000)  # a backlog while the cloud is away
    wait_until(
        lambda: (
            edge_status(fleet.root / "edge-a")["health"]["dataplane"]["outbox"]["unsynced"]
            >= 20_000
        ),
        60,
        "the backlog in the outbox",
    )
    fleet.start_cloud(same_ports=True)
    # Kill it again as soon as the drain is under way: batches are in flight, not acked.
    wait_until(lambda: len(cloud_pages(fleet, node_id)) > 1, 30, "the drain under way", 0.02)
    fleet.cloud.kill()
    fleet.start_cloud(same_ports=True)
    back = time.monotonic()
    wait_until(lambda: len(reading_ids(fleet, node_id)) >= 20_001, 30, "the whole backlog")
    # Reconnect (backoff up to 1 s) and the whole drain, far within the 30 s ack timeout.
    assert time.monotonic() - back < 10
    ids = [i for i in reading_ids(fleet, node_id) if i != 1_000_000]
    assert len(ids) == 20_000 and sorted(ids) == list(range(20_000))


@pytest.mark.slow
def test_cloud_kill9_three_times_during_a_drain_exactly_once(plant) -> None:  # type: ignore[no-untyped-def]
    fleet, node_id, pub = plant
    publisher = threading.Thread(target=pub.readings, args=(0, 20_000))
    publisher.start()
    for _ in range(3):
        time.sleep(1.0)
        assert fleet.cloud is not None
        fleet.cloud.kill()
        time.sleep(0.5)
        fleet.start_cloud(same_ports=True)
    publisher.join(120)
    wait_until(lambda: len(reading_ids(fleet, node_id)) >= 20_001, 60, "every reading")
    ids = [i for i in reading_ids(fleet, node_id) if i != 1_000_000]
    assert len(ids) == 20_000, f"{len(ids) - len(set(ids))} duplicates"
    assert sorted(ids) == list(range(20_000))


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        check=True,
        capture_output=True,
    )


@pytest.mark.slow
def test_a_full_disk_holds_acks_and_resumes_by_itself_when_space_returns(
    fleet: Fleet, mosquitto: MosquittoBroker
) -> None:
    data = fleet.root / "edge-a"
    try:
        _mount_tmpfs(data, "24m")
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"needs root to mount a tmpfs: {exc}")
    total = 40_000
    try:
        with fleet.admin() as admin:
            admin.apply_policy(POLICY, "line=a")
        EDGE_ENV["FIELDLINE_MQTT__PORT"] = str(mosquitto.port)
        fleet.enroll_edge("edge-a", {"line": "a"})
        wait_until(lambda: fleet.node_of("edge-a")["online"], 60, "the edge online")
        node_id = edge_status(data)["node_id"]
        assert fleet.cloud is not None
        fleet.cloud.kill()  # nothing syncs: the backlog fills the disk
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        pub.max_inflight_messages_set(1000)
        pub.connect("127.0.0.1", mosquitto.port)
        pub.loop_start()
        pad = "p" * 900  # about 1 KB a reading: 40 MB for a 24 MiB disk
        infos = [
            pub.publish(READINGS, json.dumps({"id": i, "value": i * 0.1, "pad": pad}), qos=1)
            for i in range(total)
        ]
        for info in infos:
            info.wait_for_publish(120)  # the broker has them all (it holds what the edge won't)
        log = fleet.root / "edge-a.log"
        wait_until(lambda: "disk full; holding acks" in log.read_text(), 60, "the disk full")
        time.sleep(5)  # full for a while: the edge stays up and logs it once
        assert fleet.edges["edge-a"].alive()
        text = log.read_text()
        assert text.count("disk full; holding acks") == 1
        assert "Traceback" not in text, text[-3000:]
        subprocess.run(["mount", "-o", "remount,size=256m", str(data)], check=True)
        wait_until(lambda: "acks resumed" in log.read_text(), 30, "ingestion to resume")
        fleet.start_cloud(same_ports=True)
        grown = time.monotonic()
        wait_until(
            lambda: len(reading_ids(fleet, node_id)) >= total, 60, "every reading in the cloud"
        )
        assert time.monotonic() - grown < 60
        ids = reading_ids(fleet, node_id)
        assert len(ids) == total and sorted(ids) == list(range(total))
        pub.loop_stop()
        pub.disconnect()
    finally:
        EDGE_ENV.pop("FIELDLINE_MQTT__PORT", None)
        if "edge-a" in fleet.edges:
            fleet.edges["edge-a"].stop()
        subprocess.run(["umount", "-l", str(data)], check=False)
