"""End to end: MQTT readings and camera frames through an edge process into the cloud, with faults.

Real Mosquitto, real cloud and edge processes, a real INT8 ONNX classifier pushed and assigned.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fieldline.cli.harness.classifier import make_frame, train_classifier
from fieldline.cli.harness.mosquitto import MosquittoBroker
from fieldline.cli.harness.tcp_proxy import TcpProxy
from fieldline.shared.health import NodeHealth
from tests.e2e.conftest import EDGE_ENV, Fleet, edge_status
from tests.support.polling import wait_until

READINGS = "plant1/line-a/sensor/temp"
FRAMES = "plant1/line-a/camera/frames"
VERDICTS = "plant1/line-a/verdicts"
CUT_S = 20.0  # how long the tunnel stays cut
CUT_READINGS = 5000


def policy(trained_rule: dict) -> dict:
    return {
        "name": "line-a",
        "subscriptions": [{"topic": "plant1/+/sensor/#", "kind": "telemetry"}],
        "inspections": [trained_rule],
        "sync_interval_s": 0.5,
    }


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return train_classifier(tmp_path_factory.mktemp("clf"), seconds_budget=1.5)


class Line:
    """Publishes readings with unique ids and frames; listens to verdicts."""

    def __init__(self, port: int):
        self.verdicts: list[dict] = []
        self.pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.pub.max_inflight_messages_set(1000)
        self.pub.connect("127.0.0.1", port)
        self.pub.loop_start()
        self.sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.sub.on_message = lambda c, u, m: self.verdicts.append(json.loads(m.payload))
        self.sub.connect("127.0.0.1", port)
        self.sub.subscribe(VERDICTS, qos=1)
        self.sub.loop_start()

    def readings(self, start: int, n: int, pace_s: float = 0.0) -> None:
        infos = []
        for i in range(start, start + n):
            body = json.dumps({"ts": time.time(), "value": i * 0.1, "id": i})
            infos.append(self.pub.publish(READINGS, body, qos=1))
            if pace_s:
                time.sleep(pace_s)
        for info in infos:
            info.wait_for_publish(60)

    def frames(self, n: int, seed: int = 0) -> int:
        rng = np.random.default_rng(seed)
        defects = 0
        for k in range(n):
            defective = k % 4 == 0
            defects += defective
            self.pub.publish(FRAMES, make_frame(defective, rng), qos=1).wait_for_publish(30)
        return defects

    def close(self) -> None:
        for c in (self.pub, self.sub):
            c.loop_stop()
            c.disconnect()


def cloud_records(fleet: Fleet, node_id: str, kind: str) -> list[dict]:
    out: list[dict] = []
    cursor = None
    with fleet.admin() as admin:
        while True:
            page = admin.records(node=node_id, kind=kind, limit=1000, cursor=cursor)
            out.extend(page["records"])
            cursor = page["next_cursor"]
            if not cursor:
                return out


def reading_ids(records: list[dict]) -> list[int]:
    return [
        r["payload"]["id"]
        for r in records
        if isinstance(r["payload"], dict) and "id" in r["payload"]
    ]


@pytest.fixture
def line_edge(
    fleet: Fleet, mosquitto: MosquittoBroker, classifier
) -> Iterator[tuple[Fleet, str, Line]]:  # type: ignore[no-untyped-def]
    """A cloud with the INT8 classifier assigned and a line-a policy, and one enrolled edge."""
    with fleet.admin() as admin:
        admin.push_artifact(
            classifier.onnx_path, name="classifier", version="1.0-fp32", kind="onnx"
        )
        cal = admin.push_artifact(
            classifier.calibration_path, name="classifier-calibration", version="1.0", kind="file"
        )
        admin.quantize(
            "classifier",
            "1.0-fp32",
            target_version="1.0",
            calibration=f"{cal['name']}@{cal['version']}",
        )
        admin.assign("classifier@1.0", "line=a")
        rule = classifier.rule(
            name="parts", topic=FRAMES, model="classifier", result_topic=VERDICTS
        )
        admin.apply_policy(policy(rule.model_dump(mode="json")), "line=a")
    EDGE_ENV["FIELDLINE_MQTT__PORT"] = str(mosquitto.port)
    try:
        fleet.enroll_edge("edge-a", {"line": "a"})
        wait_until(
            lambda: edge_status(fleet.root / "edge-a")["active"] == {"classifier": "1.0"},
            60,
            "the classifier to be installed",
        )
        node_id = edge_status(fleet.root / "edge-a")["node_id"]
        line = Line(mosquitto.port)
        time.sleep(1.0)  # the edge subscribes once its policy is applied
        yield fleet, node_id, line
        line.close()
    finally:
        EDGE_ENV.pop("FIELDLINE_MQTT__PORT", None)


def test_readings_and_verdicts_reach_the_cloud(line_edge) -> None:  # type: ignore[no-untyped-def]
    fleet, node_id, line = line_edge
    line.readings(0, 500)
    defects = line.frames(40)
    wait_until(lambda: len(line.verdicts) >= 40, 60, "40 verdicts on the result topic")
    assert sum(v["defect"] for v in line.verdicts) == defects
    wait_until(lambda: len(cloud_records(fleet, node_id, "verdict")) >= 40, 60, "verdicts synced")
    wait_until(
        lambda: len(reading_ids(cloud_records(fleet, node_id, "telemetry"))) >= 500,
        60,
        "readings synced",
    )
    ids = reading_ids(cloud_records(fleet, node_id, "telemetry"))
    assert sorted(ids) == list(range(500))
    verdicts = cloud_records(fleet, node_id, "verdict")
    assert len(verdicts) == 40
    assert {v["topic"] for v in verdicts} == {VERDICTS}
    # The heartbeat's health as the cloud serves it parses as the edge's NodeHealth.
    health = NodeHealth.model_validate(fleet.node_of("edge-a")["health"])
    assert health.dataplane is not None and health.tunnel is not None and health.tunnel.connected
    assert health.dataplane.inspection["classifier"].loaded
    assert health.dataplane.verdicts_dropped == 0 and health.dataplane.mqtt.refused == 0
    assert not {"tunnel", "dataplane"} & set(health.part_errors) and health.reported_at is not None


@pytest.mark.parametrize("total", [3000, pytest.param(20_000, marks=pytest.mark.slow)])
def test_kill9_mid_stream_loses_and_duplicates_nothing(line_edge, total: int) -> None:  # type: ignore[no-untyped-def]
    fleet, node_id, line = line_edge
    publisher = threading.Thread(target=line.readings, args=(0, total, 0.0005))
    publisher.start()
    time.sleep(random.uniform(0.3, 1.2))
    fleet.edges["edge-a"].kill()
    time.sleep(0.5)
    fleet.start_edge("edge-a")
    publisher.join(120)
    wait_until(
        lambda: len(reading_ids(cloud_records(fleet, node_id, "telemetry"))) >= total,
        90,
        "every reading in the cloud",
    )
    ids = reading_ids(cloud_records(fleet, node_id, "telemetry"))
    assert len(ids) == total, f"{len(ids) - len(set(ids))} duplicates"
    assert sorted(ids) == list(range(total))


def test_tunnel_cut_keeps_inspecting_then_syncs_everything(
    fleet: Fleet,
    mosquitto: MosquittoBroker,
    classifier,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    proxy = TcpProxy(("127.0.0.1", fleet.ports["grpc"])).start()
    real_grpc = fleet.ports["grpc"]
    fleet.ports["grpc"] = proxy.port  # edges dial the proxy
    try:
        with fleet.admin() as admin:
            admin.push_artifact(classifier.onnx_path, name="classifier", version="1.0", kind="onnx")
            admin.assign("classifier@1.0", "line=a")
            rule = classifier.rule(
                name="parts", topic=FRAMES, model="classifier", result_topic=VERDICTS
            )
            admin.apply_policy(policy(rule.model_dump(mode="json")), "line=a")
        EDGE_ENV["FIELDLINE_MQTT__PORT"] = str(mosquitto.port)
        fleet.enroll_edge("edge-a", {"line": "a"})
        wait_until(
            lambda: edge_status(fleet.root / "edge-a")["active"] == {"classifier": "1.0"},
            60,
            "the classifier",
        )
        node_id = edge_status(fleet.root / "edge-a")["node_id"]
        line = Line(mosquitto.port)
        time.sleep(1.0)
        proxy.cut()
        cut_at = time.monotonic()
        line.readings(0, CUT_READINGS)
        line.frames(20)
        wait_until(lambda: len(line.verdicts) >= 20, 30, "verdicts during the cut")
        assert time.monotonic() - cut_at < 20  # they came while the tunnel was down
        wait_until(lambda: not fleet.node_of("edge-a")["online"], 15, "the cloud to see the cut")
        time.sleep(max(0.0, CUT_S - (time.monotonic() - cut_at)))
        proxy.restore()
        wait_until(
            lambda: len(reading_ids(cloud_records(fleet, node_id, "telemetry"))) >= CUT_READINGS,
            60,
            "readings after the cut",
        )
        wait_until(lambda: len(cloud_records(fleet, node_id, "verdict")) >= 20, 60, "verdicts")
        ids = reading_ids(cloud_records(fleet, node_id, "telemetry"))
        assert sorted(ids) == list(range(CUT_READINGS))
        assert len(cloud_records(fleet, node_id, "verdict")) == 20
        line.close()
    finally:
        EDGE_ENV.pop("FIELDLINE_MQTT__PORT", None)
        fleet.ports["grpc"] = real_grpc
        proxy.stop()


def test_offline_reboot_inspects_within_10s(line_edge) -> None:  # type: ignore[no-untyped-def]
    fleet, _, line = line_edge
    assert fleet.cloud is not None
    fleet.cloud.stop()
    fleet.edges["edge-a"].stop()
    started = time.monotonic()
    fleet.start_edge("edge-a")
    before = len(line.verdicts)

    def inspected() -> bool:
        line.frames(1, seed=int(time.monotonic() * 1000) % 10_000)
        return len(line.verdicts) > before

    wait_until(inspected, 20, "an inspection after the offline restart", poll_s=0.5)
    assert time.monotonic() - started < 10
