"""/v1/fleet/summary: the numbers at the top of the dashboard (nodes, rollouts, records/minute)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel

from fieldline.cloud.api.deps import ContextDep, ViewerKey
from fieldline.cloud.api.routes.nodes import online
from fieldline.cloud.store import nodes as node_store
from fieldline.cloud.store import records as record_store
from fieldline.cloud.store import rollouts as rollout_store
from fieldline.shared.clock import now_ms

router = APIRouter(prefix="/v1/fleet", tags=["fleet"])


class MinuteCount(BaseModel):
    minute_ms: int  # start of the minute, ms since the epoch (record timestamps)
    total: int
    by_kind: dict[str, int]


class FleetSummary(BaseModel):
    nodes: int
    online: int
    rollouts_active: int
    minutes: int
    records_per_minute: list[MinuteCount]  # oldest first, one entry per minute, zeros included


@router.get("/summary")
def fleet_summary(
    ctx: ContextDep, _: ViewerKey, minutes: Annotated[int, Query(ge=1, le=1440)] = 30
) -> FleetSummary:
    nodes = node_store.list_nodes(ctx.db)
    now_minute = now_ms() // 60_000 * 60_000
    first = now_minute - (minutes - 1) * 60_000
    counts: dict[int, dict[str, int]] = {first + i * 60_000: {} for i in range(minutes)}
    for minute, kind, n in record_store.records_per_minute(ctx.db, since_ms=first):
        if minute in counts:
            counts[minute][kind] = n
    active = rollout_store.list_rollouts(ctx.db, states=rollout_store.ACTIVE_STATES, limit=1000)
    return FleetSummary(
        nodes=len(nodes),
        online=sum(online(ctx, n) for n in nodes),
        rollouts_active=len(active),
        minutes=minutes,
        records_per_minute=[
            MinuteCount(minute_ms=m, total=sum(k.values()), by_kind=k) for m, k in counts.items()
        ],
    )
