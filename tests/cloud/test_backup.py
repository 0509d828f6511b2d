"""Backing up a running cloud and restoring it into a new directory: nodes, keys, artifacts
and the TLS identity come back, so an edge enrolled before the backup reconnects to the
restored cloud with its pinned CA and key."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import pytest

from fieldline.cli.harness.processes import fieldline_cmd
from fieldline.cloud.backup import BackupError, restore
from fieldline.cloud.context import open_context
from fieldline.shared.config import CloudSettings
from tests.e2e.conftest import Fleet, wait_until


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fieldline_cmd(*args), capture_output=True, text=True, timeout=120)


def test_backup_while_running_and_restore(tls_fleet: Fleet, tmp_path: Path) -> None:
    tls_fleet.enroll_edge("edge-a", {"line": "a"})
    blob = tmp_path / "model.bin"
    blob.write_bytes(b"weights" * 10_000)
    with tls_fleet.admin() as admin:
        wait_until(lambda: admin.list_nodes() and admin.list_nodes()[0]["online"], 30, "edge")
        m = admin.push_artifact(blob, name="m", version="1", kind="file")
        admin.assign("m@1", "line=a")
    archive = tmp_path / "cloud.tar.gz"
    out = _cli("cloud", "backup", str(archive), "--data", str(tls_fleet.root / "cloud"))
    assert out.returncode == 0, out.stderr
    assert archive.stat().st_mode & 0o777 == 0o600
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"cloud.db", "signing.key", "tls/ca.key", "tls/ca.crt"} <= names
    assert not any(n.startswith("blobs/tmp") for n in names)

    # The old cloud goes away; a new one starts from the backup on the same ports.
    assert tls_fleet.cloud is not None
    tls_fleet.cloud.stop()
    restored = tmp_path / "restored"
    out = _cli("cloud", "restore", str(archive), "--data", str(restored))
    assert out.returncode == 0, out.stderr
    (tls_fleet.root / "cloud").rename(tmp_path / "old-cloud")
    restored.rename(tls_fleet.root / "cloud")
    tls_fleet.start_cloud(same_ports=True)
    with tls_fleet.admin() as admin:
        assert admin.list_artifacts()[0]["sha256"] == m["sha256"]
        # The edge never re-enrolled: its certificate and pinned CA still fit.
        wait_until(lambda: admin.list_nodes()[0]["online"], 30, "the edge to reconnect")
    assert (
        "enrolled"
        not in tls_fleet.edges["edge-a"].log_path.read_text().split("tunnel disconnected")[-1]
    )


def test_restore_refuses_a_used_directory_and_foreign_archives(tmp_path: Path) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    with pytest.raises(BackupError, match="not empty"):
        restore(tmp_path / "nope.tar.gz", tmp_path / "used")
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        (tmp_path / "evil").write_text("x")
        tar.add(tmp_path / "evil", arcname="../evil")
    with pytest.raises(BackupError, match="not a fieldline cloud backup"):
        restore(bad, tmp_path / "new")


def test_backup_over_an_existing_world_readable_file_ends_0600(tmp_path: Path) -> None:
    data = tmp_path / "cloud"
    open_context(CloudSettings(data_dir=data)).close()
    archive = tmp_path / "cloud.tar.gz"
    archive.write_bytes(b"an older backup")
    archive.chmod(0o644)
    out = _cli("cloud", "backup", str(archive), "--data", str(data))
    assert out.returncode == 0, out.stderr
    assert archive.stat().st_mode & 0o777 == 0o600
    with tarfile.open(archive) as tar:
        assert {"signing.key", "admin.key"} <= set(tar.getnames())
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    for secret in ("signing.key", "admin.key"):
        assert (data / secret).stat().st_mode & 0o777 == 0o600
