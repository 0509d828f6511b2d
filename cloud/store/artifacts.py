"""Artifact manifests (the blobs themselves are in the blob store) and assignments."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fieldline.cloud.store.db import Database
from fieldline.shared.clock import utcnow
from fieldline.shared.schemas import ArtifactManifest, SignedManifest


class ArtifactExists(Exception):
    pass


class ArtifactNotFound(Exception):
    pass


def insert_artifact(db: Database, *, signed: SignedManifest) -> None:
    m = signed.manifest
    with db.write() as d:
        if d["artifacts"].count_where("name = ? AND version = ?", [m.name, m.version]):
            raise ArtifactExists(m.ref)
        d["artifacts"].insert(
            {
                "name": m.name,
                "version": m.version,
                "kind": m.kind.value,
                "size": m.size,
                "sha256": m.sha256,
                "payload": signed.payload,
                "signature": signed.signature,
                "created": m.created.isoformat(),
            }
        )


def _signed(r: dict[str, Any]) -> SignedManifest:
    return SignedManifest(payload=r["payload"], signature=r["signature"])


def get_artifact(db: Database, *, name: str, version: str) -> SignedManifest:
    with db.read() as d:
        rows = list(d["artifacts"].rows_where("name = ? AND version = ?", [name, version]))
    if not rows:
        raise ArtifactNotFound(f"{name}@{version}")
    return _signed(rows[0])


def list_artifacts(db: Database) -> list[ArtifactManifest]:
    with db.read() as d:
        rows = list(d["artifacts"].rows_where(order_by="created, name, version"))
    return [_signed(r).manifest for r in rows]


def sha256_in_use(db: Database, *, sha256: str) -> bool:
    with db.read() as d:
        return d["artifacts"].count_where("sha256 = ?", [sha256]) > 0


@dataclass(frozen=True)
class Assignment:
    id: int
    artifact_name: str
    artifact_version: str
    selector: dict[str, str]
    created: str


def add_assignment(db: Database, *, name: str, version: str, selector: dict[str, str]) -> int:
    with db.write() as d:
        table = d["assignments"]
        table.insert(
            {
                "artifact_name": name,
                "artifact_version": version,
                "selector": json.dumps(selector),
                "created": utcnow().isoformat(),
            }
        )
        return int(table.last_pk)  # type: ignore[arg-type]


def list_assignments(db: Database) -> list[Assignment]:
    """Every assignment, oldest first (later ones win for the same artifact name)."""
    with db.read() as d:
        rows = list(d["assignments"].rows_where(order_by="id"))
    return [
        Assignment(
            id=r["id"],
            artifact_name=r["artifact_name"],
            artifact_version=r["artifact_version"],
            selector=json.loads(r["selector"]),
            created=r["created"],
        )
        for r in rows
    ]
