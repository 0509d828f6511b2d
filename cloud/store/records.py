"""Records synced from edges (telemetry, verdicts, events), unique by (node, outbox epoch, seq);
the per-epoch high-water marks; the records the cloud refused (dead letters)."""

from __future__ import annotations

from dataclasses import dataclass

from fieldline.cloud.store.db import Database

COLUMNS = "node_id, seq, kind, topic, ts_ms, payload, received_ms"  # RecordRow's field order


@dataclass(frozen=True)
class RecordRow:
    """One record as written and as read back."""

    node_id: str
    seq: int
    kind: str
    topic: str
    ts_ms: int
    payload: bytes
    received_ms: int
    epoch: int = 0  # the edge's outbox epoch (see tunnel.proto's Hello)
    live: bool = False  # sent in the live lane ahead of a backlog (else in sequence order)


@dataclass(frozen=True)
class DeadRecordRow:
    """A record the cloud refused on its own (the rest of its batch was stored), and why."""

    node_id: str
    epoch: int
    seq: int
    kind: str
    topic: str
    size: int
    reason: str
    received_ms: int
    id: int = 0  # set when read back


DEAD_COLUMNS = "node_id, epoch, seq, kind, topic, size, reason, received_ms"


def insert_batch(
    db: Database,
    *,
    node_id: str,
    rows: list[RecordRow],
    epoch: int = 0,
    dead: list[DeadRecordRow] | None = None,
    live: bool = False,
) -> tuple[int, int]:
    """Insert (ignoring duplicates) rows and dead letters, raise the node's mark in `epoch` to
    their highest seq (not for a live batch: a backlog is still missing below it), durably;
    returns (new rows, mark).

    Every row must belong to node_id (the tunnel builds them for the authenticated node).
    """
    assert all(r.node_id == node_id for r in rows)
    dead = dead or []
    top = 0 if live else max([0, *(r.seq for r in rows), *(d.seq for d in dead)])
    with db.write(durable=True) as d:
        conn = d.conn
        before = conn.total_changes
        conn.executemany(
            f"INSERT OR IGNORE INTO records (epoch, live, {COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (epoch, live, r.node_id, r.seq, r.kind, r.topic, r.ts_ms, r.payload, r.received_ms)
                for r in rows
            ],
        )
        inserted = conn.total_changes - before
        (mark,) = conn.execute(
            "SELECT COALESCE(MAX(synced_seq), 0) FROM record_marks WHERE node_id = ? AND epoch = ?",
            (node_id, epoch),
        ).fetchone()
        # A resend of records already here (after a reconnect) refuses nothing twice.
        fresh = [x for x in dead if x.seq > int(mark)]
        conn.executemany(
            f"INSERT INTO dead_records ({DEAD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (x.node_id, x.epoch, x.seq, x.kind, x.topic, x.size, x.reason, x.received_ms)
                for x in fresh
            ],
        )
        high = max(int(mark), top)
        conn.execute(
            "INSERT INTO record_marks (node_id, epoch, synced_seq) VALUES (?, ?, ?) "
            "ON CONFLICT (node_id, epoch) DO UPDATE SET synced_seq = excluded.synced_seq",
            (node_id, epoch, high),
        )
        # nodes.synced_seq: the mark of the epoch the node syncs now (what the API shows).
        conn.execute("UPDATE nodes SET synced_seq = ? WHERE id = ?", (high, node_id))
    return inserted, high


def synced_seq(db: Database, *, node_id: str, epoch: int) -> int:
    """The node's high-water mark in an outbox epoch (0 for an epoch never seen)."""
    with db.read() as d:
        row = d.conn.execute(
            "SELECT synced_seq FROM record_marks WHERE node_id = ? AND epoch = ?", (node_id, epoch)
        ).fetchone()
    return int(row[0]) if row else 0


def start_epoch(db: Database, *, node_id: str, epoch: int) -> int:
    """The node says hello from `epoch`: make it the one the API shows; returns its mark."""
    with db.write() as d:
        row = d.conn.execute(
            "SELECT synced_seq FROM record_marks WHERE node_id = ? AND epoch = ?", (node_id, epoch)
        ).fetchone()
        mark = int(row[0]) if row else 0
        d.conn.execute("UPDATE nodes SET synced_seq = ? WHERE id = ?", (mark, node_id))
    return mark


def query_dead_records(
    db: Database, *, node_id: str | None = None, after_id: int = 0, limit: int = 100
) -> list[DeadRecordRow]:
    """Dead letters of the cloud, oldest first, from after a page cursor (their id)."""
    sql = f"SELECT {DEAD_COLUMNS}, id FROM dead_records WHERE id > ?"
    args: list[object] = [after_id]
    if node_id is not None:
        sql += " AND node_id = ?"
        args.append(node_id)
    sql += " ORDER BY id LIMIT ?"
    args.append(limit)
    with db.read() as d:
        return [DeadRecordRow(*row) for row in d.conn.execute(sql, args)]


def count_duplicates(db: Database, *, node_id: str) -> int:
    """Records stored more than once with the same payload for a node (0 when exactly once);
    tests use it, the bench too."""
    with db.read() as d:
        (n,) = d.conn.execute(
            "SELECT COUNT(*) - COUNT(DISTINCT payload) FROM records WHERE node_id = ?", (node_id,)
        ).fetchone()
    return int(n)


def query_records(
    db: Database,
    *,
    node_id: str | None = None,
    kind: str | None = None,
    topic: str | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
    after: tuple[str, int, int] | None = None,
    limit: int = 100,
) -> list[RecordRow]:
    """Records matching the filters, ordered by (node id, epoch, seq), starting after a page
    cursor (node id, epoch, seq)."""
    where, args = [], []
    for clause, value in (
        ("node_id = ?", node_id),
        ("kind = ?", kind),
        ("topic = ?", topic),
        ("ts_ms >= ?", since_ms),
        ("ts_ms < ?", until_ms),
    ):
        if value is not None:
            where.append(clause)
            args.append(value)
    if after is not None:
        where.append("(node_id, epoch, seq) > (?, ?, ?)")
        args.extend(after)
    sql = f"SELECT {COLUMNS}, epoch, live FROM records"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY node_id, epoch, seq LIMIT ?"
    args.append(limit)
    with db.read() as d:
        return [RecordRow(*row) for row in d.conn.execute(sql, args)]


def count_records(db: Database, *, node_id: str | None = None) -> int:
    with db.read() as d:
        if node_id is None:
            return int(d.conn.execute("SELECT COUNT(*) FROM records").fetchone()[0])
        return int(
            d.conn.execute("SELECT COUNT(*) FROM records WHERE node_id = ?", (node_id,)).fetchone()[
                0
            ]
        )


def records_per_minute(db: Database, *, since_ms: int) -> list[tuple[int, str, int]]:
    """(minute start in ms, kind, records) for records stamped at or after since_ms."""
    with db.read() as d:
        rows = d.conn.execute(
            "SELECT (ts_ms / 60000) * 60000 AS minute, kind, COUNT(*) FROM records "
            "WHERE ts_ms >= ? GROUP BY minute, kind ORDER BY minute",
            (since_ms,),
        ).fetchall()
    return [(int(m), str(k), int(n)) for m, k, n in rows]
