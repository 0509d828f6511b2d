"""`fieldline edge status`: what a node has, read from its store (also while the daemon runs)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from fieldline.edge.store import EdgeStore, StoreError


class StatusError(Exception):
    pass


class EdgeStatus(BaseModel):
    node_id: str | None
    cloud: str | None
    labels: dict[str, str]
    cloud_key_fingerprint: str | None
    desired_generation: int
    applied_generation: int
    active: dict[str, str]
    errors: list[str]
    health: dict[str, Any]
    artifacts: list[dict[str, Any]]


def read_status(data_dir: Path) -> EdgeStatus:
    try:
        store = EdgeStore(data_dir, read_only=True)
    except StoreError as exc:
        raise StatusError(str(exc)) from exc
    try:
        return _status(store)
    except sqlite3.OperationalError as exc:  # created but not yet set up by a starting daemon
        raise StatusError(f"{data_dir} holds no complete edge store yet ({exc})") from exc
    finally:
        store.close()


def _status(store: EdgeStore) -> EdgeStatus:
    cred = store.credential()
    desired = store.desired()
    observed = store.observed()
    labels = json.loads(store.get_meta("labels") or "{}")
    return EdgeStatus(
        node_id=cred.node_id if cred else None,
        cloud=store.get_meta("cloud"),
        labels=labels,
        cloud_key_fingerprint=(
            hashlib.sha256(cred.cloud_public_key).hexdigest()[:16] if cred else None
        ),
        desired_generation=desired.generation if desired else 0,
        applied_generation=observed.applied_generation if observed else 0,
        active=store.active(),
        errors=observed.errors if observed else [],
        health=json.loads(store.get_meta("health") or "null")
        or (observed.health if observed else {}),
        artifacts=[
            {
                "name": a.name,
                "version": a.version,
                "state": a.state.value,
                "sha256": a.sha256[:12],
                "error": a.error,
            }
            for a in store.artifacts()
        ],
    )
