"""The durable outbox (DATA/outbox.db): every ingested message and verdict, numbered, until the cloud has it.

Durability: WAL with synchronous=FULL for every kind. Messages are acknowledged to the broker
only after their batch commits, and an acknowledged message is gone from the broker, so a
telemetry row lost to a power cut after its ack would be lost for good; one fsync per batch
(not per message) keeps FULL affordable.

Bounds (the policy's retention): rows and bytes. To make room the outbox first deletes synced
rows, then the oldest unsynced telemetry (counted as dropped); verdicts and events are never
deleted to make room. When only they fill it, commit_batch raises OutboxFull: MQTT ingestion
stops acknowledging, so the broker holds the backlog until sync frees room; a verdict or event
that cannot wait is dropped by its caller, which counts it (edge/ingest/dataplane.py).

Refusals: a record the cloud would refuse (payload over MAX_RECORD_PAYLOAD_BYTES, a kind it
does not store, a topic over MAX_TOPIC_CHARS) raises RecordRefused and is never stored, so no
batch the cloud keeps refusing can stall sync.

Exactly once: sequences come from AUTOINCREMENT, so they are never reused, even after the
newest rows were pruned and the process crashed. A message stored but not acked before a crash
is recognised on redelivery by its delivery key (already_delivered); that holds while its row
is still here, i.e. unless sync and a prune with keep_synced_s=0 removed it within the moment
between the crash and the reconnect.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fieldline.shared.health import OutboxHealth
from fieldline.shared.limits import MAX_RECORD_PAYLOAD_BYTES, MAX_TOPIC_CHARS, RECORD_KINDS
from fieldline.shared.policy import Retention

DB_FILE = "outbox.db"
DROPPABLE = "telemetry"
KEPT_KINDS = tuple(sorted(RECORD_KINDS - {DROPPABLE}))  # verdicts and events: never dropped
DEAD_LETTER_KEEP_BYTES = 1024  # of a dead-lettered payload, kept for diagnosis
DEAD_LETTER_MAX_ROWS = 10_000
PRUNE_CHUNK_ROWS = 10_000  # telemetry rows dropped per statement when the bound is passed

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    ts_ms INTEGER NOT NULL,
    payload BLOB NOT NULL,
    size INTEGER NOT NULL,
    synced_ms INTEGER,
    delivery TEXT  -- broker delivery key (packet id + digest), to spot redeliveries
);
CREATE INDEX IF NOT EXISTS records_unsynced ON records (synced_ms, kind, seq);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_ms INTEGER NOT NULL,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    size INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
# A redelivery can only be of a message stored but not yet acked, and the broker never has
# more than receive_maximum of those out; so only the newest ingested rows need checking. A
# small window also keeps an identical payload that reused a packet id long ago from passing
# for a redelivery (packet ids cycle through 65,535).
REDELIVERY_WINDOW_ROWS = 4000


class OutboxFull(Exception):
    """No room without dropping verdicts or events: stop acknowledging until sync frees room."""


class DiskFull(OutboxFull):
    """The disk under the outbox is full (SQLITE_FULL, ENOSPC): the same back-pressure as a full
    outbox; commits succeed again by themselves once space returns."""


def _disk_full(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or "disk is full" in str(exc) or "No space" in str(exc)


class RecordRefused(ValueError):
    """A record the cloud would refuse, so it is never stored; str() is the reason."""


class RecordTooLarge(RecordRefused):
    """A record whose payload exceeds the cloud's record bound (MAX_RECORD_PAYLOAD_BYTES)."""

    def __init__(self, kind: str, topic: str, size: int, limit: int = MAX_RECORD_PAYLOAD_BYTES):
        super().__init__(
            f"{kind} payload of {size} bytes exceeds the record limit of {limit} bytes "
            f"(topic {topic[:100]!r})"
        )
        self.size = size
        self.limit = limit


def check_record(kind: str, topic: str, size: int) -> None:
    """Raise RecordRefused when the cloud would refuse a record of this kind, topic and size."""
    if size > MAX_RECORD_PAYLOAD_BYTES:
        raise RecordTooLarge(kind, topic, size)
    if kind not in RECORD_KINDS:
        raise RecordRefused(f"record kind {kind!r} is not one of {sorted(RECORD_KINDS)}")
    if len(topic) > MAX_TOPIC_CHARS:
        raise RecordRefused(f"topic of {len(topic)} characters exceeds {MAX_TOPIC_CHARS}")


@dataclass(frozen=True)
class NewRecord:
    kind: str  # telemetry | verdict | event
    topic: str
    ts_ms: int
    payload: bytes


@dataclass(frozen=True)
class OutboxRecord:
    seq: int
    kind: str
    topic: str
    ts_ms: int
    payload: bytes


@dataclass(frozen=True)
class DeadLetter:
    topic: str
    reason: str
    payload: bytes
    refused: bool = False  # a record the cloud would refuse (RecordRefused), not a bad payload


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Outbox:
    """Thread-safe: the MQTT writer, the inspection runtime and the sync job share one instance."""

    def __init__(self, data_dir: Path, retention: Retention | None = None):
        path = data_dir / DB_FILE
        # A new file is a new sequence space (AUTOINCREMENT starts at 1 again): see epoch.
        self.created = not path.exists()
        if self.created:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(SCHEMA)
        self._lock = threading.Lock()
        self.retention = retention or Retention()
        rows, size = self._conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM records"
        ).fetchone()
        self._rows, self._bytes = int(rows), int(size)
        self._dropped = self._counter("dropped")
        self._dead = self._counter("dead_letters")
        (synced,) = self._conn.execute(
            "SELECT COALESCE(MAX(seq), 0) FROM records WHERE synced_ms IS NOT NULL"
        ).fetchone()
        self._synced_seq = max(int(synced), self._counter("synced_seq"))

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _counter(self, name: str) -> int:
        row = self._conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def _set_counter(self, name: str, value: int) -> None:
        self._conn.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

    @property
    def synced_seq(self) -> int:
        """The highest sequence the cloud acked, as this outbox knows it."""
        return self._synced_seq

    @property
    def epoch(self) -> int:
        """This outbox's sequence space, sent with every batch (0: an outbox from before epochs;
        the data plane gives a new file the next epoch of edge.db, see start_epoch)."""
        return self._counter("epoch")

    def has_epoch(self) -> bool:
        """Whether this outbox was ever numbered (an outbox from before epochs was not)."""
        with self._lock:
            row = self._conn.execute("SELECT 1 FROM counters WHERE name = 'epoch'").fetchone()
        return row is not None

    def start_epoch(self, epoch: int) -> None:
        """Number this (new) outbox's sequence space."""
        with self._lock:
            self._set_counter("epoch", epoch)

    @property
    def dropped(self) -> int:
        """Telemetry rows dropped to make room, ever (persisted in the counters table)."""
        return self._dropped

    def set_retention(self, retention: Retention) -> None:
        self.retention = retention

    def commit_batch(
        self,
        records: list[NewRecord],
        dead: list[DeadLetter] | None = None,
        delivered: list[str] | None = None,
    ) -> list[int]:
        """Store records, dead letters and delivery keys in one transaction; returns the seqs.

        Raises RecordRefused for a record the cloud would refuse, and OutboxFull when the
        records do not fit without dropping verdicts or events; either way nothing is written.
        """
        for r in records:
            check_record(r.kind, r.topic, len(r.payload))
        dead = dead or []
        need_rows = len(records)
        need_bytes = sum(len(r.payload) for r in records)
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                dropped = self._make_room(need_rows, need_bytes)
                keys: list[str | None] = list(delivered) if delivered else [None] * len(records)
                conn.executemany(
                    "INSERT INTO records (kind, topic, ts_ms, payload, size, delivery) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (r.kind, r.topic, r.ts_ms, r.payload, len(r.payload), k)
                        for r, k in zip(records, keys, strict=True)
                    ],
                )
                # One writer inside one transaction: the new rows' sequences are consecutive.
                (last,) = conn.execute("SELECT last_insert_rowid()").fetchone()
                seqs = list(range(int(last) - len(records) + 1, int(last) + 1)) if records else []
                if dead:
                    now = _now_ms()
                    conn.executemany(
                        "INSERT INTO dead_letters (ts_ms, topic, reason, size, payload) "
                        "VALUES (?, ?, ?, ?, ?)",
                        [
                            (
                                now,
                                d.topic[:MAX_TOPIC_CHARS],
                                d.reason[:500],
                                len(d.payload),
                                d.payload[:DEAD_LETTER_KEEP_BYTES],
                            )
                            for d in dead
                        ],
                    )
                    conn.execute(
                        "DELETE FROM dead_letters WHERE id <= "
                        "(SELECT MAX(id) FROM dead_letters) - ?",
                        (DEAD_LETTER_MAX_ROWS,),
                    )
                    self._set_counter("dead_letters", self._dead + len(dead))
                if dropped:
                    self._set_counter("dropped", self._dropped + dropped)
                conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                self._rollback()
                if _disk_full(exc):
                    raise DiskFull(f"no space left for the outbox ({exc})") from exc
                raise
            except BaseException:
                self._rollback()
                raise
            self._rows += need_rows
            self._bytes += need_bytes
            self._dropped += dropped
            self._dead += len(dead)
            return seqs

    def already_delivered(self, keys: list[str], window: int = REDELIVERY_WINDOW_ROWS) -> set[str]:
        """Which of these delivery keys are among the newest `window` ingested rows (a redelivery
        of a message stored, but not acked, before a crash or a broker restart)."""
        if not keys:
            return set()
        with self._lock:
            rows = self._conn.execute(
                "SELECT delivery FROM (SELECT delivery FROM records WHERE delivery IS NOT NULL "
                f"ORDER BY seq DESC LIMIT ?) WHERE delivery IN ({','.join('?' * len(keys))})",
                [window, *keys],
            ).fetchall()
        return {r[0] for r in rows}

    def append(self, records: list[NewRecord]) -> list[int]:
        """Store records (verdicts, events); raises RecordRefused or OutboxFull, storing none."""
        return self.commit_batch(records)

    def _rollback(self) -> None:
        """Undo the open transaction, if SQLite has not already (it rolls back on SQLITE_FULL)."""
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")
        self._reload_totals()

    def _reload_totals(self) -> None:
        rows, size = self._conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM records"
        ).fetchone()
        self._rows, self._bytes = int(rows), int(size)

    def _make_room(self, need_rows: int, need_bytes: int) -> int:
        """Inside a transaction: free room for the new rows; returns telemetry rows dropped."""
        r = self.retention
        if self._rows + need_rows <= r.max_rows and self._bytes + need_bytes <= r.max_bytes:
            return 0
        conn = self._conn
        # Synced rows first: the cloud has them already.
        conn.execute("DELETE FROM records WHERE synced_ms IS NOT NULL")
        self._reload_totals()
        dropped = 0
        while self._rows + need_rows > r.max_rows or self._bytes + need_bytes > r.max_bytes:
            over_rows = max(0, self._rows + need_rows - r.max_rows)
            # In chunks, deleted by range: a bound lowered a lot at once (400,000 rows to
            # 50,000) would otherwise pass SQLite's limit on bound variables.
            batch = min(max(over_rows, 64), PRUNE_CHUNK_ROWS)
            victims = conn.execute(
                "SELECT seq, size FROM records WHERE synced_ms IS NULL AND kind = ? "
                "ORDER BY seq LIMIT ?",
                (DROPPABLE, batch),
            ).fetchall()
            if not victims:
                raise OutboxFull(
                    f"outbox full ({self._rows} rows, {self._bytes} bytes) with verdicts and "
                    "events that are never dropped; waiting for sync"
                )
            # Drop only as many as needed when the byte bound is what binds.
            freed = 0
            take = []
            for seq, size in victims:
                take.append(seq)
                freed += size
                if (
                    self._rows - len(take) + need_rows <= r.max_rows
                    and self._bytes - freed + need_bytes <= r.max_bytes
                ):
                    break
            conn.execute(
                "DELETE FROM records WHERE seq BETWEEN ? AND ? AND synced_ms IS NULL AND kind = ?",
                (take[0], take[-1], DROPPABLE),
            )
            self._rows -= len(take)
            self._bytes -= freed
            dropped += len(take)
        return dropped

    def read_batch(
        self, after_seq: int, limit: int, upto_seq: int | None = None
    ) -> list[OutboxRecord]:
        """Unsynced records with after_seq < seq (<= upto_seq), in order."""
        with self._lock:
            # "+synced_ms": walk the primary key from after_seq; through the synced_ms index
            # SQLite would read and sort every unsynced row for each batch (a 200,000-row
            # backlog, 200,000 rows per batch).
            rows = self._conn.execute(
                "SELECT seq, kind, topic, ts_ms, payload FROM records "
                "WHERE seq > ? AND seq <= ? AND +synced_ms IS NULL ORDER BY seq LIMIT ?",
                (after_seq, upto_seq if upto_seq is not None else 2**63 - 1, limit),
            ).fetchall()
        return [OutboxRecord(int(s), k, t, int(ts), bytes(p)) for s, k, t, ts, p in rows]

    def mark_synced(self, high_water_seq: int) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            # Rows at or below _synced_seq are synced already: touch only the range above it
            # (by primary key, not by scanning the synced_ms index's every unsynced row).
            self._conn.execute(
                "UPDATE records SET synced_ms = ? "
                "WHERE seq > ? AND seq <= ? AND +synced_ms IS NULL",
                (_now_ms(), self._synced_seq, high_water_seq),
            )
            self._synced_seq = max(self._synced_seq, high_water_seq)
            self._set_counter("synced_seq", self._synced_seq)
            self._conn.execute("COMMIT")

    def read_urgent(self, after_seq: int, upto_seq: int, limit: int) -> list[OutboxRecord]:
        """Unsynced verdicts and events with after_seq < seq <= upto_seq, in order: what a
        backlog sends before its telemetry."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, kind, topic, ts_ms, payload FROM records "
                # IN, not !=: two ranges of the synced_ms index, not every unsynced row.
                f"WHERE synced_ms IS NULL AND kind IN ({','.join('?' * len(KEPT_KINDS))}) "
                "AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                (*KEPT_KINDS, after_seq, upto_seq, limit),
            ).fetchall()
        return [OutboxRecord(int(s), k, t, int(ts), bytes(p)) for s, k, t, ts, p in rows]

    def mark_seqs_synced(self, seqs: list[int]) -> None:
        """These rows (acked out of sequence order) are synced; the synced mark stays."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "UPDATE records SET synced_ms = ? WHERE seq = ?",
                    [(_now_ms(), s) for s in seqs],
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def mark_range_synced(self, first_seq: int, last_seq: int) -> None:
        """A live-lane batch was acked: its rows (every unsynced one in the range) are synced;
        the synced mark stays where the backlog below them is."""
        with self._lock:
            self._conn.execute(
                "UPDATE records SET synced_ms = ? "
                "WHERE seq >= ? AND seq <= ? AND +synced_ms IS NULL",
                (_now_ms(), first_seq, last_seq),
            )

    def oldest_unsynced_ts(self, after_seq: int) -> int | None:
        """ts_ms of the first unsynced record above after_seq (None when there is none)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT ts_ms FROM records WHERE seq > ? AND +synced_ms IS NULL ORDER BY seq LIMIT 1",
                (after_seq,),
            ).fetchone()
        return int(row[0]) if row else None

    def backlog(self) -> tuple[int, int]:
        """(unsynced rows, the newest seq): how far behind sync is."""
        with self._lock:
            (unsynced,) = self._conn.execute(
                "SELECT COUNT(*) FROM records WHERE synced_ms IS NULL"
            ).fetchone()
            (last,) = self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()
        return int(unsynced), int(last)

    def unsync_above(self, seq: int) -> tuple[int, int]:
        """The cloud's mark went back to seq: rows above it are unsynced again, to be resent.

        Returns (rows to resend, synced rows above seq already pruned: the gap the cloud will
        never get back, counted in `sync_gap`)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                cur = self._conn.execute(
                    "UPDATE records SET synced_ms = NULL WHERE seq > ? AND synced_ms IS NOT NULL",
                    (seq,),
                )
                resend = int(cur.rowcount)
                (present,) = self._conn.execute(
                    "SELECT COUNT(*) FROM records WHERE seq > ? AND seq <= ?",
                    (seq, self._synced_seq),
                ).fetchone()
                # Rows above seq that this outbox once marked synced and no longer holds; an
                # upper bound: sequences dropped unsynced by retention count here too.
                gap = max(0, self._synced_seq - seq - int(present))
                self._synced_seq = seq
                self._set_counter("synced_seq", seq)
                self._set_counter("sync_gap", self._counter("sync_gap") + gap)
                self._conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            return resend, gap

    def prune(self, retention: Retention | None = None) -> int:
        """Delete synced rows older than keep_synced_s; returns how many."""
        keep_ms = int((retention or self.retention).keep_synced_s * 1000)
        with self._lock:
            cur = self._conn.execute(
                "DELETE FROM records WHERE synced_ms IS NOT NULL AND synced_ms <= ?",
                (_now_ms() - keep_ms,),
            )
            self._reload_totals()
            return int(cur.rowcount)

    def stats(self) -> OutboxHealth:
        """Rows, bytes and sequence marks now; dropped and dead letters ever."""
        with self._lock:
            (unsynced,) = self._conn.execute(
                "SELECT COUNT(*) FROM records WHERE synced_ms IS NULL"
            ).fetchone()
            (last,) = self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()
            return OutboxHealth(
                rows=self._rows,
                bytes=self._bytes,
                unsynced=int(unsynced),
                dropped=self._dropped,
                dead_letters=self._dead,
                last_seq=max(int(last), self._synced_seq),
                synced_seq=self._synced_seq,
                epoch=self._counter("epoch"),
                sync_gap=self._counter("sync_gap"),
            )

    def dead_letters(self, limit: int = 100) -> list[tuple[str, str, int]]:
        """The latest dead letters as (topic, reason, size)."""
        with self._lock:
            return [
                (t, r, int(s))
                for t, r, s in self._conn.execute(
                    "SELECT topic, reason, size FROM dead_letters ORDER BY id DESC LIMIT ?",
                    (limit,),
                )
            ]
