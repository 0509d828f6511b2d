"""The tunnel's gRPC services: enrollment, the control stream, artifact download.

The node id always comes from the caller's credential, never from a payload: with TLS from
the client certificate (checked against the one the store recorded at enrollment), without
TLS from the bearer credential in the call metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from fieldline.cloud.artifacts.blobs import BlobStore
from fieldline.cloud.desired import DesiredStateService, assigned_sha256s, desired_json_for_node
from fieldline.cloud.metrics import CloudMetrics
from fieldline.cloud.pki import CertificateAuthority, PkiError
from fieldline.cloud.store import auth as auth_store
from fieldline.cloud.store import nodes as node_store
from fieldline.cloud.store.db import Database
from fieldline.cloud.tunnel.limits import Oversize
from fieldline.cloud.tunnel.ratelimit import RateLimiter, peer_address
from fieldline.cloud.tunnel.records import RecordIngestor
from fieldline.cloud.tunnel.sessions import SessionRegistry
from fieldline.shared.clock import now_ms
from fieldline.shared.health import NodeHealth
from fieldline.shared.ids import new_id, new_secret
from fieldline.shared.proto import tunnel_pb2 as pb
from fieldline.shared.proto import tunnel_pb2_grpc as pb_grpc
from fieldline.shared.schemas import NodeInfo, ObservedState
from fieldline.shared.tls import TokenFormatError, parse_token

log = structlog.get_logger(__name__)

MAX_JSON_CHARS = 1024 * 1024
RATE_LIMIT_LOG_EVERY_S = 5.0
REFUSAL_READ_S = 2.0  # how long a refused tunnel waits for the edge's first message  # under a flood, one log line per this many seconds


class MessageTooLarge(Exception):
    """An edge sent a message above the size limit; its stream ends with RESOURCE_EXHAUSTED."""


def _node_info(text: str) -> NodeInfo:
    if len(text) > MAX_JSON_CHARS:
        raise ValueError("node info too large")
    return NodeInfo.model_validate_json(text) if text else NodeInfo()


def _bearer(context: grpc.aio.ServicerContext) -> tuple[str, str] | None:
    md = dict(context.invocation_metadata() or ())
    value = md.get("authorization", "")
    if not isinstance(value, str) or not value.startswith("Bearer "):
        return None
    node_id, _, secret = value[7:].partition(".")
    return (node_id, secret) if node_id and secret else None


def _certificate_node(context: grpc.aio.ServicerContext) -> tuple[str, str] | None:
    """(node id, certificate sha256) of the verified client certificate, if one was presented."""
    pem = context.auth_context().get("x509_pem_cert")
    if not pem:
        return None
    cert = x509.load_pem_x509_certificate(pem[0])
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return None
    der_sha = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
    return str(names[0].value), der_sha


@dataclass(frozen=True)
class Refusal:
    """Why a call is refused: the status and details it ends with."""

    code: grpc.StatusCode
    details: str


def identify(
    db: Database, context: grpc.aio.ServicerContext, *, tls: bool = False
) -> str | Refusal:
    """The calling node's id, or why it is refused (UNAUTHENTICATED, or PERMISSION_DENIED for
    a revoked node)."""
    bearer = _bearer(context)
    if tls:
        # The TLS layer has verified the chain to our CA; the store decides whether this
        # certificate is the node's current one.
        found = _certificate_node(context)
        if found is None:
            return Refusal(
                grpc.StatusCode.UNAUTHENTICATED, "the tunnel requires the node's client certificate"
            )
        node_id, cert_sha = found
        if node_store.is_revoked(db, node_id=node_id):
            return Refusal(grpc.StatusCode.PERMISSION_DENIED, f"node {node_id} is revoked")
        if not node_store.certificate_matches(db, node_id=node_id, cert_sha256=cert_sha):
            return Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                "client certificate is not the one issued to this node",
            )
        if bearer is not None and (
            bearer[0] != node_id
            or not node_store.authenticate_node(db, node_id=bearer[0], secret=bearer[1])
        ):
            return Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                "the node credential does not match the client certificate",
            )
        return node_id
    # The secret is checked first, so only the node itself learns that it was revoked.
    verdict = (
        "bad"
        if bearer is None
        else node_store.check_secret(db, node_id=bearer[0], secret=bearer[1])
    )
    if verdict == "revoked":
        assert bearer is not None
        return Refusal(grpc.StatusCode.PERMISSION_DENIED, f"node {bearer[0]} is revoked")
    if verdict != "ok":
        return Refusal(grpc.StatusCode.UNAUTHENTICATED, "unknown or wrong node credential")
    assert bearer is not None
    return bearer[0]


async def authenticate(
    db: Database, context: grpc.aio.ServicerContext, *, tls: bool = False
) -> str:
    """Return the calling node's id or abort the call with identify()'s refusal."""
    found = identify(db, context, tls=tls)
    if isinstance(found, Refusal):
        await context.abort(found.code, found.details)
    assert isinstance(found, str)
    return found


class EnrollmentService(pb_grpc.EnrollmentServicer):
    """Tokens become node credentials (and, with TLS, client certificates); rate-limited per
    client address so a flood of attempts is refused cheaply and logged."""

    def __init__(
        self,
        db: Database,
        public_key: bytes,
        metrics: CloudMetrics,
        *,
        limiter: RateLimiter | None = None,
        ca: CertificateAuthority | None = None,
        node_cert_days: int = 3650,
    ):
        self.db = db
        self.public_key = public_key
        self.metrics = metrics
        self.limiter = limiter
        self.ca = ca
        self.node_cert_days = node_cert_days
        self._limited_since_log = 0
        self._last_limit_log = 0.0

    def _rate_limited(self, peer: str) -> bool:
        if self.limiter is None or self.limiter.allow(peer):
            return False
        self.metrics.enrollments.labels("rate_limited").inc()
        self._limited_since_log += 1
        now = time.monotonic()
        if now - self._last_limit_log >= RATE_LIMIT_LOG_EVERY_S:
            log.warning(
                "enrollment attempts rate-limited",
                peer=peer,
                refused=self._limited_since_log,
                refused_total=self.limiter.refused,
            )
            self._limited_since_log = 0
            self._last_limit_log = now
        return True

    async def Enroll(
        self, request: pb.EnrollRequest, context: grpc.aio.ServicerContext
    ) -> pb.EnrollResponse:
        peer = peer_address(context.peer() or "")
        if isinstance(request, Oversize):
            self.metrics.enrollments.labels("oversize").inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(request))
        if self._rate_limited(peer):
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "too many enrollment attempts; retry later"
            )
        try:
            info = _node_info(request.node_info_json)
        except (ValidationError, ValueError):
            self.metrics.enrollments.labels("bad_request").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "node_info_json is not valid")
        try:
            token = parse_token(request.token)
        except TokenFormatError as exc:
            self.metrics.enrollments.labels("refused").inc()
            log.warning("enrollment refused", reason=str(exc), peer=peer)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        node_id = new_id("node")
        cert_pem = b""
        cert_sha: str | None = None
        if self.ca is not None:
            if not request.csr_pem:
                self.metrics.enrollments.labels("bad_request").inc()
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "this cloud uses TLS: enrollment needs a certificate signing request",
                )
            try:
                cert = self.ca.issue_node(request.csr_pem, node_id, days=self.node_cert_days)
            except PkiError as exc:
                self.metrics.enrollments.labels("bad_request").inc()
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            cert_pem = cert.public_bytes(Encoding.PEM)
            cert_sha = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
        try:
            labels = auth_store.consume_token(self.db, secret=token.secret, node_id=node_id)
        except auth_store.TokenRefused as exc:
            self.metrics.enrollments.labels("refused").inc()
            log.warning("enrollment refused", reason=str(exc), peer=peer)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        secret = new_secret()
        node_store.create_node(
            self.db,
            node_id=node_id,
            secret=secret,
            labels=labels,
            node_info=info.model_dump(),
            cert_sha256=cert_sha,
        )
        self.metrics.enrollments.labels("ok").inc()
        log.info(
            "node enrolled", node=node_id, labels=labels, hostname=info.hostname, tls=bool(cert_pem)
        )
        return pb.EnrollResponse(
            node_id=node_id,
            node_secret=secret,
            cloud_public_key=self.public_key,
            labels=labels,
            client_cert_pem=cert_pem,
        )


class TunnelService(pb_grpc.TunnelServicer):
    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        sessions: SessionRegistry,
        desired: DesiredStateService,
        records: RecordIngestor,
        metrics: CloudMetrics,
        chunk_bytes: int,
        *,
        tls: bool = False,
    ):
        self.tls = tls
        self.db = db
        self.blobs = blobs
        self.sessions = sessions
        self.desired = desired
        self.records = records
        self.metrics = metrics
        self.chunk_bytes = chunk_bytes

    async def Connect(
        self, request_iterator: AsyncIterator[pb.EdgeMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CloudMessage]:
        found = identify(self.db, context, tls=self.tls)
        if isinstance(found, Refusal):
            # Take the edge's first message (its Hello) before refusing: a refusal that
            # overtakes that write reaches the edge as a failed send (INTERNAL) instead of
            # UNAUTHENTICATED or PERMISSION_DENIED, which the edge logs and handles differently.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(anext(aiter(request_iterator)), REFUSAL_READ_S)
            await context.abort(found.code, found.details)
        assert isinstance(found, str)
        node_id = found
        session = self.sessions.open(node_id)
        self.metrics.tunnels.set(self.sessions.count())
        reader = asyncio.create_task(self._read(node_id, request_iterator, session.queue))
        log.info("tunnel open", node=node_id)
        try:
            while True:
                get = asyncio.create_task(session.queue.get())
                done, _ = await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    failure = None if reader.cancelled() else reader.exception()
                    if isinstance(failure, MessageTooLarge):
                        log.warning(
                            "tunnel closed: oversize message", node=node_id, error=str(failure)
                        )
                        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(failure))
                    if failure is not None:
                        self.metrics.tunnel_errors.labels("reader").inc()
                        log.error("tunnel reader failed", node=node_id, exc_info=failure)
                    break  # the edge closed its side, or reading failed
                msg = get.result()
                if msg.WhichOneof("body") is None:
                    if session.revoked:
                        log.warning("tunnel closed: node revoked", node=node_id)
                        await context.abort(
                            grpc.StatusCode.PERMISSION_DENIED, f"node {node_id} is revoked"
                        )
                    break  # replaced by a newer stream of the same node
                yield msg
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self.sessions.close(session)
            self.metrics.tunnels.set(self.sessions.count())
            with contextlib.suppress(node_store.NodeNotFound):
                node_store.touch_node(self.db, node_id=node_id)
            log.info("tunnel closed", node=node_id)

    async def _read(
        self,
        node_id: str,
        requests: AsyncIterator[pb.EdgeMessage],
        out: asyncio.Queue[pb.CloudMessage],
    ) -> None:
        async for msg in requests:
            if isinstance(msg, Oversize):  # never parsed (cloud/tunnel/limits.py)
                raise MessageTooLarge(str(msg))
            kind = msg.WhichOneof("body")
            try:
                replies = await self._handle(node_id, kind, msg)
            except (ValidationError, ValueError) as exc:
                # A malformed document is refused and counted; the stream stays up.
                self.metrics.tunnel_errors.labels(kind or "empty").inc()
                log.warning("tunnel message refused", node=node_id, kind=kind, error=str(exc)[:300])
                continue
            for reply in replies:
                await out.put(reply)

    async def _handle(
        self, node_id: str, kind: str | None, msg: pb.EdgeMessage
    ) -> list[pb.CloudMessage]:
        """The replies to one edge message, in order."""
        if kind == "hello":
            info = _node_info(msg.hello.node_info_json)
            node_store.touch_node(self.db, node_id=node_id, node_info=info.model_dump())
            generation, desired_json = self.desired.current_json(node_id)
            node = node_store.get_node(self.db, node_id=node_id)
            welcome = pb.Welcome(
                node_id=node_id, server_time_ms=now_ms(), synced_seq=node.synced_seq
            )
            push = pb.DesiredStatePush(generation=generation, desired_json=desired_json)
            return [pb.CloudMessage(welcome=welcome), pb.CloudMessage(desired=push)]
        if kind == "heartbeat":
            self.metrics.heartbeats.inc()
            hb = msg.heartbeat
            health = hb.health_json if 0 < len(hb.health_json) <= MAX_JSON_CHARS else None
            if health is not None:
                # Typed where rollout gates read it (models, local rollbacks); a ValueError or
                # ValidationError is counted and refused.
                NodeHealth.model_validate_json(health)
            node_store.touch_node(self.db, node_id=node_id, health_json=health)
            ack = pb.HeartbeatAck(seq=hb.seq, sent_at_ms=hb.sent_at_ms, server_time_ms=now_ms())
            return [pb.CloudMessage(heartbeat_ack=ack)]
        if kind == "observed":
            if len(msg.observed.observed_json) > MAX_JSON_CHARS:
                raise ValueError("observed state too large")
            observed = ObservedState.model_validate_json(msg.observed.observed_json)
            node_store.set_observed(
                self.db,
                node_id=node_id,
                applied_generation=observed.applied_generation,
                observed_json=observed.model_dump_json(),
            )
            return []
        if kind == "records":
            high = await asyncio.to_thread(self.records.ingest, node_id, msg.records)
            return [pb.CloudMessage(records_ack=pb.RecordsAck(high_water_seq=high))]
        raise ValueError(f"unknown message {kind!r}")

    async def FetchArtifact(
        self, request: pb.FetchArtifactRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ArtifactChunk]:
        node_id = await authenticate(self.db, context, tls=self.tls)
        if isinstance(request, Oversize):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(request))
        if request.sha256 not in assigned_sha256s(desired_json_for_node(self.db, node_id)):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, "artifact is not assigned to this node"
            )
        if not self.blobs.exists(request.sha256):
            await context.abort(grpc.StatusCode.NOT_FOUND, "artifact blob is missing in the cloud")
        total = self.blobs.size(request.sha256)
        if request.offset < 0 or request.offset > total:
            await context.abort(
                grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} outside 0..{total}"
            )
        offset = request.offset
        for block in self.blobs.read_chunks(
            request.sha256, offset=offset, chunk_bytes=self.chunk_bytes
        ):
            if self.sessions.is_revoked(node_id):
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"node {node_id} is revoked")
            yield pb.ArtifactChunk(offset=offset, data=block, total_size=total)
            self.metrics.bytes_sent.inc(len(block))
            offset += len(block)
