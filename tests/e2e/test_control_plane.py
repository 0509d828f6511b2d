"""End to end: a cloud and edge daemons as processes, assigning, resuming, refusing, restarting."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import pytest

from fieldline.cli.admin_client import AdminClient
from tests.e2e.conftest import Fleet, edge_status, sha256_file
from tests.support.polling import wait_until

CONVERGE_S = 60


def _active_path(edge_dir: Path, name: str) -> Path:
    """The file an edge's active pointer for `name` leads to."""
    active = edge_dir / "artifacts" / name / "active"
    files = [p for p in active.resolve().iterdir() if p.is_file()]
    assert len(files) == 1, files
    return files[0]


def _push(admin: AdminClient, tmp: Path, name: str, version: str, size: int) -> dict:
    path = tmp / f"{name}-{version}.bin"
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(secrets.token_bytes(n))
            left -= n
    manifest = admin.push_artifact(path, name=name, version=version, kind="file")
    assert manifest["sha256"] == sha256_file(path)
    return manifest


def _converged(fleet: Fleet, name: str, active: dict[str, str] | None = None) -> bool:
    node = fleet.node_of(name)
    ok = node["desired_generation"] == node["applied_generation"] and node["applied_generation"] > 0
    if active is not None:
        ok = ok and node.get("active") == active
    return ok


def test_assign_by_label_reaches_only_matching_node(fleet: Fleet, tmp_path: Path) -> None:
    fleet.enroll_edge("edge-a", {"line": "a"})
    fleet.enroll_edge("edge-b", {"line": "b"})
    with fleet.admin() as admin:
        wait_until(lambda: len(admin.list_nodes()) == 2, 30, "both edges to enroll")
        m = _push(admin, tmp_path, "detector", "1.0", 3 * 1024 * 1024 + 17)
        admin.assign("detector@1.0", "line=a")
    wait_until(lambda: _converged(fleet, "edge-a", {"detector": "1.0"}), CONVERGE_S, "edge-a")
    installed = _active_path(tmp_path / "edge-a", "detector")
    assert sha256_file(installed) == m["sha256"]
    assert not (tmp_path / "edge-b" / "artifacts" / "detector").exists()
    b = fleet.node_of("edge-b")
    assert b.get("active", {}) == {}
    assert b["online"] is True


def test_download_resumes_after_kill9(fleet: Fleet, tmp_path: Path) -> None:
    size = 64 * 1024 * 1024
    edge = fleet.enroll_edge("edge-a", {"line": "a"})
    with fleet.admin() as admin:
        wait_until(lambda: admin.list_nodes(), 30, "the edge to enroll")
        m = _push(admin, tmp_path, "llm", "1.0", size)
        admin.assign("llm@1.0", "line=a")
    part = tmp_path / "edge-a" / "artifacts" / ".partial" / f"{m['sha256']}.part"
    # Kill -9 the edge while its partial file is part-way there.
    wait_until(
        lambda: part.exists() and 0 < part.stat().st_size < size // 2,
        60,
        "download to start",
        poll_s=0.005,
    )
    edge.kill()
    have = part.stat().st_size
    assert 0 < have < size
    sent_before = fleet.metric("fieldline_cloud_artifact_bytes_sent_total")
    fleet.start_edge("edge-a")  # no token: the credential is stored
    wait_until(lambda: _converged(fleet, "edge-a", {"llm": "1.0"}), CONVERGE_S, "resumed install")
    assert sha256_file(_active_path(tmp_path / "edge-a", "llm")) == m["sha256"]
    sent_after = fleet.metric("fieldline_cloud_artifact_bytes_sent_total") - sent_before
    chunk = 1024 * 1024
    assert sent_after <= (size - have) + chunk, (sent_after, size - have)


def _blob_path(cloud_dir: Path, sha: str) -> Path:
    found = [p for p in (cloud_dir / "blobs").rglob("*") if p.is_file() and sha in p.name]
    assert len(found) == 1, found
    return found[0]


def test_tampered_blob_is_refused_and_previous_stays_active(fleet: Fleet, tmp_path: Path) -> None:
    fleet.enroll_edge("edge-a", {"line": "a"})
    with fleet.admin() as admin:
        wait_until(lambda: admin.list_nodes(), 30, "the edge to enroll")
        _push(admin, tmp_path, "detector", "1.0", 200_000)
        admin.assign("detector@1.0", "line=a")
        wait_until(lambda: _converged(fleet, "edge-a", {"detector": "1.0"}), CONVERGE_S, "v1")
        m2 = _push(admin, tmp_path, "detector", "2.0", 300_000)
        blob = _blob_path(tmp_path / "cloud", m2["sha256"])
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        os.chmod(blob, 0o644)
        blob.write_bytes(bytes(data))
        admin.assign("detector@2.0", "line=a")

        def refused() -> bool:
            node = fleet.node_of("edge-a")
            errors = " ".join(node.get("errors") or [])
            return node["desired_generation"] > node["applied_generation"] and "sha256" in errors

        wait_until(refused, CONVERGE_S, "the edge to report the tampered artifact")
    node = fleet.node_of("edge-a")
    assert node["active"] == {"detector": "1.0"}
    status = edge_status(tmp_path / "edge-a")
    assert status["active"] == {"detector": "1.0"}


def test_offline_restart_then_reconnect(fleet: Fleet, tmp_path: Path) -> None:
    edge = fleet.enroll_edge("edge-a", {"line": "a"})
    with fleet.admin() as admin:
        wait_until(lambda: admin.list_nodes(), 30, "the edge to enroll")
        _push(admin, tmp_path, "detector", "1.0", 100_000)
        admin.assign("detector@1.0", "line=a")
    wait_until(lambda: _converged(fleet, "edge-a", {"detector": "1.0"}), CONVERGE_S, "v1")
    generation = fleet.node_of("edge-a")["desired_generation"]
    assert fleet.cloud is not None
    fleet.cloud.stop()
    edge.stop()
    fleet.start_edge("edge-a")  # the cloud is down
    time.sleep(2)
    fleet.edges["edge-a"].check_alive()
    status = edge_status(tmp_path / "edge-a")
    assert status["desired_generation"] == generation
    assert status["applied_generation"] == generation
    assert status["active"] == {"detector": "1.0"}
    fleet.start_cloud(same_ports=True)
    wait_until(lambda: fleet.node_of("edge-a")["online"], 30, "the edge to reconnect")


def test_cloud_restart_keeps_everything(fleet: Fleet, tmp_path: Path) -> None:
    fleet.enroll_edge("edge-a", {"line": "a"})
    with fleet.admin() as admin:
        wait_until(lambda: admin.list_nodes(), 30, "the edge to enroll")
        _push(admin, tmp_path, "detector", "1.0", 100_000)
        admin.assign("detector@1.0", "line=a")
    wait_until(lambda: _converged(fleet, "edge-a", {"detector": "1.0"}), CONVERGE_S, "v1")
    with fleet.admin() as admin:
        nodes_before = admin.list_nodes()
        artifacts_before = admin.list_artifacts()
    assert fleet.cloud is not None
    fleet.cloud.stop()
    fleet.start_cloud(same_ports=True)
    with fleet.admin() as admin:
        assert [n["id"] for n in admin.list_nodes()] == [n["id"] for n in nodes_before]
        assert [a["sha256"] for a in admin.list_artifacts()] == [
            a["sha256"] for a in artifacts_before
        ]
    started = time.monotonic()
    wait_until(lambda: fleet.node_of("edge-a")["online"], 30, "the edge to reconnect")
    assert time.monotonic() - started < 30
    # The assignment survived: a new node with the label gets the artifact too.
    fleet.enroll_edge("edge-c", {"line": "a"})
    wait_until(lambda: _converged(fleet, "edge-c", {"detector": "1.0"}), CONVERGE_S, "edge-c")


@pytest.mark.parametrize("labels", ["line", "a=b=c,", "bad key=x"])
def test_cli_rejects_malformed_labels(fleet: Fleet, labels: str) -> None:
    import subprocess

    from fieldline.cli.harness.processes import fieldline_cmd

    out = subprocess.run(
        fieldline_cmd(
            "token", "create", "--labels", labels, "--url", fleet.url, "--key", fleet.key
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "label" in out.stderr
