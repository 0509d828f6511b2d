"""Sync back: outbox batches over the tunnel, a window of them in flight, acked cumulatively.

The cloud stores or refuses each record on its own (a refused one is a dead letter there) and
acks a high-water mark per outbox epoch; rows at or below it are marked synced here and pruned
by the retention policy. Every (re)connect's Welcome carries the cloud's mark and sending
restarts from it at once, whatever was in flight on the dead stream; when that mark is below
what this outbox thought synced (a cloud restored from a backup), the rows above it are unsynced
and sent again. A window that gets no ack for ACK_TIMEOUT_S is counted (unacked_batches) and
sent again from the acked mark on the next run; batches stay within shared/limits.py's bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

import structlog

from fieldline.edge.ingest.outbox import Outbox, OutboxRecord
from fieldline.shared.limits import MAX_BATCH_PAYLOAD_BYTES, MAX_BATCH_RECORDS
from fieldline.shared.policy import Retention
from fieldline.shared.proto import tunnel_pb2 as pb

log = structlog.get_logger(__name__)

BATCH_RECORDS = 2000  # read per batch; packing stops earlier at MAX_BATCH_PAYLOAD_BYTES
assert BATCH_RECORDS <= MAX_BATCH_RECORDS
WINDOW_BATCHES = 8  # batches in flight: 16,000 records cover a 200 ms round trip at 80,000/s
ACK_TIMEOUT_S = 30.0
RUN_BATCHES = 50  # batches per run_once of the sync task; the outbox is pruned between runs


def pack_batch(rows: list[OutboxRecord], epoch: int = 0) -> pb.RecordBatch:
    """The rows from the first on, as many as fit in MAX_BATCH_PAYLOAD_BYTES (at least one: the
    outbox holds no record over MAX_RECORD_PAYLOAD_BYTES, which is no more than the batch bound)."""
    batch = pb.RecordBatch(epoch=epoch)
    size = 0
    for r in rows:
        if batch.records and size + len(r.payload) > MAX_BATCH_PAYLOAD_BYTES:
            break
        batch.records.add(seq=r.seq, kind=r.kind, topic=r.topic, ts_ms=r.ts_ms, payload=r.payload)
        size += len(r.payload)
    return batch


class OutboxSync:
    """run() is the sync task (run_once() one drain); on_welcome() and on_ack() are the tunnel's
    hooks; kick() asks for a drain now."""

    def __init__(
        self,
        outbox: Outbox,
        send: Callable[[pb.EdgeMessage], bool],
        retention: Callable[[], Retention],
        *,
        epoch: int = 0,
        window: int = WINDOW_BATCHES,
    ):
        assert window >= 1
        self.outbox = outbox
        self.send = send
        self.retention = retention
        self.epoch = epoch
        self.window = window
        self.acked_seq = 0
        self.unacked_batches = 0  # windows sent but not acked in time (lost with the stream)
        self.resent_rows = 0  # rows unsynced again because the cloud's mark went back
        self._changed = asyncio.Event()  # an ack or a Welcome arrived
        self._restart = False  # a Welcome arrived: resend from its mark
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    def kick(self) -> None:
        """Start a drain now instead of at the next interval."""
        self._wake.set()

    async def on_welcome(self, synced_seq: int) -> None:
        """A (re)connected stream: the cloud's mark for this epoch; resend from there at once."""
        ours = self.outbox.synced_seq
        if synced_seq < ours:
            resend, gap = await asyncio.to_thread(self.outbox.unsync_above, synced_seq)
            self.resent_rows += resend
            log.warning(
                "cloud high-water mark went back; resending what it lost",
                cloud=synced_seq,
                ours=ours,
                resend=resend,
                pruned_gap=gap,
            )
        self.acked_seq = synced_seq
        self._restart = True
        self._changed.set()
        self._wake.set()
        if synced_seq > ours:
            await asyncio.to_thread(self.outbox.mark_synced, synced_seq)

    async def on_ack(self, high_water_seq: int, epoch: int | None = None) -> None:
        """A RecordsAck: the cloud has everything up to high_water_seq (stored or refused)."""
        if epoch is not None and epoch != self.epoch:
            return  # a late ack for another sequence space
        if high_water_seq > self.acked_seq:
            self.acked_seq = high_water_seq
            self._changed.set()
            await asyncio.to_thread(self.outbox.mark_synced, high_water_seq)

    async def run(self, interval: Callable[[], float]) -> None:
        """The sync task: drain whenever kicked or connected, else every interval() seconds."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval())
            self._wake.clear()
            try:
                while await self.run_once(RUN_BATCHES) > 0:
                    pass
            except Exception:  # the task must outlive a failed drain; the next one retries
                log.exception("sync run failed")

    async def run_once(self, max_batches: int = RUN_BATCHES) -> int:
        """Send up to max_batches, `window` in flight, until the outbox is drained, the tunnel is
        down or acks stop coming; returns the records acked."""
        async with self._lock:
            acked = await self._drain(max_batches)
            if acked:
                await asyncio.to_thread(self.outbox.prune, self.retention())
            return acked

    async def _drain(self, max_batches: int) -> int:
        inflight: deque[tuple[int, int]] = deque()  # (top seq, records) per batch in flight
        cursor = self.acked_seq
        self._restart = False
        acked = sent = 0
        down = False
        while True:
            while not down and len(inflight) < self.window and sent < max_batches:
                rows = await asyncio.to_thread(self.outbox.read_batch, cursor, BATCH_RECORDS)
                if not rows:
                    break
                batch = pack_batch(rows, self.epoch)
                if not self.send(pb.EdgeMessage(records=batch)):
                    down = True  # no stream now: wait for what is in flight, or a reconnect
                    break
                cursor = batch.records[-1].seq
                inflight.append((cursor, len(batch.records)))
                sent += 1
            while inflight and inflight[0][0] <= self.acked_seq:
                acked += inflight.popleft()[1]
            if self._restart:  # a new stream: what was in flight died with the old one
                self._restart, down = False, False
                inflight.clear()
                cursor = self.acked_seq
                continue
            if not inflight:
                if down or sent >= max_batches:
                    return acked
                rows_left = await asyncio.to_thread(self.outbox.read_batch, cursor, 1)
                if not rows_left:
                    return acked
                continue
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), ACK_TIMEOUT_S)
            except TimeoutError:
                self.unacked_batches += 1
                log.warning("no ack for record batches", top=inflight[-1][0], batches=len(inflight))
                return acked
