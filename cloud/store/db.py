"""The cloud's SQLite database: opening it (WAL), its schema, and the lock every query takes.

All SQL of the cloud lives in this package behind keyword-only functions, so a server-database
backend is an addition, not a rewrite.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    role TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS enrollment_tokens (
    id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    labels TEXT NOT NULL,
    created TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    used_at TEXT,
    node_id TEXT
);
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    labels TEXT NOT NULL,
    node_info TEXT NOT NULL DEFAULT '{}',
    created TEXT NOT NULL,
    last_seen TEXT,
    desired_generation INTEGER NOT NULL DEFAULT 0,
    desired TEXT,
    applied_generation INTEGER NOT NULL DEFAULT 0,
    observed TEXT,
    health TEXT,
    synced_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS artifacts (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    kind TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    payload TEXT NOT NULL,
    signature TEXT NOT NULL,
    created TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE INDEX IF NOT EXISTS artifacts_sha256 ON artifacts (sha256);
CREATE TABLE IF NOT EXISTS assignments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    artifact_name TEXT NOT NULL,
    artifact_version TEXT NOT NULL,
    selector TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS policies (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    document TEXT NOT NULL,
    selector TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    node_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    ts_ms INTEGER NOT NULL,
    payload BLOB NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (node_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_ts ON records (ts_ms);
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    wave INTEGER NOT NULL DEFAULT 0,
    wave_started_at TEXT,
    soak_started_at TEXT,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    created_by TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS rollouts_state ON rollouts (state);
CREATE TABLE IF NOT EXISTS rollout_nodes (
    rollout_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    wave INTEGER NOT NULL,
    position INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    previous TEXT,
    target_generation INTEGER,
    updated TEXT NOT NULL,
    PRIMARY KEY (rollout_id, node_id)
);
CREATE TABLE IF NOT EXISTS rollout_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout_id TEXT NOT NULL,
    at TEXT NOT NULL,
    state TEXT NOT NULL,
    wave INTEGER,
    reason TEXT NOT NULL,
    actor TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS rollout_events_rollout ON rollout_events (rollout_id, id);
CREATE TABLE IF NOT EXISTS node_pins (
    node_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT,
    rollout_id TEXT NOT NULL,
    PRIMARY KEY (node_id, kind, name)
);
CREATE INDEX IF NOT EXISTS node_pins_rollout ON node_pins (rollout_id);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    key_id TEXT NOT NULL,
    role TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
"""

# Columns added after a table first shipped: (table, column, type). Added at open when missing.
ADDED_COLUMNS = [
    ("nodes", "health_at", "TEXT"),
    ("nodes", "cert_sha256", "TEXT"),  # the client certificate issued at enrollment (TLS)
    ("nodes", "revoked_at", "TEXT"),
    ("api_keys", "expires_at", "TEXT"),  # None: never expires
    ("api_keys", "revoked_at", "TEXT"),
    ("enrollment_tokens", "revoked_at", "TEXT"),
]


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    for table, column, sql_type in ADDED_COLUMNS:
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}")


# Issue 12 (sync): records keyed by the edge's outbox epoch, per-epoch marks, dead letters.
SYNC_SCHEMA = """
CREATE TABLE IF NOT EXISTS record_marks (
    node_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    synced_seq INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (node_id, epoch)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    size INTEGER NOT NULL,
    reason TEXT NOT NULL,
    received_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_records_node ON dead_records (node_id, id);
"""
RECORDS_BY_EPOCH = """
CREATE TABLE records_by_epoch (
    node_id TEXT NOT NULL,
    epoch INTEGER NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    ts_ms INTEGER NOT NULL,
    payload BLOB NOT NULL,
    received_ms INTEGER NOT NULL,
    live INTEGER NOT NULL DEFAULT 0,  -- 1: sent in the live lane ahead of a backlog
    PRIMARY KEY (node_id, epoch, seq)
) WITHOUT ROWID;
INSERT INTO records_by_epoch (node_id, seq, kind, topic, ts_ms, payload, received_ms)
    SELECT node_id, seq, kind, topic, ts_ms, payload, received_ms FROM records;
DROP TABLE records;
ALTER TABLE records_by_epoch RENAME TO records;
CREATE INDEX IF NOT EXISTS records_ts ON records (ts_ms);
INSERT OR IGNORE INTO record_marks (node_id, epoch, synced_seq)
    SELECT id, 0, synced_seq FROM nodes WHERE synced_seq > 0;
"""


def _migrate_sync_epochs(conn: sqlite3.Connection) -> None:
    """Issue 12's step: per-epoch marks and dead letters; records rekeyed by (node, epoch, seq)
    (a table rebuild, once: SQLite cannot change a primary key in place). Records and marks
    from before are epoch 0, the epoch an edge without one sends."""
    conn.executescript(SYNC_SCHEMA)
    if "epoch" not in {row[1] for row in conn.execute("PRAGMA table_info(records)")}:
        conn.executescript(f"BEGIN IMMEDIATE;{RECORDS_BY_EPOCH}COMMIT;")


class Database:
    """One SQLite connection shared by the API threads and the gRPC loop, behind a lock.

    Queries are short; a lock around one connection is simpler and faster here than a pool.
    """

    def __init__(self, path: Path):
        self.path = path
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(SCHEMA)
        _add_missing_columns(conn)
        _migrate_sync_epochs(conn)
        self.db = sqlite_utils.Database(conn)
        self._lock = threading.RLock()

    @contextmanager
    def read(self) -> Iterator[sqlite_utils.Database]:
        with self._lock:
            yield self.db

    @contextmanager
    def write(self, *, durable: bool = False) -> Iterator[sqlite_utils.Database]:
        """A transaction: committed when the block ends, rolled back if it raises.

        durable: the commit is fsynced (synchronous=FULL) so it survives a power cut, for
        writes acknowledged to someone who then forgets the data (an edge's record batch).
        """
        with self._lock:
            conn = self.db.conn
            if durable:
                conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")
            finally:
                if durable:
                    conn.execute("PRAGMA synchronous=NORMAL")

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()
