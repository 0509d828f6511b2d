"""The audit trail: who (key id and role) changed what (method, path), when, and the outcome;
kept under a row bound, oldest pruned first."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from fieldline.cloud.store.db import Database
from fieldline.shared.clock import utcnow

MAX_DETAIL_CHARS = 1024
PRUNE_EVERY = 100  # rows between prunes: pruning on every insert would double the writes


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime
    key_id: str
    role: str
    method: str
    path: str
    status: int
    detail: str


def record(
    db: Database,
    *,
    key_id: str,
    role: str,
    method: str,
    path: str,
    status: int,
    detail: str = "",
    keep: int,
) -> int:
    """Append one entry; every PRUNE_EVERY rows, drop all but the newest `keep`."""
    with db.write() as d:
        row_id = (
            d["audit"]
            .insert(
                {
                    "at": utcnow().isoformat(),
                    "key_id": key_id,
                    "role": role,
                    "method": method,
                    "path": path,
                    "status": status,
                    "detail": detail[:MAX_DETAIL_CHARS],
                }
            )
            .last_pk
        )
        if row_id % PRUNE_EVERY == 0 or keep < PRUNE_EVERY:
            d.execute("DELETE FROM audit WHERE id <= ?", [row_id - keep])
    return int(row_id)


def query(
    db: Database,
    *,
    key_id: str | None = None,
    before_id: int | None = None,
    limit: int,
) -> list[AuditEntry]:
    """Newest first; `before_id` pages back."""
    where: list[str] = ["1 = 1"]
    args: list[object] = []
    if key_id is not None:
        where.append("key_id = ?")
        args.append(key_id)
    if before_id is not None:
        where.append("id < ?")
        args.append(before_id)
    with db.read() as d:
        rows = d["audit"].rows_where(" AND ".join(where), args, order_by="id DESC", limit=limit)
        return [
            AuditEntry(
                id=r["id"],
                at=datetime.fromisoformat(r["at"]),
                key_id=r["key_id"],
                role=r["role"],
                method=r["method"],
                path=r["path"],
                status=r["status"],
                detail=r["detail"],
            )
            for r in rows
        ]
