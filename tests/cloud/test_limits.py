"""Bounds on hostile clients, against a real cloud process: oversize gRPC messages, slow-loris
HTTP clients (headers and bodies) and a flood of enrollment attempts are each refused, logged
and counted, while well-behaved clients keep being served."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from fieldline.cli.harness.processes import Child, ProcessStack, start_cloud
from fieldline.shared.proto import tunnel_pb2 as pb
from fieldline.shared.proto import tunnel_pb2_grpc as pb_grpc

MAX_MESSAGE = 64 * 1024
HEADER_TIMEOUT_S = 1.0
BODY_IDLE_S = 1.0
ENROLL_BURST = 5
SLOW_CLIENTS = 20
FLOOD = 100


@dataclass
class Cloud:
    child: Child
    url: str
    grpc: str
    key: str
    data: Path

    def metric(self, name: str, label: str = "") -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name) and label in line
        )

    def token(self) -> str:
        r = httpx.post(
            f"{self.url}/v1/tokens",
            json={"labels": {}},
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=10,
        )
        return str(r.json()["token"])

    def log(self) -> str:
        return self.child.log_path.read_text()


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    root = tmp_path_factory.mktemp("limits")
    env = {
        "FIELDLINE_GRPC_MAX_MESSAGE_BYTES": str(MAX_MESSAGE),
        "FIELDLINE_HTTP_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "FIELDLINE_HTTP_BODY_IDLE_TIMEOUT_S": str(BODY_IDLE_S),
        "FIELDLINE_ENROLL_RATE_PER_S": "1",
        "FIELDLINE_ENROLL_BURST": str(ENROLL_BURST),
    }
    with ProcessStack() as stack:
        child, ports = start_cloud(stack, root / "cloud", env=env)
        key = (root / "cloud" / "admin.key").read_text().strip()
        yield Cloud(
            child,
            f"http://127.0.0.1:{ports['http']}",
            f"127.0.0.1:{ports['grpc']}",
            key,
            root / "cloud",
        )


def _enroll(target: str, token: str, node_info: str = "{}") -> pb.EnrollResponse:
    async def go() -> pb.EnrollResponse:
        async with grpc.aio.insecure_channel(target) as ch:
            return await pb_grpc.EnrollmentStub(ch).Enroll(
                pb.EnrollRequest(token=token, node_info_json=node_info), timeout=10
            )

    return asyncio.run(go())


def test_oversize_grpc_messages_are_refused(cloud: Cloud) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        _enroll(
            cloud.grpc, "flt_" + "x" * 43, node_info='{"hostname": "' + "h" * MAX_MESSAGE + '"}'
        )
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    time.sleep(1.2)  # the enrollment bucket refills
    node = _enroll(cloud.grpc, cloud.token())
    bearer = f"Bearer {node.node_id}.{node.node_secret}"

    async def big_batch() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(cloud.grpc) as ch:

            async def requests():  # type: ignore[no-untyped-def]
                yield pb.EdgeMessage(hello=pb.Hello(node_info_json="{}"))
                record = pb.Record(seq=1, kind="telemetry", topic="t", payload=b"z" * MAX_MESSAGE)
                yield pb.EdgeMessage(records=pb.RecordBatch(records=[record]))
                await asyncio.sleep(10)

            call = pb_grpc.TunnelStub(ch).Connect(
                requests(), metadata=(("authorization", bearer),), timeout=15
            )
            try:
                async for _ in call:
                    pass
            except grpc.aio.AioRpcError as e:
                return e.code()
        return grpc.StatusCode.OK

    assert asyncio.run(big_batch()) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert cloud.metric("fieldline_cloud_tunnel_errors_total", 'reason="oversize"') >= 2
    assert cloud.metric("fieldline_cloud_enrollments_total", 'result="oversize"') == 1
    assert "oversize gRPC message refused" in cloud.log()
    assert "tunnel closed: oversize message" in cloud.log()
    # The cloud stored nothing of it and still serves.
    assert httpx.get(f"{cloud.url}/healthz", timeout=5).status_code == 200


def _slow_client(url_port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", url_port), timeout=10)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    return s


def _closed(s: socket.socket) -> bool:
    try:
        s.sendall(b"X-Slow: 1\r\n")
        s.settimeout(0.01)
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_slow_loris_clients_are_cut_off_and_others_served(cloud: Cloud) -> None:
    port = int(cloud.url.rsplit(":", 1)[1])
    before = cloud.metric("fieldline_cloud_http_slow_clients_total", 'reason="headers"')
    clients = [_slow_client(port) for _ in range(SLOW_CLIENTS)]
    idle = socket.create_connection(("127.0.0.1", port), timeout=10)  # sends nothing at all
    started = time.monotonic()
    open_ones = list(clients)
    while open_ones and time.monotonic() - started < HEADER_TIMEOUT_S + 5:
        # Well-behaved requests are answered at once meanwhile.
        t0 = time.monotonic()
        assert httpx.get(f"{cloud.url}/healthz", timeout=5).status_code == 200
        assert time.monotonic() - t0 < 1.0
        open_ones = [s for s in open_ones if not _closed(s)]
        time.sleep(0.2)
    took = time.monotonic() - started
    assert not open_ones, f"{len(open_ones)} slow clients still connected after {took:.1f}s"
    assert took >= HEADER_TIMEOUT_S * 0.8
    idle.settimeout(5)
    assert idle.recv(1) == b""  # closed too
    for s in [*clients, idle]:
        s.close()
    after = cloud.metric("fieldline_cloud_http_slow_clients_total", 'reason="headers"')
    assert after - before >= SLOW_CLIENTS + 1
    assert "slow HTTP client disconnected" in cloud.log()


def test_stalled_upload_body_is_cut_off_and_leaves_nothing(cloud: Cloud) -> None:
    port = int(cloud.url.rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(
        b"POST /v1/artifacts?name=stall&version=1 HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: Bearer {cloud.key}\r\n".encode()
        + b"Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n"
        + b"a" * 1000
    )
    s.settimeout(BODY_IDLE_S + 5)
    started = time.monotonic()
    data = b""
    try:
        while chunk := s.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    assert time.monotonic() - started < BODY_IDLE_S + 4
    s.close()
    assert cloud.metric("fieldline_cloud_http_slow_clients_total", 'reason="body"') >= 1
    time.sleep(0.5)
    assert not any((cloud.data / "blobs" / "tmp").iterdir())
    r = httpx.get(
        f"{cloud.url}/v1/artifacts", headers={"Authorization": f"Bearer {cloud.key}"}, timeout=5
    )
    assert all(a["name"] != "stall" for a in r.json())


def test_enrollment_flood_is_rate_limited(
    cloud: Cloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    time.sleep(ENROLL_BURST + 0.5)  # a full bucket

    async def flood() -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(cloud.grpc) as ch:
            stub = pb_grpc.EnrollmentStub(ch)

            async def one(i: int) -> grpc.StatusCode:
                try:
                    await stub.Enroll(
                        pb.EnrollRequest(token=f"flt_{'g' * 40}{i:03d}", node_info_json="{}"),
                        timeout=10,
                    )
                except grpc.aio.AioRpcError as e:
                    return e.code()
                return grpc.StatusCode.OK

            return list(await asyncio.gather(*(one(i) for i in range(FLOOD))))

    before = cloud.metric("fieldline_cloud_enrollments_total", 'result="rate_limited"')
    started = time.monotonic()
    codes = asyncio.run(flood())
    took = time.monotonic() - started
    limited = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    refused = codes.count(grpc.StatusCode.PERMISSION_DENIED)
    assert refused <= ENROLL_BURST + 2, codes  # a few reached the token check...
    assert limited >= FLOOD - ENROLL_BURST - 2  # ...the rest were turned away cheaply
    assert took < 10
    after = cloud.metric("fieldline_cloud_enrollments_total", 'result="rate_limited"')
    assert after - before == limited
    assert "enrollment attempts rate-limited" in cloud.log()
    # Right after the flood the bucket is empty: a real edge is turned away too, waits (its
    # token is not spent by a refused attempt) and enrolls once the bucket refills.
    from fieldline.edge.control import enroll as edge_enroll
    from fieldline.edge.store import EdgeStore
    from fieldline.shared.config import BackoffSettings
    from fieldline.shared.schemas import NodeInfo

    monkeypatch.setattr(edge_enroll, "RATE_LIMITED_BACKOFF", BackoffSettings(initial_s=0.3))
    store = EdgeStore(tmp_path / "edge")
    try:
        cred = asyncio.run(
            edge_enroll.enroll(store, cloud=cloud.grpc, token=cloud.token(), node_info=NodeInfo())
        )
    finally:
        store.close()
    assert cred.node_id.startswith("node_")
    assert cloud.metric("fieldline_cloud_enrollments_total", 'result="rate_limited"') > after
