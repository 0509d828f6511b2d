"""The edge's local store (DATA/edge.db, mode 0600): credential, pinned key, desired state, artifacts.

SQLite in WAL mode, so `fieldline edge status` can read it while the daemon writes.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from fieldline.edge.control.identity import NodeTls
from fieldline.shared.clock import now_ms, utcnow
from fieldline.shared.health import LocalRollback, NodeHealth
from fieldline.shared.schemas import ArtifactState, DesiredState, ObservedState

DB_FILE = "edge.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS desired (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    generation INTEGER NOT NULL,
    document TEXT NOT NULL,
    received TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS artifacts (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    kind TEXT NOT NULL,
    path TEXT,
    state TEXT NOT NULL,
    error TEXT,
    updated TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS active (
    name TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    previous TEXT
);
CREATE TABLE IF NOT EXISTS local_rollbacks (
    name TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    from_version TEXT NOT NULL,
    to_version TEXT NOT NULL,
    reason TEXT NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (name, sha256)
);
"""


class StoreError(Exception):
    """The data directory holds no usable edge store."""


@dataclass(frozen=True)
class Credential:
    node_id: str
    secret: str
    cloud_public_key: bytes

    @property
    def bearer(self) -> str:
        return f"Bearer {self.node_id}.{self.secret}"


@dataclass(frozen=True)
class ArtifactRow:
    name: str
    version: str
    sha256: str
    kind: str
    path: str | None
    state: ArtifactState
    error: str | None


def _create_private(path: Path) -> None:
    """Create the file with mode 0600 before SQLite opens it (it holds the node secret)."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
    os.chmod(path, 0o600)


class EdgeStore:
    def __init__(self, data_dir: Path, *, read_only: bool = False):
        self.data_dir = data_dir
        path = data_dir / DB_FILE
        if read_only:
            if not path.exists():
                raise StoreError(f"{data_dir} holds no edge store ({DB_FILE} is missing)")
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        else:
            data_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(data_dir, 0o700)
            _create_private(path)
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(SCHEMA)
            for suffix in ("-wal", "-shm"):
                side = Path(f"{path}{suffix}")
                if side.exists():
                    os.chmod(side, 0o600)
        conn.execute("PRAGMA busy_timeout=5000")
        self.db = sqlite_utils.Database(conn)
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()

    # meta
    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self.db.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, **values: str) -> None:
        with self._lock:
            self.db.conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                list(values.items()),
            )

    # credential
    def credential(self) -> Credential | None:
        node_id, secret, key = (
            self.get_meta("node_id"),
            self.get_meta("node_secret"),
            self.get_meta("cloud_key"),
        )
        if not (node_id and secret and key):
            return None
        return Credential(node_id, secret, bytes.fromhex(key))

    def save_credential(
        self,
        cred: Credential,
        *,
        cloud: str,
        labels: dict[str, str],
        tls: NodeTls | None = None,
    ) -> None:
        values = {
            "node_id": cred.node_id,
            "node_secret": cred.secret,
            "cloud_key": cred.cloud_public_key.hex(),
            "cloud": cloud,
            "labels": json.dumps(labels),
            "enrolled_at": utcnow().isoformat(),
        }
        if tls is not None:
            values.update(
                tls_ca=tls.ca_pem.decode(),
                tls_cert=tls.cert_pem.decode(),
                tls_key=tls.key_pem.decode(),
            )
        self.set_meta(**values)

    def node_tls(self) -> NodeTls | None:
        """The node's TLS identity from enrollment (None on a plain cloud)."""
        ca, cert, key = self.get_meta("tls_ca"), self.get_meta("tls_cert"), self.get_meta("tls_key")
        if not (ca and cert and key):
            return None
        return NodeTls(ca.encode(), cert.encode(), key.encode())

    # desired state
    def desired(self) -> DesiredState | None:
        with self._lock:
            row = self.db.conn.execute("SELECT document FROM desired WHERE id = 1").fetchone()
        return DesiredState.model_validate_json(row[0]) if row else None

    def save_desired(self, desired: DesiredState) -> bool:
        """Persist a desired state unless this or a newer generation is stored; True if saved."""
        with self._lock:
            conn = self.db.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT generation FROM desired WHERE id = 1").fetchone()
                if row and row[0] >= desired.generation:
                    conn.execute("ROLLBACK")
                    return False
                conn.execute(
                    "INSERT INTO desired (id, generation, document, received) VALUES (1, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET generation = excluded.generation, "
                    "document = excluded.document, received = excluded.received",
                    (desired.generation, desired.model_dump_json(), utcnow().isoformat()),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return True

    # artifacts
    def set_artifact(
        self,
        *,
        name: str,
        version: str,
        sha256: str,
        kind: str,
        state: ArtifactState,
        path: str | None = None,
        error: str | None = None,
    ) -> None:
        with self._lock:
            self.db.table("artifacts").upsert(
                {
                    "name": name,
                    "version": version,
                    "sha256": sha256,
                    "kind": kind,
                    "path": path,
                    "state": state.value,
                    "error": error,
                    "updated": utcnow().isoformat(),
                },
                pk=("name", "version"),
            )

    def artifacts(self) -> list[ArtifactRow]:
        with self._lock:
            rows = list(self.db["artifacts"].rows_where(order_by="name, version"))
        return [
            ArtifactRow(
                name=r["name"],
                version=r["version"],
                sha256=r["sha256"],
                kind=r["kind"],
                path=r["path"],
                state=ArtifactState(r["state"]),
                error=r["error"],
            )
            for r in rows
        ]

    def artifact(self, name: str, version: str) -> ArtifactRow | None:
        for a in self.artifacts():
            if a.name == name and a.version == version:
                return a
        return None

    def delete_artifact(self, name: str, version: str) -> None:
        with self._lock:
            self.db.conn.execute(
                "DELETE FROM artifacts WHERE name = ? AND version = ?", (name, version)
            )

    def active(self) -> dict[str, str]:
        with self._lock:
            rows = self.db.conn.execute("SELECT name, version FROM active").fetchall()
        return dict(rows)

    def previous(self, name: str) -> str | None:
        with self._lock:
            row = self.db.conn.execute(
                "SELECT previous FROM active WHERE name = ?", (name,)
            ).fetchone()
        return row[0] if row else None

    def set_active(self, name: str, version: str) -> str | None:
        """Make `version` active for `name`; returns the version it replaced (now previous)."""
        with self._lock:
            conn = self.db.conn
            row = conn.execute("SELECT version FROM active WHERE name = ?", (name,)).fetchone()
            replaced = row[0] if row and row[0] != version else None
            if row is None:
                conn.execute("INSERT INTO active (name, version) VALUES (?, ?)", (name, version))
            elif replaced is not None:
                conn.execute(
                    "UPDATE active SET version = ?, previous = ? WHERE name = ?",
                    (version, replaced, name),
                )
        return replaced

    # local rollbacks: versions this node returned from by itself and will not activate again
    def add_local_rollback(self, mark: LocalRollback) -> None:
        with self._lock:
            self.db.conn.execute(
                "INSERT OR REPLACE INTO local_rollbacks "
                "(name, sha256, from_version, to_version, reason, at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    mark.name,
                    mark.sha256,
                    mark.from_version,
                    mark.to_version,
                    mark.reason,
                    mark.at.isoformat(),
                ),
            )

    def local_rollbacks(self) -> list[LocalRollback]:
        with self._lock:
            rows = self.db.conn.execute(
                "SELECT name, sha256, from_version, to_version, reason, at "
                "FROM local_rollbacks ORDER BY at"
            ).fetchall()
        return [
            LocalRollback(
                name=r[0], sha256=r[1], from_version=r[2], to_version=r[3], reason=r[4], at=r[5]
            )
            for r in rows
        ]

    def clear_local_rollback(self, name: str, sha256: str) -> None:
        with self._lock:
            self.db.conn.execute(
                "DELETE FROM local_rollbacks WHERE name = ? AND sha256 = ?", (name, sha256)
            )

    # observed state
    def save_observed(self, observed: ObservedState) -> None:
        self.set_meta(observed=observed.model_dump_json())

    def observed(self) -> ObservedState | None:
        text = self.get_meta("observed")
        return ObservedState.model_validate_json(text) if text else None

    # health (the last heartbeat's, for `fieldline edge status` and `edge healthcheck`)
    def save_health(self, health: NodeHealth) -> None:
        """Keep the heartbeat's health; health_at tells a live daemon from a stale file."""
        self.set_meta(health=health.model_dump_json(), health_at=str(now_ms()))

    def health(self) -> NodeHealth | None:
        text = self.get_meta("health")
        return NodeHealth.model_validate_json(text) if text else None
