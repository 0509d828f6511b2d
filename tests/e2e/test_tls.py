"""TLS on the tunnel, against real processes: pinned enrollment, mutual TLS, refusals, revocation.

The cloud runs `fieldline cloud serve --tls` (a minted CA); edges are real `fieldline edge run`
processes or, where a test needs to present someone else's certificate, the edge's own
enrollment code driving a real grpc.aio channel.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509

from fieldline.cloud.pki import CertificateAuthority
from fieldline.edge.control.enroll import EnrollmentError, enroll
from fieldline.edge.control.identity import NodeTls, channel_credentials, new_key_and_csr
from fieldline.edge.store import EdgeStore
from fieldline.shared.proto import tunnel_pb2 as pb
from fieldline.shared.proto import tunnel_pb2_grpc as pb_grpc
from fieldline.shared.schemas import NodeInfo
from fieldline.shared.tls import cert_pin, parse_token
from tests.e2e.conftest import Fleet, edge_status, wait_until

REVOKE_CLOSE_S = 5.0


def _token(fleet: Fleet, labels: dict[str, str]) -> str:
    with fleet.admin() as admin:
        return str(admin.create_token(labels)["token"])


def _enroll_here(fleet: Fleet, data: Path, token: str) -> tuple[EdgeStore, str]:
    store = EdgeStore(data)
    cred = asyncio.run(
        enroll(
            store,
            cloud=f"127.0.0.1:{fleet.ports['grpc']}",
            token=token,
            node_info=NodeInfo(hostname=data.name),
        )
    )
    return store, cred.node_id


async def _connect(
    target: str, tls: NodeTls | None, bearer: str | None, ca_pem: bytes | None = None
) -> pb.CloudMessage:
    """Open the control stream, say hello, return the Welcome (or raise AioRpcError)."""
    if tls is None and ca_pem is None:
        channel = grpc.aio.insecure_channel(target)
    else:
        channel = grpc.aio.secure_channel(target, channel_credentials(ca_pem or b"", tls))
    async with channel:

        async def requests():  # type: ignore[no-untyped-def]
            yield pb.EdgeMessage(hello=pb.Hello(node_info_json="{}"))
            await asyncio.sleep(10)

        md = (("authorization", bearer),) if bearer else ()
        call = pb_grpc.TunnelStub(channel).Connect(requests(), metadata=md, timeout=10)
        async for msg in call:
            if msg.WhichOneof("body") == "welcome":
                call.cancel()
                return msg
    raise AssertionError("stream ended without a welcome")


def test_edge_enrolls_over_tls_with_pinned_ca(tls_fleet: Fleet) -> None:
    token = _token(tls_fleet, {"line": "a"})
    parsed = parse_token(token)
    ca = x509.load_pem_x509_certificate((tls_fleet.root / "cloud" / "tls" / "ca.crt").read_bytes())
    assert parsed.ca_pin == cert_pin(ca)
    assert parsed.enroll_port == tls_fleet.ports["enroll"]
    tls_fleet.start_edge("edge-a", token)
    wait_until(lambda: tls_fleet.node_of("edge-a")["online"], 30, "the edge to connect over mTLS")
    node = tls_fleet.node_of("edge-a")
    assert node["tls"] is True and node["applied_generation"] == node["desired_generation"]
    store = EdgeStore(tls_fleet.root / "edge-a", read_only=True)
    try:
        identity = store.node_tls()
        assert identity is not None
        assert x509.load_pem_x509_certificate(identity.ca_pem) == ca
        cert = x509.load_pem_x509_certificate(identity.cert_pem)
        assert cert.subject.rfc4514_string() == f"CN={node['id']}"
    finally:
        store.close()
    # The admin API is HTTPS now: plain HTTP and an unverified client get nowhere.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{tls_fleet.ports['http']}/healthz", timeout=5)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"https://127.0.0.1:{tls_fleet.ports['http']}/healthz", timeout=5)


def test_wrong_ca_pin_is_refused_and_sends_nothing(tls_fleet: Fleet, tmp_path: Path) -> None:
    token = parse_token(_token(tls_fleet, {"line": "a"}))
    other = CertificateAuthority.load_or_create(tmp_path / "other-ca")
    forged = f"{token.secret}.{cert_pin(other.cert)}.{token.enroll_port}"
    child = tls_fleet.start_edge("edge-x", forged)
    assert child.proc is not None and child.proc.wait(60) == 2
    assert "no certificate matching the token's CA pin" in child.log_path.read_text()
    assert edge_status(tls_fleet.root / "edge-x")["node_id"] is None
    # The secret never reached the cloud: the same token with the right pin still enrolls.
    store, node_id = _enroll_here(tls_fleet, tmp_path / "edge-y", str(token))
    store.close()
    assert node_id.startswith("node_")


def test_plain_text_clients_are_refused(tls_fleet: Fleet, tmp_path: Path) -> None:
    token = parse_token(_token(tls_fleet, {"line": "a"}))

    async def plain_enroll(port: int) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            await pb_grpc.EnrollmentStub(ch).Enroll(
                pb.EnrollRequest(token=token.secret, node_info_json="{}"), timeout=10
            )

    for port in (tls_fleet.ports["enroll"], tls_fleet.ports["grpc"]):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            asyncio.run(plain_enroll(port))
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    # An edge given the bare secret (no pin) talks plain gRPC and is refused too.
    child = tls_fleet.start_edge("edge-plain", token.secret)
    assert child.proc is not None and child.proc.wait(60) == 2
    assert "cannot reach the cloud" in child.log_path.read_text()
    # The token survived all of it.
    store, _ = _enroll_here(tls_fleet, tmp_path / "edge-ok", str(token))
    store.close()


def test_tunnel_requires_the_nodes_own_certificate(tls_fleet: Fleet, tmp_path: Path) -> None:
    store_a, node_a = _enroll_here(tls_fleet, tmp_path / "a", _token(tls_fleet, {"n": "a"}))
    store_b, node_b = _enroll_here(tls_fleet, tmp_path / "b", _token(tls_fleet, {"n": "b"}))
    tls_a, tls_b = store_a.node_tls(), store_b.node_tls()
    cred_a, cred_b = store_a.credential(), store_b.credential()
    store_a.close()
    store_b.close()
    assert tls_a and tls_b and cred_a and cred_b
    target = f"127.0.0.1:{tls_fleet.ports['grpc']}"

    # Each node with its own certificate (and its own bearer) gets in.
    assert asyncio.run(_connect(target, tls_a, cred_a.bearer)).welcome.node_id == node_a
    assert asyncio.run(_connect(target, tls_b, None)).welcome.node_id == node_b
    # No client certificate: the TLS handshake fails.
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        asyncio.run(_connect(target, None, cred_a.bearer, ca_pem=tls_a.ca_pem))
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    # Node B's certificate with node A's credential: refused, the identities differ.
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        asyncio.run(_connect(target, tls_b, cred_a.bearer))
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # A certificate our CA signed for node A, but not the one issued at enrollment
    # (as if the CA key leaked): the store does not know it.
    ca = CertificateAuthority.load_or_create(tls_fleet.root / "cloud" / "tls")
    key_pem, csr_pem = new_key_and_csr("forged")
    forged = ca.issue_node(csr_pem, node_a, days=1)
    from cryptography.hazmat.primitives.serialization import Encoding

    forged_tls = NodeTls(tls_a.ca_pem, forged.public_bytes(Encoding.PEM), key_pem)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        asyncio.run(_connect(target, forged_tls, None))
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not the one issued" in (exc.value.details() or "")
    # A certificate from another CA: the handshake fails.
    other = CertificateAuthority.load_or_create(tmp_path / "other-ca")
    key_pem, csr_pem = new_key_and_csr("stranger")
    stranger = other.issue_node(csr_pem, node_a, days=1).public_bytes(Encoding.PEM)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        asyncio.run(_connect(target, NodeTls(tls_a.ca_pem, stranger, key_pem), None))
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE


def test_revoked_node_is_refused_and_its_tunnel_closes(tls_fleet: Fleet) -> None:
    tls_fleet.enroll_edge("edge-a", {"line": "a"})
    wait_until(lambda: tls_fleet.node_of("edge-a")["online"], 30, "the edge to connect")
    node_id = tls_fleet.node_of("edge-a")["id"]
    with tls_fleet.admin() as admin:
        started = time.monotonic()
        revoked = admin.revoke_node(node_id)
        assert revoked["revoked_at"] is not None

        def closed() -> bool:
            return not admin.get_node(node_id)["online"]

        wait_until(closed, REVOKE_CLOSE_S, "the revoked node's tunnel to close", poll_s=0.05)
        took = time.monotonic() - started
        print(f"revoked node's tunnel closed {took * 1000:.0f} ms after the API call")
        assert took < REVOKE_CLOSE_S, took
        # It stays out: the edge keeps retrying and is refused every time.
        time.sleep(2.0)
        assert not admin.get_node(node_id)["online"]
    log = tls_fleet.edges["edge-a"].log_path.read_text()
    assert "is revoked" in log
    store = EdgeStore(tls_fleet.root / "edge-a", read_only=True)
    try:
        identity, cred = store.node_tls(), store.credential()
    finally:
        store.close()
    assert identity and cred
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        asyncio.run(_connect(f"127.0.0.1:{tls_fleet.ports['grpc']}", identity, cred.bearer))
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_enrollment_error_for_a_malformed_token(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path / "e")
    try:
        with pytest.raises(EnrollmentError, match="malformed"):
            asyncio.run(
                enroll(
                    store,
                    cloud="127.0.0.1:1",
                    token="flt_" + "a" * 43 + ".x.1",
                    node_info=NodeInfo(),
                )
            )
    finally:
        store.close()
