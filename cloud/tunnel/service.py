"""The tunnel's gRPC services: enrollment, the control stream, artifact download.

The node id always comes from the credential in the call metadata, never from a payload.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import structlog
from pydantic import ValidationError

from fieldline.cloud.blobs import BlobStore
from fieldline.cloud.desired import DesiredStateService, assigned_sha256s, desired_json_for_node
from fieldline.cloud.metrics import CloudMetrics
from fieldline.cloud.records import RecordIngestor
from fieldline.cloud.sessions import SessionRegistry
from fieldline.cloud.store import auth as auth_store
from fieldline.cloud.store import nodes as node_store
from fieldline.cloud.store.db import Database
from fieldline.shared.clock import now_ms
from fieldline.shared.ids import new_id, new_secret
from fieldline.shared.proto import tunnel_pb2 as pb
from fieldline.shared.proto import tunnel_pb2_grpc as pb_grpc
from fieldline.shared.schemas import NodeHealth, NodeInfo, ObservedState

log = structlog.get_logger(__name__)

MAX_JSON_CHARS = 1024 * 1024


def _node_info(text: str) -> NodeInfo:
    if len(text) > MAX_JSON_CHARS:
        raise ValueError("node info too large")
    return NodeInfo.model_validate_json(text) if text else NodeInfo()


async def authenticate(db: Database, context: grpc.aio.ServicerContext) -> str:
    """Return the calling node's id or abort the call with UNAUTHENTICATED."""
    md = dict(context.invocation_metadata() or ())
    value = md.get("authorization", "")
    token = value[7:] if value.startswith("Bearer ") else ""
    node_id, _, secret = token.partition(".")
    if (
        not node_id
        or not secret
        or not node_store.authenticate_node(db, node_id=node_id, secret=secret)
    ):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown or wrong node credential")
    return node_id


class EnrollmentService(pb_grpc.EnrollmentServicer):
    def __init__(self, db: Database, public_key: bytes, metrics: CloudMetrics):
        self.db = db
        self.public_key = public_key
        self.metrics = metrics

    async def Enroll(
        self, request: pb.EnrollRequest, context: grpc.aio.ServicerContext
    ) -> pb.EnrollResponse:
        try:
            info = _node_info(request.node_info_json)
        except (ValidationError, ValueError):
            self.metrics.enrollments.labels("bad_request").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "node_info_json is not valid")
        node_id = new_id("node")
        try:
            labels = auth_store.consume_token(self.db, secret=request.token, node_id=node_id)
        except auth_store.TokenRefused as exc:
            self.metrics.enrollments.labels("refused").inc()
            log.warning("enrollment refused", reason=str(exc))
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        secret = new_secret()
        node_store.create_node(
            self.db, node_id=node_id, secret=secret, labels=labels, node_info=info.model_dump()
        )
        self.metrics.enrollments.labels("ok").inc()
        log.info("node enrolled", node=node_id, labels=labels, hostname=info.hostname)
        return pb.EnrollResponse(
            node_id=node_id, node_secret=secret, cloud_public_key=self.public_key, labels=labels
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
    ):
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
        node_id = await authenticate(self.db, context)
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
                    if not reader.cancelled() and reader.exception() is not None:
                        self.metrics.tunnel_errors.labels("reader").inc()
                        log.error("tunnel reader failed", node=node_id, exc_info=reader.exception())
                    break  # the edge closed its side, or reading failed
                msg = get.result()
                if msg.WhichOneof("body") is None:
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
        node_id = await authenticate(self.db, context)
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
            yield pb.ArtifactChunk(offset=offset, data=block, total_size=total)
            self.metrics.bytes_sent.inc(len(block))
            offset += len(block)
