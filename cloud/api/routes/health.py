"""/healthz and /metrics: unauthenticated, for probes and Prometheus scrapers."""

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fieldline.cloud.api.deps import ContextDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(ctx: ContextDep) -> dict[str, object]:
    return {"status": "ok", "tunnels": ctx.sessions.count()}


@router.get("/metrics")
def metrics(ctx: ContextDep) -> Response:
    return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)
