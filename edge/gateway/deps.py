"""What the gateway's routes share: the state object on app.state and its dependency aliases."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from prometheus_client import CollectorRegistry

from fieldline.edge.gateway.metrics import GatewayMetrics
from fieldline.edge.inspection.runtime import Verdict
from fieldline.edge.llm.prefetch import HotRequests
from fieldline.edge.llm.response_cache import ResponseCache
from fieldline.edge.llm.runtime import LLMRuntime
from fieldline.shared.config import GatewaySettings

# rule name, payload, publish -> the verdict's future (InspectionRuntime.submit)
InspectFn = Callable[[str, bytes, bool], "Future[Verdict]"]


@dataclass
class GatewayState:
    settings: GatewaySettings
    llm: LLMRuntime
    cache: ResponseCache
    hot: HotRequests
    metrics: GatewayMetrics
    inspect: InspectFn | None = None
    # More registries shown on /metrics (the data plane's inspection and MQTT metrics).
    extra_registries: list[CollectorRegistry] = field(default_factory=list)


def get_state(request: Request) -> GatewayState:
    return request.app.state.gateway  # type: ignore[no-any-return]


StateDep = Annotated[GatewayState, Depends(get_state)]


def require_key(request: Request, state: StateDep) -> None:
    """With gateway.api_key set, /v1 routes need "Authorization: Bearer <key>"."""
    key = state.settings.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), key):
        raise HTTPException(401, "missing or wrong API key: send Authorization: Bearer <key>")
