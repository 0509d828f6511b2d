"""Records synced from edges (telemetry, verdicts, events), unique by (node id, sequence)."""

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


def insert_batch(db: Database, *, node_id: str, rows: list[RecordRow]) -> tuple[int, int]:
    """Insert (ignoring duplicates) and raise the node's high-water mark; returns (new rows, mark).

    Every row must belong to node_id (the tunnel builds them for the authenticated node).
    """
    assert all(r.node_id == node_id for r in rows)
    with db.write() as d:
        conn = d.conn
        before = conn.total_changes
        conn.executemany(
            f"INSERT OR IGNORE INTO records ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(r.node_id, r.seq, r.kind, r.topic, r.ts_ms, r.payload, r.received_ms) for r in rows],
        )
        inserted = conn.total_changes - before
        top = max((r.seq for r in rows), default=0)
        conn.execute(
            "UPDATE nodes SET synced_seq = MAX(synced_seq, ?) WHERE id = ?", (top, node_id)
        )
        (high,) = conn.execute("SELECT synced_seq FROM nodes WHERE id = ?", (node_id,)).fetchone()
    return inserted, int(high)


def query_records(
    db: Database,
    *,
    node_id: str | None = None,
    kind: str | None = None,
    topic: str | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
    after: tuple[str, int] | None = None,
    limit: int = 100,
) -> list[RecordRow]:
    """Records matching the filters, ordered by (node id, seq), starting after a page cursor."""
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
        where.append("(node_id, seq) > (?, ?)")
        args.extend(after)
    sql = f"SELECT {COLUMNS} FROM records"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY node_id, seq LIMIT ?"
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
