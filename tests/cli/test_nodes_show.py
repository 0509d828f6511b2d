"""`fieldline nodes show`, the real command against a real cloud process that holds a node's
heartbeat health: readable panels, --json that parses back, a clear error for an unknown id."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fieldline.cli.harness.processes import ProcessStack, fieldline_cmd, start_cloud
from fieldline.shared.health import NodeHealth
from tests.cloud.node_client import enroll, report, sample_health, sample_observed

WIDTH = "180"  # columns rich lays the panels out in (no terminal in a test)


@dataclass
class Cloud:
    url: str
    key: str
    node_id: str

    def fieldline(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, COLUMNS=WIDTH, FIELDLINE_URL=self.url, FIELDLINE_API_KEY=self.key)
        return subprocess.run(
            fieldline_cmd(*args), capture_output=True, text=True, timeout=60, env=env
        )


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    root: Path = tmp_path_factory.mktemp("nodes-show")
    with ProcessStack() as stack:
        _, ports = start_cloud(stack, root / "cloud")
        key = (root / "cloud" / "admin.key").read_text().strip()
        url = f"http://127.0.0.1:{ports['http']}"
        r = httpx.post(
            f"{url}/v1/tokens",
            json={"labels": "line=7,site=plant1"},
            headers={"Authorization": f"Bearer {key}"},
        )
        grpc_target = f"127.0.0.1:{ports['grpc']}"
        node = enroll(grpc_target, r.json()["token"])
        assert report(
            grpc_target, node, [sample_health().model_dump_json()], sample_observed()
        ) == [1]
        yield Cloud(url, key, node.node_id)


def test_show_renders_the_node_and_its_health_as_panels(cloud: Cloud) -> None:
    out = cloud.fieldline("nodes", "show", cloud.node_id)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for title in ("node press-7", "tunnel", "data plane", "LLM", "gateway", "models"):
        assert f"─ {title} ─" in text, title
    assert "local rollbacks" in text
    assert cloud.node_id in text
    assert "line=7, site=plant1" in text
    assert "applied 3 of" in text
    assert "detector@2.0" in text  # the active artifact
    assert "active (running)" in text
    assert "1234 rows, 567890 bytes, 17 unsynced" in text  # outbox
    assert "inspection models" in text
    assert "serving" in text and "assistant@1.3" in text  # LLM
    assert "port 8081" in text and "40 entries, 300 hits, 60 misses" in text  # gateway
    assert "1.25%" in text and "41.5 ms" in text  # the model's error rate and p95
    assert "240 in 60 s" in text
    assert "error rate 31% over 50 requests" in text  # the local rollback's reason
    assert "7.2 ms" in text or "7.3 ms" in text  # tunnel round trip
    assert "{" not in text  # no printed Python dict


def test_show_json_parses_back_into_node_health(cloud: Cloud) -> None:
    out = cloud.fieldline("nodes", "show", cloud.node_id, "--json")
    assert out.returncode == 0, out.stderr
    node = json.loads(out.stdout)
    assert NodeHealth.model_validate(node["health"]) == sample_health()
    assert node["id"] == cloud.node_id and node["active"] == {"detector": "2.0"}


def test_show_unknown_node_exits_1_with_a_clear_message(cloud: Cloud) -> None:
    out = cloud.fieldline("nodes", "show", "node_nope")
    assert out.returncode == 1
    assert "no node 'node_nope' in this cloud" in out.stderr
    assert out.stdout == ""


def test_list_still_shows_the_node(cloud: Cloud) -> None:
    out = cloud.fieldline("nodes", "list")
    assert out.returncode == 0, out.stderr
    assert cloud.node_id in out.stdout and "detector@2.0" in out.stdout
