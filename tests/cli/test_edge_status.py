"""`fieldline edge status`, the real command on a real edge store holding a NodeHealth: the same
panels as `nodes show`, --json that parses back, and a stored health that no longer reads."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from fieldline.cli.harness.processes import fieldline_cmd
from fieldline.edge.store import Credential, EdgeStore
from fieldline.shared.health import NodeHealth
from fieldline.shared.schemas import ArtifactState
from tests.cloud.node_client import sample_health, sample_observed

WIDTH = "180"


def edge_status(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fieldline_cmd("edge", "status", "--data", str(data), *args),
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, COLUMNS=WIDTH),
    )


@pytest.fixture
def edge(tmp_path: Path) -> Path:
    data = tmp_path / "edge"
    store = EdgeStore(data)
    store.save_credential(
        Credential("node_abc123", "secret", b"\x01" * 32), cloud="cloud:7443", labels={"line": "7"}
    )
    store.set_artifact(
        name="detector", version="2.0", sha256="b" * 64, kind="onnx", state=ArtifactState.active
    )
    store.set_active("detector", "2.0")
    store.save_observed(sample_observed())
    store.set_meta(health=sample_health().model_dump_json(), health_at="1772355600000")
    store.close()
    return data


def test_status_renders_the_stored_health_as_panels(edge: Path) -> None:
    out = edge_status(edge)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for title in ("edge node_abc123", "tunnel", "data plane", "LLM", "gateway", "models"):
        assert f"─ {title} ─" in text, title
    assert "cloud:7443" in text and "line=7" in text
    assert "detector@2.0" in text and "active (running)" in text
    assert "1234 rows, 567890 bytes, 17 unsynced" in text
    assert "1.25%" in text and "41.5 ms" in text
    assert "error rate 31% over 50 requests" in text
    assert "{" not in text  # no printed Python dict


def test_status_json_parses_back_into_node_health(edge: Path) -> None:
    out = edge_status(edge, "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert NodeHealth.model_validate(status["health"]) == sample_health()
    assert status["health_at"].startswith("2026-03-01T09:00:00")
    assert status["artifacts"][0]["sha256"] == "b" * 64


def test_a_stored_health_that_does_not_read_is_said(edge: Path) -> None:
    store = EdgeStore(edge)
    store.set_meta(health='{"dataplane": {"outbox": {"rows": -5}}}')
    store.close()
    out = edge_status(edge)
    assert out.returncode == 0, out.stderr
    assert "stored health is not a NodeHealth: 1 error(s)" in out.stdout
    assert "no health reported yet" in out.stdout


def test_no_store_exits_2(tmp_path: Path) -> None:
    out = edge_status(tmp_path / "nothing-here")
    assert out.returncode == 2
    assert "error" in out.stderr
