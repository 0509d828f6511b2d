"""/v1/rollouts: staged rollouts of an artifact and/or a policy, with health gates."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from fieldline.cloud.api.deps import ContextDep, OperatorKey, ViewerKey
from fieldline.cloud.api.models import (
    RolloutAction,
    RolloutEventPublic,
    RolloutNodePublic,
    RolloutPublic,
    RolloutWavePublic,
)
from fieldline.cloud.context import CloudContext
from fieldline.cloud.rollouts.controller import RolloutRefused
from fieldline.cloud.rollouts.spec import RolloutSpec
from fieldline.cloud.store import rollouts as rollout_store
from fieldline.cloud.store.auth import ApiKey

router = APIRouter(prefix="/v1/rollouts", tags=["rollouts"])
STATES = "^(pending|running|paused|succeeded|rolled_back|aborted)$"


def _actor(key: ApiKey) -> str:
    return f"{key.name or key.role.value} ({key.id})"


def _wave_state(r: rollout_store.RolloutRow, index: int, counts: dict[str, int]) -> str:
    if counts.get("failed"):
        return "failed"
    if counts.get("rolled_back"):
        return "rolled_back"
    if counts and set(counts) == {"healthy"}:
        return "passed"
    if index == r.wave and r.state in ("running", "paused"):
        return "soaking" if r.soak_started_at is not None else "running"
    return "waiting"


def rollout_public(
    ctx: CloudContext,
    r: rollout_store.RolloutRow,
    counts: dict[int, dict[str, int]],
    *,
    detail: bool,
) -> RolloutPublic:
    spec = RolloutSpec.model_validate_json(r.spec)
    waves = [
        RolloutWavePublic(
            index=i + 1,
            size=sum(counts.get(i, {}).values()),
            state=_wave_state(r, i, counts.get(i, {})),
            counts=counts.get(i, {}),
        )
        for i in sorted(counts)
    ]
    public = RolloutPublic(
        id=r.id,
        state=r.state,
        reason=r.reason,
        artifact=spec.artifact,
        policy=spec.policy_name,
        selector=spec.selector,
        spec=spec,
        wave=r.wave + 1,
        waves=waves,
        soak_started_at=r.soak_started_at,
        created=r.created,
        updated=r.updated,
        created_by=r.created_by,
    )
    if detail:
        public.nodes = [
            RolloutNodePublic(
                node_id=n.node_id,
                wave=n.wave + 1,
                state=n.state,
                reason=n.reason,
                previous=n.previous,
                target_generation=n.target_generation,
                updated=n.updated,
            )
            for n in rollout_store.rollout_nodes(ctx.db, rollout_id=r.id)
        ]
        public.history = [
            RolloutEventPublic(
                at=e.at,
                state=e.state,
                wave=None if e.wave is None else e.wave + 1,
                reason=e.reason,
                actor=e.actor,
            )
            for e in rollout_store.events(ctx.db, rollout_id=r.id)
        ]
    return public


def _one(ctx: CloudContext, rollout_id: str) -> RolloutPublic:
    try:
        r = rollout_store.get_rollout(ctx.db, rollout_id=rollout_id)
    except rollout_store.RolloutNotFound:
        raise HTTPException(404, f"rollout {rollout_id} not found") from None
    counts = rollout_store.wave_counts(ctx.db, rollout_ids=[r.id]).get(r.id, {})
    return rollout_public(ctx, r, counts, detail=True)


def _refused(exc: RolloutRefused) -> HTTPException:
    return HTTPException(exc.status, str(exc))


@router.post("", status_code=201)
def create_rollout(body: RolloutSpec, ctx: ContextDep, key: OperatorKey) -> RolloutPublic:
    try:
        rollout_id = ctx.rollouts.create(body, _actor(key))
    except RolloutRefused as exc:
        raise _refused(exc) from None
    return _one(ctx, rollout_id)


@router.get("")
def list_rollouts(
    ctx: ContextDep,
    _: ViewerKey,
    state: Annotated[str | None, Query(pattern=STATES)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[RolloutPublic]:
    rows = rollout_store.list_rollouts(ctx.db, states=(state,) if state else None, limit=limit)
    counts = rollout_store.wave_counts(ctx.db, rollout_ids=[r.id for r in rows])
    return [rollout_public(ctx, r, counts.get(r.id, {}), detail=False) for r in rows]


@router.get("/{rollout_id}")
def get_rollout(rollout_id: str, ctx: ContextDep, _: ViewerKey) -> RolloutPublic:
    return _one(ctx, rollout_id)


def _act(
    ctx: CloudContext, rollout_id: str, key: ApiKey, body: RolloutAction | None, verb: str
) -> RolloutPublic:
    """Run controller.<verb> (pause, resume, abort) and answer the rollout as it now stands."""
    try:
        getattr(ctx.rollouts, verb)(rollout_id, _actor(key), body.reason if body else "")
    except RolloutRefused as exc:
        raise _refused(exc) from None
    return _one(ctx, rollout_id)


@router.post("/{rollout_id}/pause")
def pause_rollout(
    rollout_id: str, ctx: ContextDep, key: OperatorKey, body: RolloutAction | None = None
) -> RolloutPublic:
    return _act(ctx, rollout_id, key, body, "pause")


@router.post("/{rollout_id}/resume")
def resume_rollout(
    rollout_id: str, ctx: ContextDep, key: OperatorKey, body: RolloutAction | None = None
) -> RolloutPublic:
    return _act(ctx, rollout_id, key, body, "resume")


@router.post("/{rollout_id}/abort")
def abort_rollout(
    rollout_id: str, ctx: ContextDep, key: OperatorKey, body: RolloutAction | None = None
) -> RolloutPublic:
    return _act(ctx, rollout_id, key, body, "abort")
