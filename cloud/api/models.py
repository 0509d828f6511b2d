"""Request and response bodies of the admin API (pydantic), one group per resource."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field, field_validator

from fieldline.cloud.rollouts.spec import RolloutSpec
from fieldline.cloud.store.auth import Role, TokenState
from fieldline.shared.health import NodeHealth
from fieldline.shared.policy import Policy
from fieldline.shared.schemas import ArtifactStatus, NodeInfo, coerce_labels


class KeyCreate(BaseModel):
    role: Role
    name: str = Field(default="", max_length=128)
    # Seconds until the key stops working; None: until revoked.
    expires_in_s: int | None = Field(default=None, ge=1, le=10 * 365 * 24 * 3600)


class KeyCreated(BaseModel):
    id: str
    name: str
    role: Role
    key: str
    expires_at: datetime | None = None


class KeyPublic(BaseModel):
    """A key as listed: never its secret."""

    id: str
    name: str
    role: Role
    created: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None
    state: str  # active | expired | revoked


class TokenCreate(BaseModel):
    labels: dict[str, str] = Field(default_factory=dict)
    ttl_s: int | None = Field(default=None, ge=1, le=365 * 24 * 3600)

    _labels = field_validator("labels", mode="before")(coerce_labels)


class TokenCreated(BaseModel):
    id: str
    token: str
    labels: dict[str, str]
    expires_at: datetime


class TokenPublic(BaseModel):
    """An enrollment token as listed: never its secret."""

    id: str
    labels: dict[str, str]
    created: datetime | None
    expires_at: datetime
    used_at: datetime | None
    node_id: str | None
    revoked_at: datetime | None
    state: TokenState


class AuditPublic(BaseModel):
    id: int
    at: datetime
    key_id: str
    role: str
    method: str
    path: str
    status: int
    detail: str


class LabelsUpdate(BaseModel):
    labels: dict[str, str]

    _labels = field_validator("labels", mode="before")(coerce_labels)


class NodePublic(BaseModel):
    id: str
    labels: dict[str, str]
    online: bool
    created: datetime
    last_seen: datetime | None
    desired_generation: int
    applied_generation: int
    artifacts: list[ArtifactStatus] = Field(default_factory=list)
    active: dict[str, str] = Field(default_factory=dict)  # name -> version it runs
    errors: list[str] = Field(default_factory=list)
    # The latest heartbeat's health (else the one in the observed state); None before either.
    health: NodeHealth | None = None
    health_at: datetime | None = None  # when that heartbeat arrived
    node_info: NodeInfo = Field(default_factory=NodeInfo)
    synced_seq: int = 0
    # From the latest health: rows still to sync behind the live lane, and the age of the
    # oldest record not yet in the cloud above them (None: none, or no health yet).
    sync_backlog: int = 0
    sync_live_lag_ms: float | None = None
    revoked_at: datetime | None = None  # a revoked node can no longer connect
    tls: bool = False  # it holds a client certificate issued at enrollment


class AssignmentCreate(BaseModel):
    artifact: str = Field(description="NAME@VERSION", max_length=300)
    selector: dict[str, str]

    _selector = field_validator("selector", mode="before")(coerce_labels)

    @field_validator("artifact")
    @classmethod
    def _ref(cls, v: str) -> str:
        name, sep, version = v.partition("@")
        if not sep or not name or not version:
            raise ValueError("artifact must be NAME@VERSION")
        return v


class AssignmentPublic(BaseModel):
    id: int
    artifact: str
    selector: dict[str, str]
    nodes: list[str]


class PolicyApply(BaseModel):
    policy: Policy
    selector: dict[str, str]

    _selector = field_validator("selector", mode="before")(coerce_labels)


class PolicyApplied(BaseModel):
    id: int
    name: str
    selector: dict[str, str]
    nodes: list[str]


class RecordPublic(BaseModel):
    node_id: str
    epoch: int = 0
    live: bool = False  # sent in the live lane ahead of a backlog (else backfilled in order)
    seq: int
    kind: str
    topic: str
    ts_ms: int
    received_ms: int
    payload: Any = Field(description="JSON payloads as JSON, others as base64 text")
    payload_encoding: str


class RecordPage(BaseModel):
    records: list[RecordPublic]
    next_cursor: str | None


class DeadRecordPublic(BaseModel):
    """A record the cloud refused on its own (the rest of its batch was stored), and why."""

    id: int
    node_id: str
    epoch: int
    seq: int
    kind: str
    topic: str
    size: int
    reason: str
    received_ms: int


class DeadRecordPage(BaseModel):
    dead: list[DeadRecordPublic]
    next_cursor: str | None


class RolloutAction(BaseModel):
    """Body of pause, resume and abort: an optional reason for the history."""

    reason: str = Field(default="", max_length=500)


class RolloutNodePublic(BaseModel):
    node_id: str
    wave: int
    state: str  # waiting, applying, applied, soaking, healthy, failed, rolled_back
    reason: str
    previous: str | None
    target_generation: int | None
    updated: datetime


class RolloutWavePublic(BaseModel):
    index: int  # 1-based, as people count waves
    size: int
    state: str  # waiting, running, soaking, passed, failed, rolled_back
    counts: dict[str, int]  # node state -> nodes


class RolloutEventPublic(BaseModel):
    at: datetime
    state: str
    wave: int | None  # 1-based
    reason: str
    actor: str


class RolloutPublic(BaseModel):
    id: str
    state: str  # pending, running, paused, succeeded, rolled_back, aborted
    reason: str
    artifact: str | None
    policy: str | None  # the policy's name
    selector: dict[str, str]
    spec: RolloutSpec
    wave: int  # 1-based index of the current (or last) wave
    waves: list[RolloutWavePublic]
    soak_started_at: datetime | None
    created: datetime
    updated: datetime
    created_by: str
    nodes: list[RolloutNodePublic] | None = None  # in GET /v1/rollouts/{id}
    history: list[RolloutEventPublic] | None = None  # in GET /v1/rollouts/{id}
