"""A node's heartbeat health, against a real cloud process: stored and served as NodeHealth
(typed fields in GET /v1/nodes and in the OpenAPI document), malformed or oversized health
refused and counted while the tunnel stays up."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from fieldline.cli.harness.processes import ProcessStack, start_cloud
from fieldline.shared.health import NodeHealth
from fieldline.shared.limits import MAX_TUNNEL_JSON_CHARS
from tests.cloud.node_client import enroll, report, sample_health, sample_observed


@dataclass
class Cloud:
    http: httpx.Client
    grpc: str

    def token(self) -> str:
        r = self.http.post("/v1/tokens", json={"labels": "line=7"})
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def refused_heartbeats(self) -> float:
        text = self.http.get("/metrics").text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("fieldline_cloud_tunnel_errors_total")
            and 'reason="heartbeat"' in line
        )


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    root = tmp_path_factory.mktemp("node-health")
    with ProcessStack() as stack:
        _, ports = start_cloud(stack, root / "cloud")
        key = (root / "cloud" / "admin.key").read_text().strip()
        with httpx.Client(
            base_url=f"http://127.0.0.1:{ports['http']}",
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        ) as http:
            yield Cloud(http, f"127.0.0.1:{ports['grpc']}")


def test_heartbeat_health_comes_back_typed(cloud: Cloud) -> None:
    node = enroll(cloud.grpc, cloud.token())
    health = sample_health()
    assert report(cloud.grpc, node, [health.model_dump_json()], sample_observed()) == [1]
    listed = {n["id"]: n for n in cloud.http.get("/v1/nodes").json()}
    got = listed[node.node_id]
    assert got["health"]["dataplane"]["outbox"]["rows"] == 1234
    assert got["health"]["llm"]["state"] == "serving"
    assert got["health"]["models"]["detector"]["p95_latency_ms"] == 41.5
    assert got["health"]["local_rollbacks"][0]["from_version"] == "2.1"
    assert got["health_at"] is not None
    assert (got["sync_backlog"], got["sync_live_lag_ms"]) == (150_000, 850.0)
    assert got["node_info"]["hostname"] == "press-7"
    assert got["artifacts"] == [
        {"name": "detector", "version": "2.0", "sha256": "b" * 64, "state": "active", "error": None}
    ]
    assert NodeHealth.model_validate(got["health"]) == health
    one = cloud.http.get(f"/v1/nodes/{node.node_id}").json()
    assert one["health"] == got["health"]


def test_node_without_health_shows_null(cloud: Cloud) -> None:
    node = enroll(cloud.grpc, cloud.token())
    assert cloud.http.get(f"/v1/nodes/{node.node_id}").json()["health"] is None


@pytest.mark.parametrize(
    "bad",
    [
        '{"dataplane": {"outbox": {"rows": -1}}}',  # below the schema's bound
        '{"llm": {"state": "' + "x" * 17 + '"}}',  # longer than the schema allows
        "not json",
        '{"models": {"m": {"name": "m"}}, "pad": "' + "x" * MAX_TUNNEL_JSON_CHARS + '"}',
    ],
    ids=["negative", "too-long-field", "not-json", "oversized"],
)
def test_bad_health_is_refused_and_counted(cloud: Cloud, bad: str) -> None:
    node = enroll(cloud.grpc, cloud.token())
    good = sample_health().model_dump_json()
    before = cloud.refused_heartbeats()
    # The good health is acked and kept; the bad one is not acked, and the stream stays up.
    assert report(cloud.grpc, node, [good, bad]) == [1]
    assert cloud.refused_heartbeats() == before + 1
    stored = cloud.http.get(f"/v1/nodes/{node.node_id}").json()["health"]
    assert stored["dataplane"]["outbox"]["rows"] == 1234


def test_openapi_shows_node_health_fields(cloud: Cloud) -> None:
    schemas = cloud.http.get("/openapi.json").json()["components"]["schemas"]
    health_ref = schemas["NodePublic"]["properties"]["health"]["anyOf"][0]["$ref"]
    assert health_ref == "#/components/schemas/NodeHealth"
    parts = schemas["NodeHealth"]["properties"]
    for part, schema in [
        ("dataplane", "DataPlaneHealth"),
        ("llm", "LlmHealth"),
        ("tunnel", "TunnelHealth"),
        ("gateway", "GatewayHealth"),
    ]:
        assert parts[part]["anyOf"][0]["$ref"] == f"#/components/schemas/{schema}"
    assert "ModelHealth" in parts["models"]["additionalProperties"]["$ref"]
    assert schemas["DataPlaneHealth"]["properties"]["outbox"]["$ref"].endswith("/OutboxHealth")
    assert schemas["OutboxHealth"]["properties"]["rows"]["type"] == "integer"
    assert "ArtifactStatus" in schemas["NodePublic"]["properties"]["artifacts"]["items"]["$ref"]
