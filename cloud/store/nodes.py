"""Nodes: credentials, labels, what they said about themselves, desired and observed state."""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any, TypeVar

import structlog
from pydantic import BaseModel, ValidationError

from fieldline.cloud.store.db import Database
from fieldline.shared.clock import utcnow
from fieldline.shared.health import NodeHealth
from fieldline.shared.ids import hash_secret, secret_matches
from fieldline.shared.schemas import NodeInfo, ObservedState

log = structlog.get_logger(__name__)
M = TypeVar("M", bound=BaseModel)


class NodeNotFound(Exception):
    pass


def _stored(model: type[M], text: str | None, node_id: str, what: str) -> M | None:
    """A document as the tunnel validated and stored it; None (logged) if it no longer
    validates, for example one stored by an older cloud."""
    if not text:
        return None
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        log.warning("stored document no longer valid", node=node_id, what=what, error=str(exc))
        return None


@dataclass
class NodeRow:
    """One node as stored; its health and observed state are parsed on first use (fleet-wide
    listings that only match labels never pay for parsing them)."""

    id: str
    labels: dict[str, str]
    node_info: NodeInfo
    created: datetime
    last_seen: datetime | None
    desired_generation: int
    desired: str | None  # DesiredState JSON
    applied_generation: int
    observed_json: str | None  # ObservedState JSON
    health_json: str | None  # the latest heartbeat's NodeHealth JSON
    synced_seq: int
    health_at: datetime | None = None  # when that health arrived
    revoked_at: datetime | None = None
    cert_sha256: str | None = None

    @cached_property
    def observed(self) -> ObservedState | None:
        return _stored(ObservedState, self.observed_json, self.id, "observed state")

    @cached_property
    def health(self) -> NodeHealth | None:
        """The latest heartbeat's health, else the health in the observed state, else None."""
        heartbeat = _stored(NodeHealth, self.health_json, self.id, "health")
        if heartbeat is not None:
            return heartbeat
        return self.observed.health if self.observed is not None else None


def _row(r: dict[str, Any]) -> NodeRow:
    return NodeRow(
        id=r["id"],
        labels=json.loads(r["labels"]),
        node_info=NodeInfo.model_validate_json(r["node_info"] or "{}"),
        created=datetime.fromisoformat(r["created"]),
        last_seen=datetime.fromisoformat(r["last_seen"]) if r["last_seen"] else None,
        desired_generation=r["desired_generation"],
        desired=r["desired"],
        applied_generation=r["applied_generation"],
        observed_json=r["observed"],
        health_json=r["health"],
        synced_seq=r["synced_seq"],
        health_at=datetime.fromisoformat(r["health_at"]) if r.get("health_at") else None,
        revoked_at=datetime.fromisoformat(r["revoked_at"]) if r.get("revoked_at") else None,
        cert_sha256=r.get("cert_sha256"),
    )


def create_node(
    db: Database,
    *,
    node_id: str,
    secret: str,
    labels: dict[str, str],
    node_info: NodeInfo | None = None,
    cert_sha256: str | None = None,
) -> None:
    info = node_info or NodeInfo()
    with db.write() as d:
        d["nodes"].insert(
            {
                "id": node_id,
                "secret_hash": hash_secret(secret),
                "labels": json.dumps(labels),
                "node_info": info.model_dump_json(),
                "created": utcnow().isoformat(),
                "last_seen": None,
                "desired_generation": 0,
                "desired": None,
                "applied_generation": 0,
                "observed": None,
                "synced_seq": 0,
                "cert_sha256": cert_sha256,
                "revoked_at": None,
            }
        )


def authenticate_node(db: Database, *, node_id: str, secret: str) -> bool:
    """The secret is this node's and the node is not revoked."""
    with db.read() as d:
        rows = list(d["nodes"].rows_where("id = ?", [node_id], select="secret_hash, revoked_at"))
    return (
        bool(rows)
        and rows[0]["revoked_at"] is None
        and secret_matches(secret, rows[0]["secret_hash"])
    )


def check_secret(db: Database, *, node_id: str, secret: str) -> str:
    """ "ok", "revoked" (the secret is right but the node was revoked) or "bad"."""
    with db.read() as d:
        rows = list(d["nodes"].rows_where("id = ?", [node_id], select="secret_hash, revoked_at"))
    if not rows or not secret_matches(secret, rows[0]["secret_hash"]):
        return "bad"
    return "revoked" if rows[0]["revoked_at"] is not None else "ok"


def certificate_matches(db: Database, *, node_id: str, cert_sha256: str) -> bool:
    """The certificate is the one issued to this node at enrollment, and it is not revoked."""
    with db.read() as d:
        rows = list(d["nodes"].rows_where("id = ?", [node_id], select="cert_sha256, revoked_at"))
    return (
        bool(rows)
        and rows[0]["revoked_at"] is None
        and rows[0]["cert_sha256"] is not None
        and hmac.compare_digest(rows[0]["cert_sha256"], cert_sha256)
    )


def revoke_node(db: Database, *, node_id: str) -> datetime:
    """Mark the node revoked (idempotent); returns when it was revoked."""
    with db.write() as d:
        rows = list(d["nodes"].rows_where("id = ?", [node_id], select="revoked_at"))
        if not rows:
            raise NodeNotFound(node_id)
        if rows[0]["revoked_at"]:
            return datetime.fromisoformat(rows[0]["revoked_at"])
        when = utcnow()
        d["nodes"].update(node_id, {"revoked_at": when.isoformat()})
    return when


def is_revoked(db: Database, *, node_id: str) -> bool:
    with db.read() as d:
        rows = list(d["nodes"].rows_where("id = ?", [node_id], select="revoked_at"))
    return bool(rows) and rows[0]["revoked_at"] is not None


def get_node(db: Database, *, node_id: str) -> NodeRow:
    with db.read() as d:
        rows = list(d["nodes"].rows_where("id = ?", [node_id]))
    if not rows:
        raise NodeNotFound(node_id)
    return _row(rows[0])


def list_nodes(db: Database) -> list[NodeRow]:
    with db.read() as d:
        return [_row(r) for r in d["nodes"].rows_where(order_by="created, id")]


def get_nodes(db: Database, *, node_ids: list[str]) -> dict[str, NodeRow]:
    """The rows of these nodes (those that exist), by id, in one query."""
    if not node_ids:
        return {}
    marks = ",".join("?" * len(node_ids))
    with db.read() as d:
        rows = d["nodes"].rows_where(f"id IN ({marks})", node_ids)
        return {r["id"]: _row(r) for r in rows}


def set_labels(db: Database, *, node_id: str, labels: dict[str, str]) -> None:
    with db.write() as d:
        if d["nodes"].count_where("id = ?", [node_id]) == 0:
            raise NodeNotFound(node_id)
        d["nodes"].update(node_id, {"labels": json.dumps(labels)})


def touch_node(
    db: Database,
    *,
    node_id: str,
    node_info: NodeInfo | None = None,
    health: NodeHealth | None = None,
) -> None:
    """Record that the node was heard from (what it says about itself on hello, its health)."""
    now = utcnow().isoformat()
    values: dict[str, Any] = {"last_seen": now}
    if node_info is not None:
        values["node_info"] = node_info.model_dump_json()
    if health is not None:
        values["health"] = health.model_dump_json()
        values["health_at"] = now
    with db.write() as d:
        d["nodes"].update(node_id, values)


def set_desired(db: Database, *, node_id: str, generation: int, desired_json: str) -> None:
    with db.write() as d:
        d["nodes"].update(node_id, {"desired_generation": generation, "desired": desired_json})


def set_observed(db: Database, *, node_id: str, observed: ObservedState) -> None:
    with db.write() as d:
        d["nodes"].update(
            node_id,
            {
                "applied_generation": observed.applied_generation,
                "observed": observed.model_dump_json(),
                "last_seen": utcnow().isoformat(),
            },
        )
