"""`fieldline edge status`: what a node has, read from its store (also while the daemon runs).

Health is the NodeHealth the daemon keeps in the store's `health` meta each heartbeat (the same
document it sends the cloud), else the one in its last observed state.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ValidationError

from fieldline.edge.store import EdgeStore, StoreError
from fieldline.shared.health import NodeHealth
from fieldline.shared.schemas import ArtifactStatus


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
    health: NodeHealth | None
    health_at: datetime | None = None  # when the daemon last stored it
    health_error: str | None = None  # the stored health did not read as NodeHealth
    artifacts: list[ArtifactStatus]


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


def _health(store: EdgeStore) -> tuple[NodeHealth | None, datetime | None, str | None]:
    """(health, when stored, why it did not read) from the store's health meta."""
    text, stamp = store.get_meta("health"), store.get_meta("health_at")
    at = datetime.fromtimestamp(int(stamp) / 1000, tz=UTC) if stamp else None
    if not text:
        return None, at, None
    try:
        return NodeHealth.model_validate_json(text), at, None
    except ValidationError as exc:
        return None, at, f"stored health is not a NodeHealth: {exc.error_count()} error(s)"


def _status(store: EdgeStore) -> EdgeStatus:
    cred = store.credential()
    desired = store.desired()
    observed = store.observed()
    health, health_at, health_error = _health(store)
    if health is None and health_error is None and observed is not None:
        health = observed.health
    return EdgeStatus(
        node_id=cred.node_id if cred else None,
        cloud=store.get_meta("cloud"),
        labels=json.loads(store.get_meta("labels") or "{}"),
        cloud_key_fingerprint=(
            hashlib.sha256(cred.cloud_public_key).hexdigest()[:16] if cred else None
        ),
        desired_generation=desired.generation if desired else 0,
        applied_generation=observed.applied_generation if observed else 0,
        active=store.active(),
        errors=observed.errors if observed else [],
        health=health,
        health_at=health_at,
        health_error=health_error,
        artifacts=[
            ArtifactStatus(
                name=a.name, version=a.version, sha256=a.sha256, state=a.state, error=a.error
            )
            for a in store.artifacts()
        ],
    )
