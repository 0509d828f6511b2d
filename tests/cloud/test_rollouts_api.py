"""/v1/rollouts against a real cloud process: roles, validation, conflicts, pause/resume/abort.

Nodes are enrolled over real gRPC but never connect, so rollouts here wait on offline nodes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from fieldline.cli.harness.processes import ProcessStack, start_cloud
from tests.cloud.test_api import Cloud, enroll


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    root = tmp_path_factory.mktemp("cloud-rollouts")
    with ProcessStack() as stack:
        _, ports = start_cloud(stack, root / "cloud", env={"FIELDLINE_ROLLOUT_TICK_S": "0.2"})
        key = (root / "cloud" / "admin.key").read_text().strip()
        with httpx.Client(base_url=f"http://127.0.0.1:{ports['http']}", timeout=30) as http:
            c = Cloud(root / "cloud", http, f"127.0.0.1:{ports['grpc']}", key)
            for _ in range(3):
                enroll(c.grpc_target, c.token("site=s1"))
            yield c


def _artifact(cloud: Cloud, name: str, version: str = "1") -> None:
    r = cloud.upload(f"{name}{version}".encode() * 100, name, version)
    assert r.status_code == 201, r.text


def _create(cloud: Cloud, key: str, **body: object) -> httpx.Response:
    spec = {"selector": "site=s1", "waves": "1,100%", **body}
    return cloud.http.post("/v1/rollouts", json=spec, headers=cloud.headers(key))


def test_viewer_cannot_create_pause_resume_or_abort_but_operator_can(cloud: Cloud) -> None:
    viewer, operator = cloud.key("viewer"), cloud.key("operator")
    _artifact(cloud, "perm")
    r = _create(cloud, viewer, artifact="perm@1")
    assert r.status_code == 403 and "operator" in r.json()["detail"]
    r = _create(cloud, operator, artifact="perm@1")
    assert r.status_code == 201, r.text
    rollout = r.json()
    assert rollout["state"] == "pending"
    assert [w["size"] for w in rollout["waves"]] == [1, 2]
    rid = rollout["id"]
    for action in ("pause", "resume", "abort"):
        r = cloud.http.post(f"/v1/rollouts/{rid}/{action}", headers=cloud.headers(viewer))
        assert r.status_code == 403, action
    assert cloud.http.get(f"/v1/rollouts/{rid}", headers=cloud.headers(viewer)).status_code == 200
    assert cloud.http.get("/v1/rollouts", headers=cloud.headers(viewer)).status_code == 200

    r = cloud.http.post(
        f"/v1/rollouts/{rid}/pause", json={"reason": "lunch"}, headers=cloud.headers(operator)
    )
    assert r.status_code == 200 and r.json()["state"] == "paused", r.text
    r = cloud.http.post(f"/v1/rollouts/{rid}/pause", headers=cloud.headers(operator))
    assert r.status_code == 409  # already paused
    r = cloud.http.post(f"/v1/rollouts/{rid}/resume", headers=cloud.headers(operator))
    assert r.status_code == 200 and r.json()["state"] in ("pending", "running"), r.text
    r = cloud.http.post(f"/v1/rollouts/{rid}/abort", headers=cloud.headers(operator))
    assert r.status_code == 200 and r.json()["state"] == "aborted", r.text
    r = cloud.http.post(f"/v1/rollouts/{rid}/resume", headers=cloud.headers(operator))
    assert r.status_code == 409
    body = cloud.http.get(f"/v1/rollouts/{rid}", headers=cloud.headers()).json()
    history = [(e["state"], e["actor"]) for e in body["history"]]
    states = [s for s, _ in history]
    assert states[0] == "pending" and "paused" in states and states[-1] == "aborted"
    assert any("operator" in actor for _, actor in history)


def test_running_rollout_waits_for_offline_nodes_with_the_reason_shown(cloud: Cloud) -> None:
    _artifact(cloud, "wait")
    r = _create(cloud, cloud.admin_key, artifact="wait@1", offline_timeout_s=3600)
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        body = cloud.http.get(f"/v1/rollouts/{rid}", headers=cloud.headers()).json()
        wave1 = [n for n in body["nodes"] if n["wave"] == 1]
        if body["state"] == "running" and "offline" in wave1[0]["reason"]:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"rollout did not wait on the offline node: {body}")
    assert wave1[0]["state"] == "applying"
    assert all(n["state"] == "waiting" for n in body["nodes"] if n["wave"] == 2)
    r = cloud.http.post(f"/v1/rollouts/{rid}/abort", headers=cloud.headers())
    assert r.status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"artifact": "nope@1"}, 404, "not found"),
        ({}, 422, "artifact, a policy"),
        ({"artifact": "perm@1", "waves": "1,0%"}, 422, "percentage"),
        ({"artifact": "perm@1", "waves": "a,b"}, 422, "count"),
        ({"artifact": "perm@1", "selector": "site=nowhere"}, 422, "matches no node"),
        ({"artifact": "perm"}, 422, "NAME@VERSION"),
        ({"artifact": "perm@1", "gate": {"max_error_rate": 2}}, 422, "max_error_rate"),
        ({"artifact": "perm@1", "on_failure": "rollback", "auto_rollback": False}, 422, "auto"),
        ({"policy": {"name": "p", "nonsense": 1}}, 422, "nonsense"),
    ],
)
def test_bad_rollouts_are_refused_with_a_reason(
    cloud: Cloud, body: dict[str, object], status: int, says: str
) -> None:
    r = _create(cloud, cloud.admin_key, **body)
    assert r.status_code == status, r.text
    assert says in r.text


def test_a_second_rollout_of_the_same_artifact_is_409_until_the_first_ends(cloud: Cloud) -> None:
    _artifact(cloud, "dup", "1")
    _artifact(cloud, "dup", "2")
    first = _create(cloud, cloud.admin_key, artifact="dup@1")
    assert first.status_code == 201
    second = _create(cloud, cloud.admin_key, artifact="dup@2")
    assert second.status_code == 409 and first.json()["id"] in second.json()["detail"]
    cloud.http.post(f"/v1/rollouts/{first.json()['id']}/abort", headers=cloud.headers())
    third = _create(cloud, cloud.admin_key, artifact="dup@2")
    assert third.status_code == 201
    cloud.http.post(f"/v1/rollouts/{third.json()['id']}/abort", headers=cloud.headers())
    assert cloud.http.get("/v1/rollouts/ro_nope", headers=cloud.headers()).status_code == 404
    listed = cloud.http.get("/v1/rollouts?state=aborted", headers=cloud.headers()).json()
    assert {first.json()["id"], third.json()["id"]} <= {r["id"] for r in listed}
