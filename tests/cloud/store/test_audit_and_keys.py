"""The audit trail's retention bound and the key columns' migration, on real SQLite files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from fieldline.cloud.store import audit as audit_store
from fieldline.cloud.store import auth as auth_store
from fieldline.cloud.store.db import Database


def test_audit_keeps_at_most_its_bound(tmp_path: Path) -> None:
    db = Database(tmp_path / "cloud.db")
    keep = 50
    for i in range(1, 1001):
        audit_store.record(
            db,
            key_id="key_a",
            role="admin",
            method="POST",
            path=f"/v1/x/{i}",
            status=201,
            keep=keep,
        )
    rows = audit_store.query(db, limit=1000)
    assert keep <= len(rows) <= keep + audit_store.PRUNE_EVERY
    assert rows[0].path == "/v1/x/1000"  # the newest kept, newest first


def test_a_database_from_before_revocation_gains_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "cloud.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE api_keys (id TEXT PRIMARY KEY, name TEXT NOT NULL DEFAULT '',"
        " role TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE, created TEXT NOT NULL);"
        "INSERT INTO api_keys VALUES ('key_old', 'admin', 'admin', 'h', '2026-01-01T00:00:00');"
    )
    old.commit()
    old.close()
    db = Database(path)
    (key,) = auth_store.list_api_keys(db)
    assert key.id == "key_old" and key.revoked_at is None and key.expires_at is None
