"""The edge's end of the tunnel: one dialed-out gRPC channel, the control stream, artifact fetches.

Reconnects forever with jittered exponential backoff; messages for the cloud go through a
queue that only exists while a stream is up, so nothing is sent into a dead stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import structlog

from fieldline.edge.control.backoff import Backoff
from fieldline.edge.control.identity import NodeTls, channel_credentials, channel_options
from fieldline.edge.store import Credential
from fieldline.shared.clock import monotonic_ms, now_ms
from fieldline.shared.config import EdgeSettings
from fieldline.shared.health import TunnelHealth
from fieldline.shared.limits import MAX_TUNNEL_MESSAGE_BYTES
from fieldline.shared.proto import tunnel_pb2 as pb
from fieldline.shared.proto import tunnel_pb2_grpc as pb_grpc
from fieldline.shared.schemas import NodeInfo

log = structlog.get_logger(__name__)

OUTGOING_QUEUE = 1024
FETCH_TIMEOUT_S = 3600.0
KEEPALIVE_TIMEOUT_S = 10.0  # gRPC's keepalive ping timeout, and the silence check's margin
SILENCE_CHECK_S = 1.0  # how often a connected stream checks when it last heard the cloud
# The control stream carries record batches: gzip them (JSON readings shrink several times).
# FetchArtifact stays uncompressed: model bytes do not shrink and chunks would cost CPU.
STREAM_COMPRESSION = grpc.Compression.Gzip


class TunnelSilent(Exception):
    """The stream heard nothing from the cloud for too long (a blackholed link): reconnect."""


class TunnelClient:
    """Owns the channel to the cloud; run() keeps the control stream up until stop()."""

    def __init__(
        self,
        settings: EdgeSettings,
        cloud: str,
        credential: Credential,
        node_info: NodeInfo,
        *,
        on_desired: Callable[[pb.DesiredStatePush], Awaitable[None]],
        on_connected: Callable[[], Awaitable[None]] | None = None,
        applied_generation: Callable[[], int] = lambda: 0,
        tls: NodeTls | None = None,
    ):
        self.cloud = cloud
        self.node_info = node_info
        self.on_desired = on_desired
        self.on_connected = on_connected
        self.applied_generation = applied_generation
        # Hooks for the data plane: the outbox epoch Hello names, the cloud's record mark on
        # each Welcome (sync restarts from it), and each RecordsAck's (mark, epoch, batch id).
        self.records_epoch: Callable[[], int] = lambda: 0
        self.on_records_welcome: Callable[[int], Awaitable[None]] | None = None
        self.on_records_ack: Callable[[int, int, int], Awaitable[None]] | None = None  # id
        self.connected = False
        self.last_rtt_ms: float | None = None
        self._backoff = Backoff(settings.reconnect)
        self._out: asyncio.Queue[pb.EdgeMessage] | None = None
        self._heartbeat_seq = 0
        self._sent_at: dict[int, float] = {}
        self._stopping = asyncio.Event()
        # A stream that hears nothing (no heartbeat ack, no message) for this long is dead even
        # if its socket looks open (a blackholed link): gRPC's own keepalive can take minutes
        # to say so while heartbeats are being written into it.
        self.silence_s = max(settings.keepalive_s, 2 * settings.heartbeat_interval_s)
        self.silence_s += KEEPALIVE_TIMEOUT_S
        self._heard_at = 0.0
        keepalive_ms = int(settings.keepalive_s * 1000)
        options: list[tuple[str, int | str]] = [
            ("grpc.keepalive_time_ms", keepalive_ms),
            ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_receive_message_length", MAX_TUNNEL_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_TUNNEL_MESSAGE_BYTES),
        ]
        if tls is not None:  # mutual TLS: the cloud knows this node by its certificate
            self._channel = grpc.aio.secure_channel(
                cloud,
                channel_credentials(tls.ca_pem, tls),
                options=[*options, *channel_options(settings.tls_server_name)],
            )
        else:
            self._channel = grpc.aio.insecure_channel(cloud, options=options)
        self._stub = pb_grpc.TunnelStub(self._channel)
        self._metadata = (("authorization", credential.bearer),)

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._session()
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    log.error("the cloud refused this node's credential", details=exc.details())
                elif exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                    # Revoked: local work goes on; only a new enrollment brings the tunnel back.
                    log.error("the cloud refused this node", details=exc.details())
                else:
                    log.warning("tunnel down", code=exc.code().name, details=exc.details())
            except TunnelSilent as exc:
                log.warning("tunnel silent; reconnecting", reason=str(exc))
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the reconnect loop die; log and retry
                log.exception("tunnel session failed")
            finally:
                if self.connected:
                    log.info("tunnel disconnected")
                self.connected = False
                self._out = None
            if self._stopping.is_set():
                break
            delay = self._backoff.next_delay()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def stop(self) -> None:
        self._stopping.set()
        await self._channel.close(grace=None)

    async def _session(self) -> None:
        out: asyncio.Queue[pb.EdgeMessage] = asyncio.Queue(OUTGOING_QUEUE)

        async def requests() -> AsyncIterator[pb.EdgeMessage]:
            yield pb.EdgeMessage(
                hello=pb.Hello(
                    node_info_json=self.node_info.model_dump_json(),
                    applied_generation=self.applied_generation(),
                    epoch=self.records_epoch(),
                )
            )
            while True:
                yield await out.get()

        call = self._stub.Connect(
            requests(), metadata=self._metadata, compression=STREAM_COMPRESSION
        )
        self._heard_at = time.monotonic()
        watchdog = asyncio.create_task(self._watch_silence(call))
        try:
            await self._read(call, out)
        except asyncio.CancelledError:
            if watchdog.done() and not watchdog.cancelled() and watchdog.result():
                raise TunnelSilent(f"nothing from the cloud for {self.silence_s:.0f} s") from None
            raise
        finally:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog

    async def _watch_silence(self, call: grpc.aio.StreamStreamCall) -> bool:
        """End the stream (True) when the cloud has said nothing for silence_s (see __init__)."""
        while True:
            await asyncio.sleep(SILENCE_CHECK_S)
            if time.monotonic() - self._heard_at > self.silence_s:
                return bool(call.cancel())

    async def _read(
        self, call: grpc.aio.StreamStreamCall, out: asyncio.Queue[pb.EdgeMessage]
    ) -> None:
        async for msg in call:
            self._heard_at = time.monotonic()
            kind = msg.WhichOneof("body")
            if kind == "welcome":
                # Sync learns the cloud's mark before it can send on this stream.
                if self.on_records_welcome is not None:
                    await self.on_records_welcome(msg.welcome.synced_seq)
                self._out = out
                self.connected = True
                self._backoff.reset()
                log.info("tunnel connected", cloud=self.cloud, node=msg.welcome.node_id)
                if self.on_connected is not None:
                    await self.on_connected()
            elif kind == "desired":
                await self.on_desired(msg.desired)
            elif kind == "heartbeat_ack":
                sent = self._sent_at.pop(msg.heartbeat_ack.seq, None)
                if sent is not None:
                    self.last_rtt_ms = monotonic_ms() - sent
            elif kind == "records_ack" and self.on_records_ack is not None:
                ack = msg.records_ack
                await self.on_records_ack(ack.high_water_seq, ack.epoch, ack.batch_id)

    def health(self) -> TunnelHealth:
        """Whether a stream is up, and the last heartbeat's round trip."""
        return TunnelHealth(connected=self.connected, rtt_ms=self.last_rtt_ms)

    def send(self, msg: pb.EdgeMessage) -> bool:
        """Queue a message for the cloud; False when no stream is up (the caller retries later)."""
        out = self._out
        if out is None:
            return False
        try:
            out.put_nowait(msg)
        except asyncio.QueueFull:
            return False
        return True

    def heartbeat(self, health_json: str = "") -> None:
        self._heartbeat_seq += 1
        seq = self._heartbeat_seq
        beat = pb.Heartbeat(seq=seq, sent_at_ms=now_ms(), health_json=health_json)
        if self.send(pb.EdgeMessage(heartbeat=beat)):
            self._sent_at = {k: v for k, v in self._sent_at.items() if k > seq - 16}
            self._sent_at[seq] = monotonic_ms()

    async def fetch(self, sha256: str, offset: int) -> AsyncIterator[bytes]:
        """Artifact bytes from `offset` on (raises grpc.aio.AioRpcError on refusal or a cut)."""
        call = self._stub.FetchArtifact(
            pb.FetchArtifactRequest(sha256=sha256, offset=offset),
            metadata=self._metadata,
            timeout=FETCH_TIMEOUT_S,
        )
        async for chunk in call:
            yield chunk.data
