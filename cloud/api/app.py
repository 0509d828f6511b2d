"""The admin API application: routers, error bodies, request metrics."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response

from fieldline.cloud.api.guard import RequestGuard
from fieldline.cloud.api.routes import (
    artifacts,
    assignments,
    audit,
    dashboard,
    fleet,
    health,
    keys,
    nodes,
    policies,
    quantize,
    records,
    rollouts,
    tokens,
)
from fieldline.cloud.context import CloudContext


def create_app(ctx: CloudContext) -> FastAPI:
    app = FastAPI(
        title="fieldline cloud",
        version="0.1.0",
        description="Admin API of the fieldline cloud controller. Bearer API keys; "
        "roles admin > operator > viewer.",
    )
    app.state.ctx = ctx
    for module in (
        health,
        keys,
        tokens,
        audit,
        nodes,
        quantize,
        artifacts,
        assignments,
        policies,
        records,
        rollouts,
        fleet,
        dashboard,
    ):
        app.include_router(module.router)

    @app.middleware("http")
    async def observe(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        ctx.metrics.http_requests.labels(path, str(response.status_code)).observe(
            time.perf_counter() - started
        )
        return response

    app.add_middleware(RequestGuard, ctx=ctx)  # added last: runs first
    return app
