"""Sync back: outbox batches over the tunnel, a window of them in flight, live records first.

The cloud stores or refuses each record on its own (a refused one is a dead letter there) and
answers every batch, in order, with its high-water mark for the outbox epoch; rows at or below
it are marked synced here and pruned by the retention policy. Every (re)connect's Welcome
carries the cloud's mark and sending restarts from it at once, whatever was in flight on the
dead stream; when that mark is below what this outbox thought synced (a cloud restored from a
backup), the rows above it are unsynced and sent again. A window that gets no ack for
ACK_TIMEOUT_S is counted (unacked_batches) and sent again from the mark on the next run.

Live first: a drain that starts more than LIVE_SPLIT_ROWS behind splits the outbox at its newest
seq. What arrives after the split goes at once in the live lane (the cloud stores it, marked
live, without raising its mark past the backlog below); then the backlog's verdicts and events
the same way; its telemetry drains behind them in sequence order, at most the policy's
sync_backfill_records_per_s, and once it reaches the split, sync is one lane again. Batches
stay within shared/limits.py's bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

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
LIVE_SPLIT_ROWS = 5 * BATCH_RECORDS  # this far behind, new records take the live lane
LIVE_POLL_S = 0.1  # how often a drain looks for new live records while it waits


def pack_batch(rows: list[OutboxRecord], epoch: int = 0, live: bool = False) -> pb.RecordBatch:
    """The rows from the first on, as many as fit in MAX_BATCH_PAYLOAD_BYTES (at least one: the
    outbox holds no record over MAX_RECORD_PAYLOAD_BYTES, which is no more than the batch bound)."""
    batch = pb.RecordBatch(epoch=epoch, live=live)
    size = 0
    for r in rows:
        if batch.records and size + len(r.payload) > MAX_BATCH_PAYLOAD_BYTES:
            break
        batch.records.add(seq=r.seq, kind=r.kind, topic=r.topic, ts_ms=r.ts_ms, payload=r.payload)
        size += len(r.payload)
    return batch


@dataclass(frozen=True)
class _Sent:
    first: int
    top: int
    records: int
    live: bool
    seqs: tuple[int, ...] = ()  # an urgent batch's rows (not a range: telemetry lies between)
    batch_id: int = 0


@dataclass
class _Lanes:
    """A drain split at `split`: live_cursor walks above it, backfill_cursor below it."""

    split: int
    live_cursor: int
    backfill_cursor: int
    backfill_done: bool = False  # nothing left unsynced at or below the split
    urgent_cursor: int = 0  # verdicts and events of the backlog go before its telemetry
    urgent_done: bool = False


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
        backfill_rate: Callable[[], float] = lambda: 0.0,
        live_lane: bool = True,
    ):
        assert window >= 1
        self.outbox = outbox
        self.send = send
        self.retention = retention
        self.epoch = epoch
        self.window = window
        self.backfill_rate = backfill_rate  # records/s, 0: unlimited
        self.live_lane = live_lane
        self.acked_seq = 0
        self.unacked_batches = 0  # windows sent but not acked in time (lost with the stream)
        self.resent_rows = 0  # rows unsynced again because the cloud's mark went back
        self.live_records = 0  # sent in the live lane ahead of a backlog
        self._acks: deque[tuple[int, int]] = deque()  # (mark, batch id) not yet handled
        self._batch_ids = 0
        self._changed = asyncio.Event()  # an ack or a Welcome arrived
        self._restart = False  # a Welcome arrived: resend from its mark
        self._lanes: _Lanes | None = None
        self._tokens = 0.0
        self._tokens_at = time.monotonic()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    def kick(self) -> None:
        """Start a drain now instead of at the next interval."""
        self._wake.set()

    @property
    def behind(self) -> bool:
        """A backlog drains behind a live lane now."""
        return self._lanes is not None

    def lag(self) -> tuple[int, float | None]:
        """(backlog rows behind the live lane, age in ms of the oldest record not yet synced
        above it); blocking (reads the outbox), for health."""
        lanes = self._lanes
        if lanes is None:
            backlog, above = 0, self.acked_seq
        else:
            backlog = self.outbox.backlog()[0]
            above = lanes.split
        ts = self.outbox.oldest_unsynced_ts(above)
        return backlog, None if ts is None else max(0.0, time.time() * 1000 - ts)

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
        self._acks.clear()
        if synced_seq > ours:
            await asyncio.to_thread(self.outbox.mark_synced, synced_seq)
        # Last, with no await after it: the tunnel opens the stream for sending as this
        # returns, before the drain it wakes runs.
        self._restart = True
        self._changed.set()
        self._wake.set()

    async def on_ack(
        self, high_water_seq: int, epoch: int | None = None, batch_id: int = 0
    ) -> None:
        """A RecordsAck: the cloud has everything up to high_water_seq (stored or refused) and
        the batch numbered batch_id."""
        if epoch is not None and epoch != self.epoch:
            return  # a late ack for another sequence space
        self._acks.append((high_water_seq, batch_id))
        self._changed.set()

    async def run(self, interval: Callable[[], float]) -> None:
        """The sync task: drain whenever kicked or connected, else every interval() seconds."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval())
            self._wake.clear()
            try:
                while await self.run_once(RUN_BATCHES) > 0 or self.behind:
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

    async def _split_if_behind(self) -> None:
        if not self.live_lane or self._lanes is not None:
            return
        unsynced, last = await asyncio.to_thread(self.outbox.backlog)
        if unsynced > LIVE_SPLIT_ROWS:
            self._lanes = _Lanes(
                split=last,
                live_cursor=last,
                backfill_cursor=self.acked_seq,
                urgent_cursor=self.acked_seq,
            )
            self._tokens, self._tokens_at = 0.0, time.monotonic()
            log.info("sync behind: new records go first", backlog=unsynced, split=last)

    def _backfill_allowed(self) -> bool:
        """The backfill lane's token bucket (a second's worth at most) has a batch's worth."""
        rate = self.backfill_rate()
        if rate <= 0:
            return True
        now = time.monotonic()
        self._tokens = min(max(rate, BATCH_RECORDS), self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        return self._tokens >= min(BATCH_RECORDS, rate)

    async def _next_batch(self, cursor: int) -> pb.RecordBatch | None:
        """The next batch to send: live above the split, then backfill within its rate, or the
        next in sequence order when not behind."""
        lanes = self._lanes
        if lanes is None:
            rows = await asyncio.to_thread(self.outbox.read_batch, cursor, BATCH_RECORDS)
            return pack_batch(rows, self.epoch) if rows else None
        rows = await asyncio.to_thread(self.outbox.read_batch, lanes.live_cursor, BATCH_RECORDS)
        if rows:
            return pack_batch(rows, self.epoch, live=True)
        if not lanes.urgent_done:
            rows = await asyncio.to_thread(
                self.outbox.read_urgent, lanes.urgent_cursor, lanes.split, BATCH_RECORDS
            )
            if rows:  # sent like live ones: stored without raising the cloud's mark
                return pack_batch(rows, self.epoch, live=True)
            lanes.urgent_done = True
        if not self._backfill_allowed():
            return None
        rows = await asyncio.to_thread(
            self.outbox.read_batch, lanes.backfill_cursor, BATCH_RECORDS, lanes.split
        )
        if rows:
            batch = pack_batch(rows, self.epoch)
            if self.backfill_rate() > 0:
                self._tokens -= len(batch.records)
            return batch
        lanes.backfill_done = True
        return None

    async def _drain(self, max_batches: int) -> int:
        inflight: deque[_Sent] = deque()
        cursor = self.acked_seq
        self._restart = False
        await self._split_if_behind()
        acked = sent = 0
        down = False
        oldest_sent = time.monotonic()
        while True:
            if self._restart:  # a new stream: what was in flight died with the old one
                self._restart, down = False, False
                inflight.clear()
                self._lanes = None
                cursor = self.acked_seq
                await self._split_if_behind()
                continue
            while not down and len(inflight) < self.window and sent < max_batches:
                batch = await self._next_batch(cursor)
                # A Welcome during that read: this batch is from a cursor the new stream's
                # cloud may not have reached; sending it would let its mark jump past rows it
                # lacks. Nothing awaits between this check and the send.
                if batch is None or self._restart:
                    break
                self._batch_ids += 1
                batch.batch_id = self._batch_ids
                if not self.send(pb.EdgeMessage(records=batch)):
                    down = True  # no stream now: wait for what is in flight, or a reconnect
                    break
                first, top = batch.records[0].seq, batch.records[-1].seq
                if not inflight:
                    oldest_sent = time.monotonic()
                urgent = batch.live and self._lanes is not None and top <= self._lanes.split
                seqs = tuple(r.seq for r in batch.records) if urgent else ()
                inflight.append(
                    _Sent(first, top, len(batch.records), batch.live, seqs, batch.batch_id)
                )
                sent += 1
                if urgent:
                    assert self._lanes is not None
                    self._lanes.urgent_cursor = top
                elif batch.live:
                    assert self._lanes is not None
                    self._lanes.live_cursor = top
                    self.live_records += len(batch.records)
                elif self._lanes is not None:
                    self._lanes.backfill_cursor = top
                else:
                    cursor = top
            took = await self._take_acks(inflight)
            if took:
                acked += took
                oldest_sent = time.monotonic()  # progress: the ack clock starts again
            if self._restart:
                continue
            if self._lanes is not None and self._caught_up(inflight):
                # In sequence order from above the live lane: the cloud takes this stream's
                # batches in order, so the live ones still in flight land before the next.
                log.info("sync caught up: one lane again", mark=self.acked_seq)
                cursor, self._lanes = self._lanes.live_cursor, None
                continue
            if not inflight:
                if down:
                    self._lanes = None  # split again on the next Welcome
                    return acked
                if sent >= max_batches:
                    return acked
                if self._lanes is not None:  # backfill waits for its rate; live may come
                    await asyncio.sleep(LIVE_POLL_S)
                    continue
                if not await asyncio.to_thread(self.outbox.read_batch, cursor, 1):
                    return acked
                continue
            if time.monotonic() - oldest_sent > ACK_TIMEOUT_S:
                self.unacked_batches += 1
                log.warning(
                    "no ack for record batches", top=inflight[-1].top, batches=len(inflight)
                )
                self._lanes = None
                return acked
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                wait_s = LIVE_POLL_S if self._lanes is not None else ACK_TIMEOUT_S
                await asyncio.wait_for(self._changed.wait(), wait_s)

    def _caught_up(self, inflight: deque[_Sent]) -> bool:
        """The backlog at or below the split is all sent and acked."""
        lanes = self._lanes
        assert lanes is not None
        return lanes.backfill_done and not any(not s.live for s in inflight)

    async def _take_acks(self, inflight: deque[_Sent]) -> int:
        """Match the acks that arrived to the batches in flight by batch id, mark their rows
        synced; returns the records acked. An ack for a batch no longer in flight (sent on a
        stream given up since, or an edge without ids) only moves the mark: always safe, the
        cloud has everything at or below it."""
        acked = 0
        while self._acks:
            mark, batch_id = self._acks.popleft()
            done = next((s for s in inflight if batch_id and s.batch_id == batch_id), None)
            if done is None and not batch_id and inflight:
                done = inflight[0]  # a cloud that does not echo ids answers in order
            if done is not None:
                inflight.remove(done)
                acked += done.records
                if done.seqs:
                    await asyncio.to_thread(self.outbox.mark_seqs_synced, list(done.seqs))
                elif done.live:
                    await asyncio.to_thread(self.outbox.mark_range_synced, done.first, done.top)
            if mark > self.acked_seq:
                self.acked_seq = mark
                await asyncio.to_thread(self.outbox.mark_synced, mark)
        return acked
