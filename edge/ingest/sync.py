"""Sync back: ship outbox batches over the tunnel in sequence order, one batch in flight at a time.

The cloud stores records idempotently by (node, seq) and acks a high-water mark; rows at or
below it are marked synced here and pruned by the retention policy. After a reconnect the
cloud's Welcome carries its mark, so sending resumes exactly after what it already has. A
batch the cloud does not ack within ACK_TIMEOUT_S is counted (unacked_batches) and sent again
from the acked mark on the next run; batches stay within the cloud's bounds (shared/limits.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from fieldline.edge.ingest.outbox import Outbox, OutboxRecord
from fieldline.shared.limits import MAX_BATCH_PAYLOAD_BYTES, MAX_BATCH_RECORDS
from fieldline.shared.policy import Retention
from fieldline.shared.proto import tunnel_pb2 as pb

log = structlog.get_logger(__name__)

BATCH_RECORDS = 2000  # read per batch; packing stops earlier at MAX_BATCH_PAYLOAD_BYTES
assert BATCH_RECORDS <= MAX_BATCH_RECORDS
ACK_TIMEOUT_S = 30.0


def pack_batch(rows: list[OutboxRecord]) -> pb.RecordBatch:
    """The rows from the first on, as many as fit in MAX_BATCH_PAYLOAD_BYTES (at least one: the
    outbox holds no record over MAX_RECORD_PAYLOAD_BYTES, which is no more than the batch bound)."""
    batch = pb.RecordBatch()
    size = 0
    for r in rows:
        if batch.records and size + len(r.payload) > MAX_BATCH_PAYLOAD_BYTES:
            break
        batch.records.add(seq=r.seq, kind=r.kind, topic=r.topic, ts_ms=r.ts_ms, payload=r.payload)
        size += len(r.payload)
    return batch


class OutboxSync:
    """run_once() is the scheduled job; on_ack() is the tunnel's records hook."""

    def __init__(
        self,
        outbox: Outbox,
        send: Callable[[pb.EdgeMessage], bool],
        retention: Callable[[], Retention],
    ):
        self.outbox = outbox
        self.send = send
        self.retention = retention
        self.acked_seq = 0
        self.unacked_batches = 0  # sent but not acked in time (refused by the cloud, or lost)
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
                batch = pack_batch(rows)
                top = batch.records[-1].seq
                self._inflight_top = top
                self._ack.clear()
                if not self.send(pb.EdgeMessage(records=batch)):
                    break  # no tunnel now; the next run retries from the acked mark
                try:
                    await asyncio.wait_for(self._ack.wait(), ACK_TIMEOUT_S)
                except TimeoutError:
                    self.unacked_batches += 1
                    log.warning("no ack for a record batch", top=top, records=len(batch.records))
                    break
                finally:
                    self._inflight_top = None
                sent += len(batch.records)
            if sent:
                await asyncio.to_thread(self.outbox.prune, self.retention())
            return sent
