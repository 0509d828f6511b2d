"""Enrollment: exchange a single-use token for the node credential and the cloud's public key,
once; with TLS also for a client certificate, after pinning the cloud's CA from the token.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import grpc
import structlog

from fieldline.edge.control.backoff import Backoff
from fieldline.edge.control.identity import (
    NodeTls,
    PinError,
    cert_matches_key,
    channel_credentials,
    channel_options,
    check_ca_file,
    fetch_pinned_ca,
    new_key_and_csr,
)
from fieldline.edge.store import Credential, EdgeStore
from fieldline.shared.config import BackoffSettings
from fieldline.shared.proto import tunnel_pb2 as pb
from fieldline.shared.proto import tunnel_pb2_grpc as pb_grpc
from fieldline.shared.schemas import NodeInfo
from fieldline.shared.tls import TokenFormatError, parse_token

log = structlog.get_logger(__name__)

ENROLL_TIMEOUT_S = 30.0
# A cloud that rate-limits enrollment (many gateways behind one address, all installed at once)
# answers RESOURCE_EXHAUSTED before it looks at the token, so the same token is tried again with
# jittered backoff for up to this long.
RATE_LIMITED_RETRY_S = 600.0
RATE_LIMITED_BACKOFF = BackoffSettings(initial_s=1.0, max_s=30.0)


class EnrollmentError(Exception):
    """The cloud refused the token, or could not be reached; the message says which."""


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise EnrollmentError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


async def enroll(
    store: EdgeStore,
    *,
    cloud: str,
    token: str,
    node_info: NodeInfo,
    enroll_address: str | None = None,
    ca_file: Path | None = None,
    server_name: str | None = None,
) -> Credential:
    """Enroll unless a credential is already stored (then it is returned as it is).

    A token with a CA pin (or a given CA file) enrolls over TLS: the pinned CA is kept, a key
    is made here and only its CSR is sent; the answer's certificate is the tunnel's identity.
    """
    existing = store.credential()
    if existing is not None:
        return existing
    try:
        tok = parse_token(token)
    except TokenFormatError as exc:
        raise EnrollmentError(str(exc)) from exc
    host, _ = _host_port(cloud)
    ca_pem: bytes | None = None
    target = cloud
    if tok.ca_pin is not None or ca_file is not None:
        if enroll_address is None and tok.enroll_port is None:
            raise EnrollmentError("the token names no enrollment port: give --enroll HOST:PORT")
        target = enroll_address or f"{host}:{tok.enroll_port}"
        e_host, e_port = _host_port(target)
        try:
            if ca_file is not None:
                ca_pem = check_ca_file(ca_file.read_bytes(), tok.ca_pin)
            else:
                assert tok.ca_pin is not None
                ca_pem = await asyncio.to_thread(fetch_pinned_ca, e_host, e_port, tok.ca_pin)
        except OSError as exc:
            raise EnrollmentError(f"cannot read {ca_file}: {exc.strerror}") from exc
        except PinError as exc:
            raise EnrollmentError(f"enrollment refused: {exc}") from exc
    key_pem, csr_pem = new_key_and_csr(socket.gethostname()) if ca_pem else (b"", b"")
    request = pb.EnrollRequest(
        token=tok.secret, node_info_json=node_info.model_dump_json(), csr_pem=csr_pem
    )
    channel = (
        grpc.aio.secure_channel(
            target, channel_credentials(ca_pem), options=channel_options(server_name)
        )
        if ca_pem
        else grpc.aio.insecure_channel(target)
    )
    async with channel:
        resp = await _enroll_call(pb_grpc.EnrollmentStub(channel), request, target)
    if len(resp.cloud_public_key) != 32:
        raise EnrollmentError("the cloud sent a public key that is not a raw Ed25519 key")
    tls: NodeTls | None = None
    if ca_pem:
        cert_pem = bytes(resp.client_cert_pem)
        if not cert_pem or not cert_matches_key(cert_pem, key_pem):
            raise EnrollmentError("the cloud sent no client certificate for this node's key")
        tls = NodeTls(ca_pem, cert_pem, key_pem)
    cred = Credential(resp.node_id, resp.node_secret, bytes(resp.cloud_public_key))
    store.save_credential(cred, cloud=cloud, labels=dict(resp.labels), tls=tls)
    return cred


async def _enroll_call(
    stub: pb_grpc.EnrollmentStub, request: pb.EnrollRequest, target: str
) -> pb.EnrollResponse:
    """One Enroll call, tried again while the cloud says it is rate-limiting (the token is not
    spent by a rate-limited attempt)."""
    backoff = Backoff(RATE_LIMITED_BACKOFF)
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + RATE_LIMITED_RETRY_S
    while True:
        try:
            return await stub.Enroll(request, timeout=ENROLL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED and loop.time() < give_up_at:
                delay = backoff.next_delay()
                log.warning("enrollment rate-limited by the cloud; trying again", in_s=delay)
                await asyncio.sleep(delay)
                continue
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise EnrollmentError(
                    f"cannot reach the cloud at {target}: {exc.details()}"
                ) from exc
            raise EnrollmentError(f"enrollment refused: {exc.details()}") from exc
