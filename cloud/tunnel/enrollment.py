"""Enrollment: a single-use token becomes a node credential (and, with TLS, a client certificate).

Rate-limited per client address and overall, so a flood of attempts is refused cheaply, logged
once per interval and counted.
"""

from __future__ import annotations

import hashlib
import time

import grpc
import structlog
from cryptography.hazmat.primitives.serialization import Encoding

from fieldline.cloud.metrics import CloudMetrics
from fieldline.cloud.pki import CertificateAuthority, PkiError
from fieldline.cloud.store import audit as audit_store
from fieldline.cloud.store import auth as auth_store
from fieldline.cloud.store import nodes as node_store
from fieldline.cloud.store.db import Database
from fieldline.cloud.tunnel.limits import Oversize, parse_document
from fieldline.cloud.tunnel.ratelimit import RateLimiter, peer_address
from fieldline.shared.ids import new_id, new_secret
from fieldline.shared.proto import tunnel_pb2 as pb
from fieldline.shared.proto import tunnel_pb2_grpc as pb_grpc
from fieldline.shared.schemas import NodeInfo
from fieldline.shared.tls import TokenFormatError, parse_token

log = structlog.get_logger(__name__)

RATE_LIMIT_LOG_EVERY_S = 5.0  # under a flood, one log line per this many seconds


def node_info(text: str) -> NodeInfo:
    """What an edge says about itself (empty text: nothing said)."""
    return parse_document(NodeInfo, text, "node info") if text else NodeInfo()


class EnrollmentService(pb_grpc.EnrollmentServicer):
    def __init__(
        self,
        db: Database,
        public_key: bytes,
        metrics: CloudMetrics,
        *,
        limiter: RateLimiter | None = None,
        ca: CertificateAuthority | None = None,
        node_cert_days: int = 3650,
        audit_keep: int = 100_000,
    ):
        self.db = db
        self.public_key = public_key
        self.metrics = metrics
        self.limiter = limiter
        self.ca = ca
        self.node_cert_days = node_cert_days
        self.audit_keep = audit_keep
        self._limited_since_log = 0
        self._last_limit_log = 0.0

    def _audit(self, who: str, status: int, detail: str) -> None:
        """Enrollments, granted or refused, go to the admin audit trail (role "node")."""
        try:
            audit_store.record(
                self.db,
                key_id=who,
                role="node",
                method="Enroll",
                path="/fieldline.v1.Enrollment/Enroll",
                status=status,
                detail=detail,
                keep=self.audit_keep,
            )
        except Exception:  # the enrollment's own outcome stands; the lost row is logged
            log.exception("audit record failed", who=who)
            self.metrics.audit_failures.inc()

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

    async def _certificate(
        self, request: pb.EnrollRequest, node_id: str, context: grpc.aio.ServicerContext
    ) -> tuple[bytes, str | None]:
        """(certificate PEM, its sha256) issued for the node's CSR; nothing without TLS."""
        if self.ca is None:
            return b"", None
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
        return cert.public_bytes(Encoding.PEM), hashlib.sha256(
            cert.public_bytes(Encoding.DER)
        ).hexdigest()

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
            info = node_info(request.node_info_json)
        except ValueError:  # pydantic's ValidationError too
            self.metrics.enrollments.labels("bad_request").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "node_info_json is not valid")
        try:
            token = parse_token(request.token)
        except TokenFormatError as exc:
            self.metrics.enrollments.labels("refused").inc()
            log.warning("enrollment refused", reason=str(exc), peer=peer)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        node_id = new_id("node")
        cert_pem, cert_sha = await self._certificate(request, node_id, context)
        try:
            labels = auth_store.consume_token(self.db, secret=token.secret, node_id=node_id)
        except auth_store.TokenRefused as exc:
            self.metrics.enrollments.labels("refused").inc()
            log.warning("enrollment refused", reason=str(exc), peer=peer)
            self._audit(exc.token_id or "unknown token", 403, f"{exc} (peer {peer})")
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        secret = new_secret()
        node_store.create_node(
            self.db,
            node_id=node_id,
            secret=secret,
            labels=labels,
            node_info=info,
            cert_sha256=cert_sha,
        )
        self.metrics.enrollments.labels("ok").inc()
        self._audit(node_id, 200, f"enrolled (peer {peer})")
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
