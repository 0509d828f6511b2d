"""Rollouts: their spec and state, the nodes of each wave, their history, and the per-node pins
through which a running rollout overrides what the assignments give a node.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fieldline.cloud.store.db import Database
from fieldline.shared.clock import utcnow

ACTIVE_STATES = ("pending", "running", "paused")


class RolloutNotFound(Exception):
    pass


@dataclass(frozen=True)
class RolloutRow:
    id: str
    spec: str  # the RolloutSpec as JSON
    state: str
    reason: str
    wave: int  # index of the current wave
    wave_started_at: datetime | None
    soak_started_at: datetime | None
    created: datetime
    updated: datetime
    created_by: str


@dataclass(frozen=True)
class RolloutNodeRow:
    node_id: str
    wave: int
    position: int
    state: str
    reason: str
    previous: str | None  # what the node ran before (a version, or a policy name)
    target_generation: int | None
    updated: datetime


@dataclass(frozen=True)
class RolloutEvent:
    at: datetime
    state: str
    wave: int | None
    reason: str
    actor: str


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _rollout(r: dict[str, Any]) -> RolloutRow:
    return RolloutRow(
        id=r["id"],
        spec=r["spec"],
        state=r["state"],
        reason=r["reason"],
        wave=r["wave"],
        wave_started_at=_dt(r["wave_started_at"]),
        soak_started_at=_dt(r["soak_started_at"]),
        created=datetime.fromisoformat(r["created"]),
        updated=datetime.fromisoformat(r["updated"]),
        created_by=r["created_by"],
    )


def insert_rollout(
    db: Database,
    *,
    rollout_id: str,
    spec_json: str,
    created_by: str,
    nodes: list[tuple[str, int, str | None]],
    reason: str,
) -> None:
    """Create a pending rollout with its nodes: (node id, wave index, previous), in wave order."""
    now = utcnow().isoformat()
    with db.write() as d:
        d["rollouts"].insert(
            {
                "id": rollout_id,
                "spec": spec_json,
                "state": "pending",
                "reason": reason,
                "wave": 0,
                "wave_started_at": None,
                "soak_started_at": None,
                "created": now,
                "updated": now,
                "created_by": created_by,
            }
        )
        d["rollout_nodes"].insert_all(
            (
                {
                    "rollout_id": rollout_id,
                    "node_id": node_id,
                    "wave": wave,
                    "position": i,
                    "state": "waiting",
                    "reason": "",
                    "previous": previous,
                    "target_generation": None,
                    "updated": now,
                }
                for i, (node_id, wave, previous) in enumerate(nodes)
            ),
            batch_size=500,
        )
        _event(d.conn, rollout_id, now, "pending", None, reason, created_by)


def _event(
    conn: Any, rollout_id: str, at: str, state: str, wave: int | None, reason: str, actor: str
) -> None:
    conn.execute(
        "INSERT INTO rollout_events (rollout_id, at, state, wave, reason, actor) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (rollout_id, at, state, wave, reason, actor),
    )


def get_rollout(db: Database, *, rollout_id: str) -> RolloutRow:
    with db.read() as d:
        rows = list(d["rollouts"].rows_where("id = ?", [rollout_id]))
    if not rows:
        raise RolloutNotFound(rollout_id)
    return _rollout(rows[0])


def list_rollouts(
    db: Database, *, states: tuple[str, ...] | None = None, limit: int = 100
) -> list[RolloutRow]:
    """Newest first."""
    where, args = None, []
    if states:
        where = f"state IN ({','.join('?' * len(states))})"
        args = list(states)
    with db.read() as d:
        rows = d["rollouts"].rows_where(where, args, order_by="created DESC, id", limit=limit)
        return [_rollout(r) for r in rows]


def update_rollout(
    db: Database,
    *,
    rollout_id: str,
    event: tuple[str, str] | None = None,
    actor: str = "controller",
    **values: Any,
) -> None:
    """Change a rollout's columns; `event` (state, reason) is appended to its history."""
    now = utcnow().isoformat()
    row: dict[str, Any] = {"updated": now}
    for key, value in values.items():
        row[key] = value.isoformat() if isinstance(value, datetime) else value
    with db.write() as d:
        d["rollouts"].update(rollout_id, row)
        if event is not None:
            wave = values.get("wave")
            if wave is None:
                (wave,) = d.conn.execute(
                    "SELECT wave FROM rollouts WHERE id = ?", (rollout_id,)
                ).fetchone()
            _event(d.conn, rollout_id, now, event[0], wave, event[1], actor)


def rollout_nodes(
    db: Database, *, rollout_id: str, wave: int | None = None
) -> list[RolloutNodeRow]:
    sql = (
        "SELECT node_id, wave, position, state, reason, previous, target_generation, updated "
        "FROM rollout_nodes WHERE rollout_id = ?"
    )
    args: list[Any] = [rollout_id]
    if wave is not None:
        sql += " AND wave = ?"
        args.append(wave)
    sql += " ORDER BY position"
    with db.read() as d:
        rows = d.conn.execute(sql, args).fetchall()
    return [
        RolloutNodeRow(
            node_id=r[0],
            wave=r[1],
            position=r[2],
            state=r[3],
            reason=r[4],
            previous=r[5],
            target_generation=r[6],
            updated=datetime.fromisoformat(r[7]),
        )
        for r in rows
    ]


def set_node_states(
    db: Database,
    *,
    rollout_id: str,
    updates: list[tuple[str, str, str]],
    target_generations: dict[str, int] | None = None,
) -> None:
    """updates: (node id, state, reason); target_generations: node id -> generation to reach."""
    now = utcnow().isoformat()
    targets = target_generations or {}
    with db.write() as d:
        for node_id, state, reason in updates:
            if node_id in targets:
                d.conn.execute(
                    "UPDATE rollout_nodes SET state = ?, reason = ?, target_generation = ?, "
                    "updated = ? WHERE rollout_id = ? AND node_id = ?",
                    (state, reason, targets[node_id], now, rollout_id, node_id),
                )
            else:
                d.conn.execute(
                    "UPDATE rollout_nodes SET state = ?, reason = ?, updated = ? "
                    "WHERE rollout_id = ? AND node_id = ?",
                    (state, reason, now, rollout_id, node_id),
                )


def events(db: Database, *, rollout_id: str) -> list[RolloutEvent]:
    with db.read() as d:
        rows = d.conn.execute(
            "SELECT at, state, wave, reason, actor FROM rollout_events "
            "WHERE rollout_id = ? ORDER BY id",
            (rollout_id,),
        ).fetchall()
    return [RolloutEvent(datetime.fromisoformat(r[0]), r[1], r[2], r[3], r[4]) for r in rows]


def wave_counts(db: Database, *, rollout_ids: list[str]) -> dict[str, dict[int, dict[str, int]]]:
    """rollout id -> wave -> node state -> count (for listings without every node)."""
    if not rollout_ids:
        return {}
    marks = ",".join("?" * len(rollout_ids))
    with db.read() as d:
        rows = d.conn.execute(
            f"SELECT rollout_id, wave, state, COUNT(*) FROM rollout_nodes "
            f"WHERE rollout_id IN ({marks}) GROUP BY rollout_id, wave, state",
            rollout_ids,
        ).fetchall()
    out: dict[str, dict[int, dict[str, int]]] = {}
    for rollout_id, wave, state, n in rows:
        out.setdefault(rollout_id, {}).setdefault(wave, {})[state] = n
    return out


# -- pins: a running rollout's per-node override of the assignments --------------------------


def set_pins(
    db: Database,
    *,
    rollout_id: str,
    node_ids: list[str],
    kind: str,
    name: str,
    version: str | None,
) -> None:
    with db.write() as d:
        d.conn.executemany(
            "INSERT OR REPLACE INTO node_pins (node_id, kind, name, version, rollout_id) "
            "VALUES (?, ?, ?, ?, ?)",
            [(n, kind, name, version, rollout_id) for n in node_ids],
        )


def delete_pins(db: Database, *, rollout_id: str, node_ids: list[str] | None = None) -> None:
    with db.write() as d:
        if node_ids is None:
            d.conn.execute("DELETE FROM node_pins WHERE rollout_id = ?", (rollout_id,))
        else:
            d.conn.executemany(
                "DELETE FROM node_pins WHERE rollout_id = ? AND node_id = ?",
                [(rollout_id, n) for n in node_ids],
            )


def pins_for(db: Database, *, node_id: str) -> tuple[dict[str, str], dict[str, Any] | None]:
    """A node's pins: artifact name -> version, and the pinned policy document (or None)."""
    with db.read() as d:
        rows = d.conn.execute(
            "SELECT p.kind, p.name, p.version, r.spec FROM node_pins p "
            "JOIN rollouts r ON r.id = p.rollout_id WHERE p.node_id = ?",
            (node_id,),
        ).fetchall()
    artifacts: dict[str, str] = {}
    policy: dict[str, Any] | None = None
    for kind, name, version, spec in rows:
        if kind == "artifact" and version:
            artifacts[name] = version
        elif kind == "policy":
            policy = json.loads(spec).get("policy")
    return artifacts, policy
