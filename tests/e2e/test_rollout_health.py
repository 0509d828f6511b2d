"""End to end: what an edge reports about its models, and what it and the gate do about it.

A version that fails to load is rolled back by the edge itself when the policy allows it; a
version that loads but fails its requests breaks the rollout's error gate (real Mosquitto,
real frames).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fieldline.cli.admin_client import AdminClient
from fieldline.cli.harness.mosquitto import MosquittoBroker
from tests.e2e.conftest import EDGE_ENV, Fleet, edge_status, wait_until
from tests.support.onnx_models import broken_model, inspection_policy, tiny_classifier

FRAMES = "plant1/line-a/camera/frames"


def _push(admin: AdminClient, tmp: Path, version: str, **kw: object) -> dict:
    path = tmp / f"detector-{version}.onnx"
    if kw.pop("broken", False):
        broken_model(path)
    else:
        tiny_classifier(path, seed=len(version), **kw)  # type: ignore[arg-type]
    return admin.push_artifact(path, name="detector", version=version, kind="onnx")


def _model(admin: AdminClient, node_id: str) -> dict:
    return (admin.get_node(node_id).get("health") or {}).get("models", {}).get("detector", {})


def _one_edge(fleet: Fleet, tmp: Path, *, local_rollback: bool) -> str:
    with fleet.admin() as admin:
        _push(admin, tmp, "1.0")
        admin.apply_policy(inspection_policy("detector", local_rollback=local_rollback), "line=a")
        admin.assign("detector@1.0", "line=a")
    fleet.enroll_edge("edge-a", {"line": "a"})
    node_id: str = wait_until(lambda: edge_status(fleet.root / "edge-a")["node_id"], 60, "enroll")
    with fleet.admin() as admin:
        wait_until(
            lambda: (
                _model(admin, node_id).get("version") == "1.0"
                and _model(admin, node_id).get("loaded")
            ),
            60,
            "1.0 to load",
        )
    return node_id


def test_edge_rolls_back_a_model_that_fails_to_load_by_itself(fleet: Fleet, tmp_path: Path) -> None:
    node_id = _one_edge(fleet, tmp_path, local_rollback=True)
    with fleet.admin() as admin:
        _push(admin, tmp_path, "3.0", broken=True)
        admin.assign("detector@3.0", "line=a")  # no rollout: only the edge can save itself

        def rolled_back() -> dict | None:
            node = admin.get_node(node_id)
            marks = (node.get("health") or {}).get("local_rollbacks", [])
            return node if node["active"] == {"detector": "1.0"} and marks else None

        node = wait_until(rolled_back, 60, "the edge to roll back by itself")
        mark = node["health"]["local_rollbacks"][0]
        assert (mark["from_version"], mark["to_version"]) == ("3.0", "1.0")
        assert "failed to load" in mark["reason"]
        assert any("rolled back on this node" in e for e in node["errors"]), node["errors"]
        assert node["applied_generation"] < node["desired_generation"]
        model = _model(admin, node_id)
        assert model["version"] == "1.0" and model["loaded"] is True
        assert edge_status(fleet.root / "edge-a")["active"] == {"detector": "1.0"}
        # It stays there (no flapping back to 3.0), and a new version clears the mark.
        time.sleep(2)
        assert admin.get_node(node_id)["active"] == {"detector": "1.0"}
        _push(admin, tmp_path, "2.0")
        admin.assign("detector@2.0", "line=a")
        wait_until(
            lambda: (
                admin.get_node(node_id)["active"] == {"detector": "2.0"}
                and not admin.get_node(node_id)["health"].get("local_rollbacks")
            ),
            60,
            "2.0 to be active and the mark gone",
        )


class Frames:
    """Publishes flat JSON frames of 3x8x8 values at a steady pace until stopped."""

    def __init__(self, port: int, per_s: float = 40.0):
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.period = 1.0 / per_s
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        rng = np.random.default_rng(0)
        while not self.stopping.wait(self.period):
            body = json.dumps(rng.random(3 * 8 * 8).round(3).tolist())
            self.client.publish(FRAMES, body, qos=1)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def frames_edge(fleet: Fleet, tmp_path: Path, mosquitto: MosquittoBroker) -> Iterator[str]:
    EDGE_ENV["FIELDLINE_MQTT__PORT"] = str(mosquitto.port)
    try:
        node_id = _one_edge(fleet, tmp_path, local_rollback=False)
    finally:
        EDGE_ENV.pop("FIELDLINE_MQTT__PORT", None)
    frames = Frames(mosquitto.port)
    try:
        yield node_id
    finally:
        frames.close()


def test_a_model_that_fails_its_requests_breaks_the_error_gate(
    fleet: Fleet, tmp_path: Path, frames_edge: str
) -> None:
    node_id = frames_edge
    with fleet.admin() as admin:
        wait_until(
            lambda: _model(admin, node_id).get("window_requests", 0) >= 20,
            60,
            "1.0 to serve frames",
        )
        assert _model(admin, node_id)["error_rate"] == 0.0
        # 2.0 loads, but expects 3x16x16 inputs: every 3x8x8 frame is an error.
        _push(admin, tmp_path, "2.0", side=16)
        r = admin.create_rollout(
            {
                "artifact": "detector@2.0",
                "selector": "line=a",
                "waves": "100%",
                "gate": {"soak_s": 30, "max_error_rate": 0.05, "min_requests": 10},
                "on_failure": "rollback",
            }
        )

        def ended() -> dict | None:
            rr = admin.get_rollout(r["id"])
            return rr if rr["state"] in ("rolled_back", "succeeded") else None

        done = wait_until(ended, 90, "the rollout to end")
        assert done["state"] == "rolled_back", done["reason"]
        assert "error rate" in done["reason"] and "exceeds 5.0%" in done["reason"], done["reason"]
        wait_until(
            lambda: (
                _model(admin, node_id).get("version") == "1.0"
                and admin.get_node(node_id)["active"] == {"detector": "1.0"}
            ),
            60,
            "the node to be back on 1.0",
        )
        wait_until(lambda: _model(admin, node_id).get("window_requests", 0) >= 10, 30, "serving")
        assert _model(admin, node_id)["error_rate"] == 0.0
