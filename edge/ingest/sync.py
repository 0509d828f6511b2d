"""Sync back: ship outbox batches over the tunnel in sequence order, one batch in flight at a time.

The cloud stores records idempotently by (node, seq) and acks a high-water mark; rows at or
below it are marked synced here and pruned by the retention policy. After a reconnect the
cloud's Welcome carries its mark, so sending resumes exactly after what it already has.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from fieldline.shared.policy import Retention
from fieldline.shared.proto import tunnel_pb2 as pb

log = structlog.get_logger(__name__)

BATCH_RECORDS = 2000
BATCH_BYTES = 4 * 1024 * 1024
ACK_TIMEOUT_S = 30.0


class OutboxLike(Protocol):
    def read_batch(self, after_seq: int, limit: int) -> list[Any]: ...
    def mark_synced(self, high_water_seq: int) -> None: ...
    def prune(self, retention: Retention) -> Any: ...
    def stats(self) -> Any: ...


class OutboxSync:
    """run_once() is the scheduled job; on_ack() is the tunnel's records hook."""

    def __init__(
        self,
        outbox: OutboxLike,
        send: Callable[[pb.EdgeMessage], bool],
        retention: Callable[[], Retention],
    ):
        self.outbox = outbox
        self.send = send
        self.retention = retention
        self.acked_seq = 0
        self.records_sent = 0
        self.last_ack_ms: float | None = None
        self._inflight_top: int | None = None
        self._ack = asyncio.Event()
        self._lock = asyncio.Lock()

    async def on_ack(self, high_water_seq: int) -> None:
        """The cloud has everything up to high_water_seq (from a Welcome or a RecordsAck)."""
        if high_water_seq > self.acked_seq:
            self.acked_seq = high_water_seq
            await asyncio.to_thread(self.outbox.mark_synced, high_water_seq)
        elif high_water_seq < self.acked_seq:
            # The cloud lost rows we thought synced (restored from a backup): resend from there.
            log.warning(
                "cloud high-water mark went back", cloud=high_water_seq, ours=self.acked_seq
            )
            self.acked_seq = high_water_seq
        self.last_ack_ms = time.time() * 1000
        if self._inflight_top is not None and high_water_seq >= self._inflight_top:
            self._ack.set()

    async def run_once(self, max_batches: int = 50) -> int:
        """Send batches until the outbox is drained or the tunnel is down; returns records sent."""
        async with self._lock:
            sent = 0
            for _ in range(max_batches):
                rows = await asyncio.to_thread(
                    self.outbox.read_batch, self.acked_seq, BATCH_RECORDS
                )
                if not rows:
                    break
                batch = pb.RecordBatch()
                size = 0
                for r in rows:
                    batch.records.add(
                        seq=r.seq, kind=r.kind, topic=r.topic, ts_ms=r.ts_ms, payload=r.payload
                    )
                    size += len(r.payload)
                    if size >= BATCH_BYTES:
                        break
                top = batch.records[-1].seq
                self._inflight_top = top
                self._ack.clear()
                if not self.send(pb.EdgeMessage(records=batch)):
                    break  # no tunnel now; the next run retries from the acked mark
                try:
                    await asyncio.wait_for(self._ack.wait(), ACK_TIMEOUT_S)
                except TimeoutError:
                    log.warning("no ack for a record batch", top=top)
                    break
                finally:
                    self._inflight_top = None
                sent += len(batch.records)
            self.records_sent += sent
            if sent:
                await asyncio.to_thread(self.outbox.prune, self.retention())
            return sent
