"""The admin API and the tunnel's refusals, against a real cloud process (SQLite, uvicorn, grpc.aio)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from fieldline.cli.harness.processes import ProcessStack, start_cloud
from fieldline.shared.proto import tunnel_pb2 as pb
from fieldline.shared.proto import tunnel_pb2_grpc as pb_grpc

MAX_ARTIFACT = 1024 * 1024


@dataclass
class Cloud:
    data: Path
    http: httpx.Client
    grpc_target: str
    admin_key: str

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.admin_key}"}

    def key(self, role: str) -> str:
        r = self.http.post("/v1/keys", json={"role": role}, headers=self.headers())
        assert r.status_code == 201, r.text
        return str(r.json()["key"])

    def token(self, labels: str, ttl_s: int | None = None) -> str:
        body: dict[str, object] = {"labels": labels}
        if ttl_s:
            body["ttl_s"] = ttl_s
        r = self.http.post("/v1/tokens", json=body, headers=self.headers())
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def upload(self, data: bytes, name: str, version: str, kind: str = "file") -> httpx.Response:
        return self.http.post(
            "/v1/artifacts",
            params={"name": name, "version": version, "kind": kind},
            content=data,
            headers=self.headers(),
        )


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    root = tmp_path_factory.mktemp("cloud-api")
    with ProcessStack() as stack:
        _, ports = start_cloud(
            stack, root / "cloud", env={"FIELDLINE_MAX_ARTIFACT_BYTES": str(MAX_ARTIFACT)}
        )
        key = (root / "cloud" / "admin.key").read_text().strip()
        with httpx.Client(base_url=f"http://127.0.0.1:{ports['http']}", timeout=30) as http:
            yield Cloud(root / "cloud", http, f"127.0.0.1:{ports['grpc']}", key)


def enroll(target: str, token: str) -> pb.EnrollResponse:
    async def go() -> pb.EnrollResponse:
        async with grpc.aio.insecure_channel(target) as ch:
            return await pb_grpc.EnrollmentStub(ch).Enroll(
                pb.EnrollRequest(token=token, node_info_json="{}")
            )

    return asyncio.run(go())


def fetch(target: str, sha: str, bearer: str | None, offset: int = 0) -> bytes:
    async def go() -> bytes:
        md = (("authorization", bearer),) if bearer else ()
        async with grpc.aio.insecure_channel(target) as ch:
            out = b""
            async for chunk in pb_grpc.TunnelStub(ch).FetchArtifact(
                pb.FetchArtifactRequest(sha256=sha, offset=offset), metadata=md
            ):
                out += chunk.data
            return out

    return asyncio.run(go())


def blob_files(cloud: Cloud) -> list[Path]:
    return [p for p in (cloud.data / "blobs").rglob("*") if p.is_file()]


def test_no_key_is_401_and_unknown_key_is_401(cloud: Cloud) -> None:
    assert cloud.http.get("/v1/nodes").status_code == 401
    assert cloud.http.get("/v1/nodes", headers=cloud.headers("flk_nope")).status_code == 401
    assert cloud.http.get("/healthz").status_code == 200


def test_viewer_reads_but_cannot_change(cloud: Cloud) -> None:
    viewer = cloud.key("viewer")
    assert cloud.http.get("/v1/nodes", headers=cloud.headers(viewer)).status_code == 200
    r = cloud.http.post(
        "/v1/assignments",
        json={"artifact": "x@1", "selector": "a=b"},
        headers=cloud.headers(viewer),
    )
    assert r.status_code == 403
    assert "operator" in r.json()["detail"]
    r = cloud.http.post("/v1/tokens", json={"labels": {}}, headers=cloud.headers(viewer))
    assert r.status_code == 403
    r = cloud.http.post(
        "/v1/artifacts",
        params={"name": "v", "version": "1"},
        content=b"x",
        headers=cloud.headers(viewer),
    )
    assert r.status_code == 403
    operator = cloud.key("operator")
    r = cloud.http.post("/v1/keys", json={"role": "admin"}, headers=cloud.headers(operator))
    assert r.status_code == 403


@pytest.mark.parametrize(
    ("params", "body", "status", "says"),
    [
        ({"name": "e", "version": "1"}, b"", 400, "empty"),
        ({"name": "k", "version": "1", "kind": "exe"}, b"x", 422, "onnx, llm, file"),
        ({"name": "bad name", "version": "1"}, b"x", 422, "name"),
        ({"name": "big", "version": "1"}, b"x" * (MAX_ARTIFACT + 1), 413, "limit"),
    ],
)
def test_bad_uploads_are_refused_and_leave_nothing(
    cloud: Cloud, params: dict[str, str], body: bytes, status: int, says: str
) -> None:
    before = blob_files(cloud)
    r = cloud.http.post("/v1/artifacts", params=params, content=body, headers=cloud.headers())
    assert r.status_code == status, r.text
    assert says in r.json()["detail"]
    assert blob_files(cloud) == before


def test_oversize_stream_without_length_is_cut_off(cloud: Cloud) -> None:
    before = blob_files(cloud)

    def chunks() -> Iterator[bytes]:
        for _ in range(MAX_ARTIFACT // 65536 + 4):
            yield b"y" * 65536

    r = cloud.http.post(
        "/v1/artifacts",
        params={"name": "stream", "version": "1"},
        content=chunks(),
        headers=cloud.headers(),
    )
    assert r.status_code == 413
    assert blob_files(cloud) == before
    assert not any((cloud.data / "blobs" / "tmp").iterdir())


def test_duplicate_version_is_409(cloud: Cloud) -> None:
    assert cloud.upload(b"abc", "dup", "1").status_code == 201
    r = cloud.upload(b"abcd", "dup", "1")
    assert r.status_code == 409
    assert "already exists" in r.json()["detail"]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"artifact": "nover", "selector": "a=b"}, "NAME@VERSION"),
        ({"artifact": "dup@1", "selector": "a"}, "key=value"),
        ({"artifact": "dup@1", "selector": {"a": "b c"}}, "bad label value"),
    ],
)
def test_malformed_assignments_are_422(cloud: Cloud, body: dict[str, object], says: str) -> None:
    r = cloud.http.post("/v1/assignments", json=body, headers=cloud.headers())
    assert r.status_code == 422
    assert says in json.dumps(r.json())


def test_unknown_artifact_assignment_is_404(cloud: Cloud) -> None:
    r = cloud.http.post(
        "/v1/assignments", json={"artifact": "nope@1", "selector": "a=b"}, headers=cloud.headers()
    )
    assert r.status_code == 404


def test_token_is_single_use(cloud: Cloud) -> None:
    token = cloud.token("line=z")
    resp = enroll(cloud.grpc_target, token)
    assert resp.node_id.startswith("node_")
    assert dict(resp.labels) == {"line": "z"}
    assert len(resp.cloud_public_key) == 32
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        enroll(cloud.grpc_target, token)
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "already used" in (exc.value.details() or "")


def test_expired_token_is_refused(cloud: Cloud) -> None:
    token = cloud.token("line=z", ttl_s=1)
    time.sleep(1.2)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        enroll(cloud.grpc_target, token)
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "expired" in (exc.value.details() or "")


def test_node_fetches_only_what_is_assigned_to_it(cloud: Cloud) -> None:
    mine = enroll(cloud.grpc_target, cloud.token("team=mine"))
    other = enroll(cloud.grpc_target, cloud.token("team=other"))
    data = bytes(range(256)) * 4000
    sha = cloud.upload(data, "secret-model", "1").json()["sha256"]
    r = cloud.http.post(
        "/v1/assignments",
        json={"artifact": "secret-model@1", "selector": "team=mine"},
        headers=cloud.headers(),
    )
    assert r.json()["nodes"] == [mine.node_id]
    bearer_mine = f"Bearer {mine.node_id}.{mine.node_secret}"
    bearer_other = f"Bearer {other.node_id}.{other.node_secret}"
    assert fetch(cloud.grpc_target, sha, bearer_mine) == data
    assert fetch(cloud.grpc_target, sha, bearer_mine, offset=1000) == data[1000:]
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        fetch(cloud.grpc_target, sha, bearer_other)
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        fetch(cloud.grpc_target, sha, None)
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # A right node id with a wrong secret is no credential at all.
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        fetch(cloud.grpc_target, sha, f"Bearer {mine.node_id}.{other.node_secret}")
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_desired_state_stream_shows_only_own_node(cloud: Cloud) -> None:
    a = enroll(cloud.grpc_target, cloud.token("stream=a"))

    async def first_desired() -> tuple[pb.Welcome, pb.DesiredStatePush]:
        async with grpc.aio.insecure_channel(cloud.grpc_target) as ch:

            async def requests():  # type: ignore[no-untyped-def]
                yield pb.EdgeMessage(hello=pb.Hello(node_info_json="{}"))
                await asyncio.sleep(5)

            call = pb_grpc.TunnelStub(ch).Connect(
                requests(), metadata=(("authorization", f"Bearer {a.node_id}.{a.node_secret}"),)
            )
            welcome = desired = None
            async for msg in call:
                if msg.WhichOneof("body") == "welcome":
                    welcome = msg.welcome
                if msg.WhichOneof("body") == "desired":
                    desired = msg.desired
                if welcome and desired:
                    call.cancel()
                    return welcome, desired
        raise AssertionError("no welcome and desired state")

    welcome, desired = asyncio.run(first_desired())
    assert welcome.node_id == a.node_id
    assert json.loads(desired.desired_json)["node_id"] == a.node_id


def test_metrics_are_prometheus_text(cloud: Cloud) -> None:
    text = cloud.http.get("/metrics").text
    assert "fieldline_cloud_artifact_bytes_sent_total" in text
    assert "fieldline_cloud_enrollments_total" in text


def test_revoked_node_is_refused_in_plain_mode_too(cloud: Cloud) -> None:
    node = enroll(cloud.grpc_target, cloud.token("revoke=me"))
    viewer = cloud.key("viewer")
    r = cloud.http.post(f"/v1/nodes/{node.node_id}/revoke", headers=cloud.headers(viewer))
    assert r.status_code == 403  # revocation needs the admin role
    r = cloud.http.post(f"/v1/nodes/{node.node_id}/revoke", headers=cloud.headers())
    assert r.status_code == 200 and r.json()["revoked_at"]
    assert cloud.http.post("/v1/nodes/node_nope/revoke", headers=cloud.headers()).status_code == 404
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        fetch(cloud.grpc_target, "0" * 64, f"Bearer {node.node_id}.{node.node_secret}")
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Only the right secret learns that the node is revoked.
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        fetch(cloud.grpc_target, "0" * 64, f"Bearer {node.node_id}.wrong")
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
