"""Issue 13's findings against a real cloud process: limits before authentication (a 400 MiB
body costs no memory), keys and tokens that can be listed, revoked and expire, and the audit
trail that shows it, all through the real HTTP API and the real `fieldline` CLI."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from fieldline.cli.harness.processes import ProcessStack, fieldline_cmd, start_cloud
from fieldline.shared.proto import tunnel_pb2 as pb
from fieldline.shared.proto import tunnel_pb2_grpc as pb_grpc
from tests.cloud.node_client import enroll
from tests.support.artifacts import gnu_sparse_tar
from tests.support.polling import wait_until

BIG = 400 * 1024 * 1024  # the body of the reproduction
MAX_RSS_GROWTH = 20 * 1024 * 1024
CHUNK = b"[" * (1024 * 1024)  # what a deeply nested JSON bomb would start with


@dataclass
class Cloud:
    url: str
    port: int
    grpc: str
    key: str
    pid: int

    def fieldline(self, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, COLUMNS="200", FIELDLINE_URL=self.url)
        env["FIELDLINE_API_KEY"] = key or self.key
        return subprocess.run(
            fieldline_cmd(*args), capture_output=True, text=True, timeout=60, env=env
        )

    def call(self, method: str, path: str, key: str | None, **kw: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=30, **kw)  # type: ignore[arg-type]

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    root: Path = tmp_path_factory.mktemp("security")
    with ProcessStack() as stack:
        child, ports = start_cloud(stack, root / "cloud")
        key = (root / "cloud" / "admin.key").read_text().strip()
        yield Cloud(
            f"http://127.0.0.1:{ports['http']}",
            ports["http"],
            f"127.0.0.1:{ports['grpc']}",
            key,
            child.pid,
        )


def _send_big(cloud: Cloud, head: bytes, chunk: bytes = CHUNK) -> tuple[int, int]:
    """Send `head` then up to BIG bytes of body; returns (status line's code, bytes sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", cloud.port), timeout=30) as s:
        s.sendall(head)
        try:
            while sent < BIG:
                s.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the cloud answered and closed: what this test wants
        answer = b""
        try:
            while b"\r\n" not in answer:
                more = s.recv(4096)
                if not more:
                    break
                answer += more
        except ConnectionResetError:
            pass
    assert answer, f"no answer after {sent} bytes"
    return int(answer.split(b" ")[1]), sent


@pytest.mark.parametrize(
    "auth", ["", "Authorization: Bearer flk_not-a-key\r\n"], ids=["no key", "unknown key"]
)
def test_unauthenticated_400mib_body_is_refused_unread(cloud: Cloud, auth: str) -> None:
    before = cloud.rss()
    head = (
        f"POST /v1/policies HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}"
        f"Content-Length: {BIG}\r\n\r\n"
    ).encode()
    status, sent = _send_big(cloud, head)
    grown = cloud.rss() - before
    print(f"status {status}, sent {sent >> 20} MiB, cloud RSS grew {grown >> 20} MiB")
    assert status == 401
    assert grown < MAX_RSS_GROWTH


def test_oversize_chunked_body_with_a_key_is_cut_off(cloud: Cloud) -> None:
    before = cloud.rss()
    head = (
        "POST /v1/policies HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {cloud.key}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    status, sent = _send_big(cloud, head, b"%x\r\n" % len(CHUNK) + CHUNK + b"\r\n")
    grown = cloud.rss() - before
    print(f"status {status}, sent {sent >> 20} MiB, cloud RSS grew {grown >> 20} MiB")
    assert status == 413
    assert grown < MAX_RSS_GROWTH


def test_declared_oversize_body_with_a_key_is_413(cloud: Cloud) -> None:
    r = cloud.call("POST", "/v1/policies", cloud.key, content=b"{" * (9 * 1024 * 1024))
    assert r.status_code == 413, r.text


def test_non_ascii_bearer_is_401(cloud: Cloud) -> None:
    r = httpx.get(
        f"{cloud.url}/v1/nodes", headers={"Authorization": "Bearer cl\u00e9".encode("latin-1")}
    )
    assert r.status_code == 401


def test_revoked_key_is_refused_on_the_next_request_and_audited(cloud: Cloud) -> None:
    created = json.loads(cloud.fieldline("key", "create", "--role", "viewer", "--json").stdout)
    assert cloud.call("GET", "/v1/nodes", created["key"]).status_code == 200
    listed = cloud.fieldline("key", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {k["id"]: k for k in json.loads(listed.stdout)}
    assert rows[created["id"]]["state"] == "active"
    assert created["key"] not in listed.stdout  # never the secret

    out = cloud.fieldline("key", "revoke", created["id"])
    assert out.returncode == 0, out.stderr
    r = cloud.call("GET", "/v1/nodes", created["key"])
    assert r.status_code == 401 and "revoked" in r.text

    audit = json.loads(cloud.fieldline("audit", "--json").stdout)
    revoke = [a for a in audit if a["method"] == "DELETE" and created["id"] in a["path"]]
    assert revoke and revoke[0]["status"] == 200 and revoke[0]["role"] == "admin"
    refused = [a for a in audit if a["key_id"] == created["id"] and a["status"] == 401]
    assert refused and "revoked" in refused[0]["detail"]
    table = cloud.fieldline("audit", "--who", created["id"])
    assert table.returncode == 0 and "revoked" in table.stdout


def test_expired_key_is_refused(cloud: Cloud) -> None:
    created = json.loads(
        cloud.fieldline("key", "create", "--role", "viewer", "--expires-in", "1", "--json").stdout
    )
    wait_until(
        lambda: cloud.call("GET", "/v1/nodes", created["key"]).status_code == 401,
        10,
        "the key to expire",
    )
    rows = {k["id"]: k for k in json.loads(cloud.fieldline("key", "list", "--json").stdout)}
    assert rows[created["id"]]["state"] == "expired"


def test_last_admin_key_cannot_be_revoked(cloud: Cloud) -> None:
    keys = json.loads(cloud.fieldline("key", "list", "--json").stdout)
    admins = [k for k in keys if k["role"] == "admin" and k["state"] == "active"]
    assert len(admins) == 1
    out = cloud.fieldline("key", "revoke", admins[0]["id"])
    assert out.returncode == 1
    assert "last usable admin key" in out.stderr + out.stdout
    assert cloud.call("GET", "/v1/keys", cloud.key).status_code == 200


def test_viewer_cannot_list_keys_or_read_the_audit(cloud: Cloud) -> None:
    viewer = json.loads(cloud.fieldline("key", "create", "--role", "viewer", "--json").stdout)
    for path in ("/v1/keys", "/v1/audit"):
        assert cloud.call("GET", path, viewer["key"]).status_code == 403


def test_expired_and_revoked_tokens_cannot_enroll_and_are_audited(cloud: Cloud) -> None:
    short = json.loads(cloud.fieldline("token", "create", "--ttl", "1", "--json").stdout)
    revoked = json.loads(cloud.fieldline("token", "create", "--json").stdout)
    out = cloud.fieldline("token", "revoke", revoked["id"])
    assert out.returncode == 0, out.stderr
    time.sleep(1.2)  # past the 1 s TTL
    for tok, why in ((short, "expired"), (revoked, "revoked")):
        with pytest.raises(grpc.RpcError) as exc:
            enroll(cloud.grpc, tok["token"])
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert why in (exc.value.details() or "")
    states = {
        t["id"]: t["state"] for t in json.loads(cloud.fieldline("token", "list", "--json").stdout)
    }
    assert states[short["id"]] == "expired" and states[revoked["id"]] == "revoked"
    audit = json.loads(cloud.fieldline("audit", "--json").stdout)
    enrolls = {a["key_id"]: a for a in audit if a["method"] == "Enroll"}
    assert enrolls[short["id"]]["status"] == 403 and "expired" in enrolls[short["id"]]["detail"]
    assert "revoked" in enrolls[revoked["id"]]["detail"]


def _send_records(target: str, node: pb.EnrollResponse, records: list[pb.Record]) -> int:
    """Send one record batch over a real tunnel; returns the cloud's acked high-water mark."""

    async def go() -> int:
        async def messages():  # type: ignore[no-untyped-def]
            yield pb.EdgeMessage(hello=pb.Hello(node_info_json='{"hostname": "press-7"}'))
            yield pb.EdgeMessage(records=pb.RecordBatch(records=records))
            await asyncio.sleep(15)

        bearer = f"Bearer {node.node_id}.{node.node_secret}"
        async with grpc.aio.insecure_channel(target) as ch:
            call = pb_grpc.TunnelStub(ch).Connect(messages(), metadata=(("authorization", bearer),))
            async with asyncio.timeout(15):
                async for msg in call:
                    if msg.WhichOneof("body") == "records_ack":
                        call.cancel()
                        return int(msg.records_ack.high_water_seq)
        raise AssertionError("no records ack")

    return asyncio.run(go())


def test_deeply_nested_record_does_not_break_the_fleet_wide_listing(cloud: Cloud) -> None:
    token = json.loads(cloud.fieldline("token", "create", "--json").stdout)["token"]
    node = enroll(cloud.grpc, token)
    now = int(time.time() * 1000)
    deep = b"[" * 100_000 + b"]" * 100_000  # RecursionError in json.loads
    nested = b"[" * 200 + b"]" * 200  # parses, but deeper than a response should carry
    records = [
        pb.Record(seq=i, kind="telemetry", topic="t/deep", ts_ms=now, payload=p)
        for i, p in enumerate([deep, nested, b'{"ok": [1, 2]}'], start=1)
    ]
    assert _send_records(cloud.grpc, node, records) == 3
    r = cloud.call("GET", "/v1/records", cloud.key, params={"node": node.node_id})
    assert r.status_code == 200, r.text[:300]
    got = {rec["seq"]: rec for rec in r.json()["records"]}
    assert got[1]["payload_encoding"] == got[2]["payload_encoding"] == "base64"
    assert base64.b64decode(got[1]["payload"]) == deep
    assert got[3]["payload"] == {"ok": [1, 2]}
    out = cloud.fieldline("records", "--node", node.node_id, "--json")
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("version", ["active", "checkpoint"])
def test_a_version_named_after_the_edge_layout_is_refused_at_push(
    cloud: Cloud, tmp_path: Path, version: str
) -> None:
    blob = tmp_path / "model.bin"
    blob.write_bytes(b"weights" * 100)
    out = cloud.fieldline("artifact", "push", str(blob), "--name", "m", "--version", version)
    assert out.returncode == 1
    assert "422" in out.stderr and "reserved" in out.stderr


def test_a_sparse_llm_upload_is_refused_at_push(cloud: Cloud, tmp_path: Path) -> None:
    tar = gnu_sparse_tar(tmp_path, 512 * 1024 * 1024)
    r = cloud.call(
        "POST",
        "/v1/artifacts",
        cloud.key,
        params={"name": "assistant", "version": "1", "kind": "llm"},
        content=tar.read_bytes(),
    )
    assert r.status_code == 422 and "sparse" in r.text, r.text
    assert cloud.call("GET", "/v1/artifacts/assistant/1", cloud.key).status_code == 404
