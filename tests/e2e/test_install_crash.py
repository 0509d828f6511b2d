"""The two crash windows of an install, hit by SIGKILLing a real edge process exactly there
(installer.CRASH_AT_ENV): the restarted edge derives the state from the disk, so the version
the link points at is recorded active, and a verified file in place is not downloaded again."""

from __future__ import annotations

from pathlib import Path

from fieldline.cli.harness.processes import start_edge
from fieldline.edge.control.installer import CRASH_AT_ENV
from tests.e2e.conftest import EDGE_ENV, Fleet, edge_status, sha256_file
from tests.e2e.test_control_plane import CONVERGE_S, _converged, _push
from tests.support.polling import wait_until

SIZE = 4 * 1024 * 1024


def _crashing_edge(fleet: Fleet, point: str) -> None:
    """Enroll edge-a with the crash point armed; return once it killed itself there."""
    with fleet.admin() as admin:
        token = admin.create_token({"line": "a"})["token"]
    child = start_edge(
        fleet.stack,
        fleet.root / "edge-a",
        fleet.ports["grpc"],
        token=token,
        name="edge-a-crashing",
        env={**EDGE_ENV, CRASH_AT_ENV: point},
    )
    wait_until(lambda: not child.alive(), CONVERGE_S, f"the edge to die at {point}")
    assert child.proc is not None and child.proc.returncode == -9
    assert "crash point reached" in child.log_path.read_text()


def _states(edge_dir: Path) -> dict[str, str]:
    status = edge_status(edge_dir)
    return {f"{a['name']}@{a['version']}": a["state"] for a in status["artifacts"]}


def test_kill_between_the_switch_and_the_store_update(fleet: Fleet, tmp_path: Path) -> None:
    with fleet.admin() as admin:
        m = _push(admin, tmp_path, "model", "1", SIZE)
        admin.assign("model@1", "line=a")
    _crashing_edge(fleet, "after-switch")
    edge_dir = tmp_path / "edge-a"
    assert (edge_dir / "artifacts" / "model" / "active").readlink() == Path("1")
    fleet.start_edge("edge-a")
    wait_until(lambda: _converged(fleet, "edge-a", {"model": "1"}), CONVERGE_S, "converged")
    assert _states(edge_dir) == {"model@1": "active"}
    node = fleet.node_of("edge-a")
    assert [(a["version"], a["state"]) for a in node["artifacts"]] == [("1", "active")]
    assert sha256_file(edge_dir / "artifacts" / "model" / "1" / "model") == m["sha256"]
    assert "recovered an interrupted install" in fleet.edges["edge-a"].log_path.read_text()


def test_kill_after_the_rename_does_not_download_again(fleet: Fleet, tmp_path: Path) -> None:
    with fleet.admin() as admin:
        _push(admin, tmp_path, "model", "1", SIZE)
        admin.assign("model@1", "line=a")
    _crashing_edge(fleet, "after-rename")
    sent_before = fleet.metric("fieldline_cloud_artifact_bytes_sent_total")
    assert sent_before >= SIZE
    fleet.start_edge("edge-a")
    wait_until(lambda: _converged(fleet, "edge-a", {"model": "1"}), CONVERGE_S, "converged")
    assert fleet.metric("fieldline_cloud_artifact_bytes_sent_total") == sent_before
    assert _states(tmp_path / "edge-a") == {"model@1": "active"}
