"""End to end: staged rollouts over real edge processes: waves, gates, rollback, restarts, offline.

The rollout controller ticks every 0.3 s here (FIELDLINE_ROLLOUT_TICK_S in conftest.CLOUD_ENV)
and the edges beat every second, so gates of a second or two soak for real.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from fieldline.cli.admin_client import AdminClient
from fieldline.cli.harness.processes import fieldline_cmd
from tests.e2e.conftest import Fleet, edge_status, wait_until
from tests.support.onnx_models import broken_model, inspection_policy, tiny_classifier

ENROLL_S = 60
ROLLOUT_S = 120
TERMINAL = ("succeeded", "rolled_back", "aborted")


def _enroll(fleet: Fleet, names: list[str], labels: dict[str, str]) -> dict[str, str]:
    """Start edges in parallel; returns edge name -> node id once all are online."""
    with fleet.admin() as admin:
        tokens = [admin.create_token(labels)["token"] for _ in names]
    for name, token in zip(names, tokens, strict=True):
        fleet.start_edge(name, token)

    def all_online() -> bool:
        with fleet.admin() as admin:
            nodes = admin.list_nodes()
        return sum(n["online"] for n in nodes) >= len(fleet.edges)

    wait_until(all_online, ENROLL_S, f"{len(names)} edges to enroll and connect")
    return {name: edge_status(fleet.root / name)["node_id"] for name in names}


def _push_model(admin: AdminClient, tmp: Path, version: str, *, broken: bool = False) -> dict:
    path = tmp / f"detector-{version}.onnx"
    if broken:
        broken_model(path)
    else:
        tiny_classifier(path, seed=int(float(version)))
    return admin.push_artifact(path, name="detector", version=version, kind="onnx")


def _node(admin: AdminClient, node_id: str) -> dict[str, Any]:
    return admin.get_node(node_id)


def _runs(admin: AdminClient, node_id: str, version: str) -> bool:
    n = _node(admin, node_id)
    model = (n.get("health") or {}).get("models", {}).get("detector", {})
    return (
        n["applied_generation"] == n["desired_generation"]
        and n.get("active", {}).get("detector") == version
        and model.get("version") == version
        and model.get("loaded") is True
    )


def _wait_state(
    admin: AdminClient, rollout_id: str, states: tuple[str, ...], timeout: float
) -> dict:
    def reached() -> dict | None:
        r = admin.get_rollout(rollout_id)
        if r["state"] in states:
            return r
        assert r["state"] not in TERMINAL, f"rollout ended {r['state']}: {r['reason']}"
        return None

    return wait_until(reached, timeout, f"rollout {rollout_id} to be {'/'.join(states)}")  # type: ignore[no-any-return]


def _baseline(fleet: Fleet, tmp: Path, node_ids: list[str], local_rollback: bool) -> None:
    """detector@1.0 assigned and served by an inspection rule on every node."""
    with fleet.admin() as admin:
        _push_model(admin, tmp, "1.0")
        admin.apply_policy(inspection_policy("detector", local_rollback=local_rollback), "line=a")
        admin.assign("detector@1.0", "line=a")
        for node_id in node_ids:
            wait_until(lambda n=node_id: _runs(admin, n, "1.0"), 60, f"{node_id} to run 1.0")


def _rollout(admin: AdminClient, version: str, waves: str, **spec: Any) -> dict:
    body = {
        "artifact": f"detector@{version}",
        "selector": "line=a",
        "waves": waves,
        "gate": {"soak_s": 1.5, "max_error_rate": 0.05, "require_loaded": True},
        **spec,
    }
    return admin.create_rollout(body)


def _cli(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fieldline_cmd(*args, "--url", fleet.url, "--key", fleet.key),
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "250", "PATH": "/usr/bin:/bin"},
    )


def test_six_edges_good_model_everywhere_bad_model_stops_at_wave_one(
    fleet: Fleet, tmp_path: Path
) -> None:
    names = [f"edge-{i}" for i in range(6)]
    ids = _enroll(fleet, names, {"line": "a"})
    node_ids = list(ids.values())
    _baseline(fleet, tmp_path, node_ids, local_rollback=False)

    with fleet.admin() as admin:
        # A good model: every wave passes its gate, all six run it, the result is assigned.
        _push_model(admin, tmp_path, "2.0")
        good = _rollout(admin, "2.0", "1,50%,100%")
        assert [w["size"] for w in good["waves"]] == [1, 2, 3]
        done = _wait_state(admin, good["id"], ("succeeded",), ROLLOUT_S)
        for node_id in node_ids:
            assert _runs(admin, node_id, "2.0"), node_id
        assert [w["state"] for w in done["waves"]] == ["passed"] * 3
        started = [e for e in done["history"] if "started" in e["reason"]]
        assert [e["wave"] for e in started] == [1, 2, 3]
        assert any(a["artifact"] == "detector@2.0" for a in admin.list_assignments())

        # A model that fails to load: wave 1 fails, its node goes back, nobody else gets it.
        sent_before = fleet.metric("fieldline_cloud_artifact_bytes_sent_total")
        bad_manifest = _push_model(admin, tmp_path, "3.0", broken=True)
        bad = _rollout(admin, "3.0", "1,50%,100%", on_failure="rollback")
        ended = _wait_state(admin, bad["id"], ("rolled_back",), ROLLOUT_S)
        assert "wave 1/3 failed" in ended["reason"], ended["reason"]
        assert "did not load" in ended["reason"], ended["reason"]
        canary = [n for n in ended["nodes"] if n["wave"] == 1]
        assert len(canary) == 1 and canary[0]["state"] == "rolled_back"
        assert canary[0]["previous"] == "2.0"
        assert all(n["state"] == "waiting" for n in ended["nodes"] if n["wave"] > 1)
        canary_id = canary[0]["node_id"]
        wait_until(lambda: _runs(admin, canary_id, "2.0"), 60, "the canary to return to 2.0")
        for node_id in node_ids:
            assert _runs(admin, node_id, "2.0"), node_id
        # Only the canary ever downloaded 3.0.
        sent = fleet.metric("fieldline_cloud_artifact_bytes_sent_total") - sent_before
        assert sent == bad_manifest["size"], (sent, bad_manifest["size"])
    canary_name = next(name for name, nid in ids.items() if nid == canary_id)
    for name in names:
        has_v3 = (tmp_path / name / "artifacts" / "detector" / "3.0").exists()
        assert has_v3 == (name == canary_name), name
        status = edge_status(tmp_path / name)
        assert status["active"] == {"detector": "2.0"}

    # The reason is in the CLI too.
    out = _cli(fleet, "rollout", "status", bad["id"])
    assert out.returncode == 0, out.stderr
    assert "rolled_back" in out.stdout and "did not load" in out.stdout, out.stdout
    listing = _cli(fleet, "rollout", "list")
    assert bad["id"] in listing.stdout and good["id"] in listing.stdout, listing.stdout
    watch = _cli(fleet, "rollout", "status", good["id"], "--watch")
    assert watch.returncode == 0, watch.stderr


def _push_file(admin: AdminClient, tmp: Path, version: str, size: int = 50_000) -> dict:
    path = tmp / f"config-{version}.bin"
    path.write_bytes(version.encode() * (size // len(version)))
    return admin.push_artifact(path, name="config", version=version, kind="file")


def _has(admin: AdminClient, node_id: str, version: str) -> bool:
    n = _node(admin, node_id)
    return (
        n["applied_generation"] == n["desired_generation"]
        and n.get("active", {}).get("config") == version
    )


def _file_baseline(fleet: Fleet, tmp: Path, node_ids: list[str]) -> None:
    with fleet.admin() as admin:
        _push_file(admin, tmp, "1.0")
        admin.assign("config@1.0", "line=a")
        for node_id in node_ids:
            wait_until(lambda n=node_id: _has(admin, n, "1.0"), 60, f"{node_id} to have 1.0")


def test_controller_restart_mid_rollout_resumes_and_completes(fleet: Fleet, tmp_path: Path) -> None:
    ids = _enroll(fleet, ["edge-a", "edge-b", "edge-c"], {"line": "a"})
    _file_baseline(fleet, tmp_path, list(ids.values()))
    with fleet.admin() as admin:
        _push_file(admin, tmp_path, "2.0")
        r = admin.create_rollout(
            {
                "artifact": "config@2.0",
                "selector": "line=a",
                "waves": "1,100%",
                "gate": {"soak_s": 4},
            }
        )
        wait_until(
            lambda: any("soaking" in e["reason"] for e in admin.get_rollout(r["id"])["history"]),
            ROLLOUT_S,
            "wave 1 to soak",
        )
    assert fleet.cloud is not None
    fleet.cloud.kill()  # mid-soak, no goodbye
    fleet.start_cloud(same_ports=True)
    with fleet.admin() as admin:
        before = admin.get_rollout(r["id"])
        assert before["state"] == "running" and before["wave"] == 1
        done = _wait_state(admin, r["id"], ("succeeded",), ROLLOUT_S)
        for node_id in ids.values():
            wait_until(lambda n=node_id: _has(admin, n, "2.0"), 60, f"{node_id} to have 2.0")
    assert [w["state"] for w in done["waves"]] == ["passed", "passed"]
    assert [e["wave"] for e in done["history"] if "started" in e["reason"]] == [1, 2]


def test_offline_node_is_waited_for_then_counts_failed_past_the_timeout(
    fleet: Fleet, tmp_path: Path
) -> None:
    ids = _enroll(fleet, ["edge-a", "edge-b", "edge-c"], {"line": "a"})
    _file_baseline(fleet, tmp_path, list(ids.values()))
    late = ids["edge-c"]
    fleet.edges["edge-c"].stop()
    with fleet.admin() as admin:
        wait_until(lambda: not _node(admin, late)["online"], 30, "edge-c to be offline")
        # Within the timeout: the rollout waits for the node and goes on when it is back.
        _push_file(admin, tmp_path, "2.0")
        r = admin.create_rollout(
            {
                "artifact": "config@2.0",
                "selector": "line=a",
                "waves": "100%",
                "gate": {"soak_s": 0.5},
                "offline_timeout_s": 120,
            }
        )

        def waiting_for_late() -> bool:
            rr = admin.get_rollout(r["id"])
            mine = next(n for n in rr["nodes"] if n["node_id"] == late)
            return mine["state"] == "applying" and "offline" in mine["reason"]

        wait_until(waiting_for_late, 30, "the rollout to wait for the offline node")
        time.sleep(2)
        assert admin.get_rollout(r["id"])["state"] == "running"
        fleet.start_edge("edge-c")
        _wait_state(admin, r["id"], ("succeeded",), ROLLOUT_S)
        wait_until(lambda: _has(admin, late, "2.0"), 60, "edge-c to have 2.0")

        # Past the timeout: the node counts as failed, the wave rolls back, the rollout pauses.
        fleet.edges["edge-c"].stop()
        wait_until(lambda: not _node(admin, late)["online"], 30, "edge-c to be offline again")
        _push_file(admin, tmp_path, "3.0")
        r3 = admin.create_rollout(
            {
                "artifact": "config@3.0",
                "selector": "line=a",
                "waves": "100%",
                "gate": {"soak_s": 0.5},
                "offline_timeout_s": 3,
            }
        )
        paused = _wait_state(admin, r3["id"], ("paused",), ROLLOUT_S)
        assert "offline for more than 3 s" in paused["reason"], paused["reason"]
        assert late in paused["reason"]
        for node_id in ids.values():
            if node_id != late:
                wait_until(lambda n=node_id: _has(admin, n, "2.0"), 60, f"{node_id} back on 2.0")
        fleet.start_edge("edge-c")
        wait_until(lambda: _has(admin, late, "2.0"), 60, "edge-c back with 2.0")
        assert not (tmp_path / "edge-c" / "artifacts" / "config" / "3.0").exists()
        aborted = admin.rollout_action(r3["id"], "abort", "not today")
        assert aborted["state"] == "aborted"
