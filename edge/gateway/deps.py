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
from fieldline.edge.llm.services import LlmServices
from fieldline.shared.config import GatewaySettings
from fieldline.shared.health import GatewayHealth

# rule name, payload, publish -> the verdict's future (InspectionRuntime.submit)
InspectFn = Callable[[str, bytes, bool], "Future[Verdict]"]


@dataclass
class GatewayState:
    settings: GatewaySettings
    services: LlmServices
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    inspect: InspectFn | None = None
    # More registries shown on /metrics (the data plane's inspection and MQTT metrics).
    extra_registries: list[CollectorRegistry] = field(default_factory=list)
    listening: int | None = None  # the bound port, once GatewayServer.start() bound it
    error: str | None = None  # why it could not listen

    def health(self) -> GatewayHealth:
        """The gateway and the LLM services behind it, as the node reports them."""
        s = self.services
        return GatewayHealth(
            listening=self.listening,
            error=self.error,
            cache=s.cache_health(),
            prefetch=s.prefetch_health(),
            explanations_published=s.explainer.published,
        )


def get_state(request: Request) -> GatewayState:
    return request.app.state.gateway  # type: ignore[no-any-return]


StateDep = Annotated[GatewayState, Depends(get_state)]


def require_key(request: Request, state: StateDep) -> None:
    """With gateway.api_key set, /v1 routes need "Authorization: Bearer <key>"."""
    key = state.settings.api_key
    if not key:
        return
    if not bearer_matches(request.headers.get("authorization", "").encode("latin-1"), key):
        raise HTTPException(401, "missing or wrong API key: send Authorization: Bearer <key>")


def bearer_matches(header: bytes, key: str) -> bool:
    """Whether an Authorization header carries `key`, compared as bytes in constant time
    (str compare_digest raises on non-ASCII text: a 500 instead of a 401)."""
    scheme, _, given = header.strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), key.encode())
