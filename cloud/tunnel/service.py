"""The tunnel's control stream (Connect) and artifact download (FetchArtifact).

Each edge message is handled on its own: a malformed or oversized document is refused and
counted (`tunnel_errors` by message kind) and the stream stays up; a gRPC message above the
size limit ends the stream with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import structlog

from fieldline.cloud.artifacts.blobs import BlobStore
from fieldline.cloud.desired import DesiredStateService, assigned_sha256s, desired_json_for_node
from fieldline.cloud.metrics import CloudMetrics
from fieldline.cloud.store import nodes as node_store
from fieldline.cloud.store import records as record_store
from fieldline.cloud.store.db import Database
from fieldline.cloud.tunnel.auth import Refusal, authenticate, identify
from fieldline.cloud.tunnel.enrollment import node_info
from fieldline.cloud.tunnel.limits import Oversize, parse_document
from fieldline.cloud.tunnel.records import RecordIngestor
from fieldline.cloud.tunnel.sessions import Session, SessionRegistry
from fieldline.shared.clock import now_ms
from fieldline.shared.health import NodeHealth
from fieldline.shared.proto import tunnel_pb2 as pb
from fieldline.shared.proto import tunnel_pb2_grpc as pb_grpc
from fieldline.shared.schemas import ObservedState

log = structlog.get_logger(__name__)

REFUSAL_READ_S = 2.0  # how long a refused tunnel waits for the edge's first message


class MessageTooLarge(Exception):
    """An edge sent a message above the size limit; its stream ends with RESOURCE_EXHAUSTED."""


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
            async for msg in self._outgoing(node_id, session, reader, context):
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

    async def _outgoing(
        self,
        node_id: str,
        session: Session,
        reader: asyncio.Task[None],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.CloudMessage]:
        """The session's queued messages, until the edge closes, reading fails, a newer
        stream of the node replaces this one, or the node is revoked."""
        while True:
            get = asyncio.create_task(session.queue.get())
            done, _ = await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                failure = None if reader.cancelled() else reader.exception()
                if isinstance(failure, MessageTooLarge):
                    log.warning("tunnel closed: oversize message", node=node_id, error=str(failure))
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(failure))
                if failure is not None:
                    self.metrics.tunnel_errors.labels("reader").inc()
                    log.error("tunnel reader failed", node=node_id, exc_info=failure)
                return
            msg = get.result()
            if msg.WhichOneof("body") is None:
                if session.revoked:
                    log.warning("tunnel closed: node revoked", node=node_id)
                    await context.abort(
                        grpc.StatusCode.PERMISSION_DENIED, f"node {node_id} is revoked"
                    )
                return
            yield msg

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
            except ValueError as exc:  # pydantic's ValidationError is one
                # A malformed document is refused and counted; the stream stays up.
                self.metrics.tunnel_errors.labels(kind or "empty").inc()
                log.warning("tunnel message refused", node=node_id, kind=kind, error=str(exc)[:300])
                continue
            for reply in replies:
                await out.put(reply)

    async def _handle(
        self, node_id: str, kind: str | None, msg: pb.EdgeMessage
    ) -> list[pb.CloudMessage]:
        """The replies to one edge message, in order; ValueError refuses the message."""
        if kind == "hello":
            return self._hello(node_id, msg.hello)
        if kind == "heartbeat":
            return self._heartbeat(node_id, msg.heartbeat)
        if kind == "observed":
            observed = parse_document(ObservedState, msg.observed.observed_json, "observed state")
            node_store.set_observed(self.db, node_id=node_id, observed=observed)
            return []
        if kind == "records":
            done = await asyncio.to_thread(self.records.ingest, node_id, msg.records)
            ack = pb.RecordsAck(
                high_water_seq=done.high_water_seq,
                epoch=msg.records.epoch,
                refused=done.refused,
                batch_top=done.batch_top,
                batch_id=msg.records.batch_id,
            )
            return [pb.CloudMessage(records_ack=ack)]
        raise ValueError(f"unknown message {kind!r}")

    def _hello(self, node_id: str, hello: pb.Hello) -> list[pb.CloudMessage]:
        node_store.touch_node(self.db, node_id=node_id, node_info=node_info(hello.node_info_json))
        generation, desired_json = self.desired.current_json(node_id)
        mark = record_store.start_epoch(self.db, node_id=node_id, epoch=hello.epoch)
        welcome = pb.Welcome(
            node_id=node_id, server_time_ms=now_ms(), synced_seq=mark, epoch=hello.epoch
        )
        push = pb.DesiredStatePush(generation=generation, desired_json=desired_json)
        return [pb.CloudMessage(welcome=welcome), pb.CloudMessage(desired=push)]

    def _heartbeat(self, node_id: str, hb: pb.Heartbeat) -> list[pb.CloudMessage]:
        self.metrics.heartbeats.inc()
        # An empty health says nothing new; a malformed or oversized one refuses the heartbeat.
        health = parse_document(NodeHealth, hb.health_json, "health") if hb.health_json else None
        node_store.touch_node(self.db, node_id=node_id, health=health)
        ack = pb.HeartbeatAck(seq=hb.seq, sent_at_ms=hb.sent_at_ms, server_time_ms=now_ms())
        return [pb.CloudMessage(heartbeat_ack=ack)]

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
