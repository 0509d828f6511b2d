"""The edge's local HTTP gateway: an OpenAI-compatible API on the LLM services, /v1/inspect,
health, metrics. `create_app` builds the FastAPI app; `GatewayServer` runs it with uvicorn on
the agent's event loop (host and port from config, optional API key). Errors use OpenAI's
shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog
import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fieldline.edge.gateway.deps import GatewayState, StateDep, bearer_matches, require_key
from fieldline.edge.gateway.openai import router as openai_router
from fieldline.edge.gateway.schemas import HealthResponse
from fieldline.edge.inspection.runtime import InspectionRejected
from fieldline.shared.health import GatewayHealth

log = structlog.get_logger(__name__)

INSPECT_TIMEOUT_S = 30.0
PORT_FILE = "gateway.json"  # DATA/gateway.json: where the gateway listens (port 0 resolved)
# InspectionRejected reasons -> HTTP status (anything else: 422, the payload's fault)
INSPECT_STATUS = {
    "no_rule": 404,
    "no_model": 503,
    "stopped": 503,
    "overloaded": 503,
    "inference": 500,
    "internal": 500,
    "output": 500,
    "config": 500,
}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    499: "client_closed_request",
    503: "service_unavailable",
}


def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
    err_type = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": err_type, "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


class RequestGuard:
    """Before a route reads a byte: with gateway.api_key set, /v1/* needs the bearer key (401,
    compared as bytes, so a header that is not ASCII is simply wrong); bodies over `limit`
    bytes are refused (413), declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int, api_key: str | None) -> None:
        self.app = app
        self.limit = limit
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", ())
        if self.api_key and scope.get("path", "").startswith("/v1/"):
            given = dict(headers).get(b"authorization", b"")
            if not bearer_matches(given, self.api_key):
                message = "missing or wrong API key: send Authorization: Bearer <key>"
                await _error(401, message)(scope, receive, send)
                return
        for name, value in headers:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await _error(413, f"request body exceeds {self.limit} bytes")(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, f"request body exceeds {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


def create_app(state: GatewayState) -> FastAPI:
    app = FastAPI(title="fieldline edge gateway", docs_url=None, redoc_url=None)
    app.state.gateway = state
    app.add_middleware(
        RequestGuard, limit=state.settings.max_body_bytes, api_key=state.settings.api_key
    )
    app.include_router(openai_router, dependencies=[Depends(require_key)])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "model_not_found" if exc.status_code == 404 and "model" in str(exc.detail) else None
        state.metrics.requests.labels(_route(request), str(exc.status_code)).inc()
        return _error(exc.status_code, str(exc.detail), code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}" if loc else msg)
        state.metrics.requests.labels(_route(request), "400").inc()
        return _error(400, "; ".join(parts) or "invalid request")

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    def list_models(state: StateDep) -> dict[str, Any]:
        served = state.services.llm.current
        data = []
        if served is not None:
            data.append(
                {
                    "id": served.name,
                    "object": "model",
                    "created": int(served.loaded_at),
                    "owned_by": "fieldline",
                    "version": served.version,
                }
            )
        return {"object": "list", "data": data}

    @app.get("/health", response_model=HealthResponse)
    def health(state: StateDep) -> JSONResponse:
        llm = state.services.health()
        body = HealthResponse(
            status="ok" if llm.loaded else "unavailable",
            detail=None if llm.loaded else state.services.llm.unavailable_reason(),
            llm=llm,
            gateway=state.health(),
        )
        return JSONResponse(body.model_dump(mode="json"), status_code=200 if llm.loaded else 503)

    @app.get("/metrics")
    async def metrics(state: StateDep) -> Response:
        await state.services.metrics.refresh(state.services.llm)
        registries = [state.metrics.registry, state.services.metrics.registry]
        text = b"".join(generate_latest(r) for r in registries + state.extra_registries)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/inspect", dependencies=[Depends(require_key)])
    async def inspect(
        request: Request,
        state: StateDep,
        rule: str = Query(min_length=1, max_length=128),
        publish: bool = Query(default=False),
    ) -> dict[str, Any]:
        """The body is the payload an MQTT message would carry (PNG/JPEG bytes or JSON)."""
        if state.inspect is None:
            raise HTTPException(503, "inspection is not running on this node")
        payload = await _read_body(request, state.settings.max_body_bytes)
        future = state.inspect(rule, payload, publish)
        try:
            verdict = await asyncio.wait_for(asyncio.wrap_future(future), INSPECT_TIMEOUT_S)
        except InspectionRejected as exc:
            raise HTTPException(INSPECT_STATUS.get(exc.reason, 422), exc.detail) from None
        except TimeoutError:
            raise HTTPException(503, "inspection timed out") from None
        state.metrics.requests.labels("inspect", "200").inc()
        return json.loads(verdict.to_json())  # type: ignore[no-any-return]

    return app


def _route(request: Request) -> str:
    path = request.url.path
    return {
        "/v1/completions": "completions",
        "/v1/chat/completions": "chat",
        "/v1/inspect": "inspect",
        "/v1/models": "models",
    }.get(path, "other")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"payload exceeds {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"payload exceeds {limit} bytes")
        chunks.append(chunk)
    if size == 0:
        raise HTTPException(422, "empty payload")
    return b"".join(chunks)


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the agent owns SIGTERM and stops us in order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class GatewayServer:
    """uvicorn serving the app on the running loop; start() binds first, so errors surface."""

    def __init__(self, state: GatewayState, data_dir: Path | None = None) -> None:
        self.state = state
        self.app = create_app(state)
        self.data_dir = data_dir
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int | None:
        return self.state.listening

    def health(self) -> GatewayHealth:
        return self.state.health()

    async def start(self) -> None:
        """Listen, unless gateway.enabled is off. A port that cannot be bound is logged and
        reported in health(); the rest of the node goes on without the gateway."""
        s = self.state.settings
        if not s.enabled:
            log.info("gateway disabled (gateway.enabled: false)")
            return
        family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((s.host, s.port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            self.state.error = f"gateway cannot listen on {s.host}:{s.port}: {exc}"
            log.error("gateway not started", error=self.state.error)
            return
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=5
        )
        self._server = _QuietServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="gateway")
        while not self._server.started and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task.done():
            self._task.result()  # raises what stopped it
        if self.data_dir is not None:
            port_file = self.data_dir / PORT_FILE
            port_file.write_text(json.dumps({"host": s.host, "port": port}))
        self.state.listening = port
        log.info("gateway listening", host=s.host, port=port, api_key=bool(s.api_key))

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, 10)
        self._server = self._task = None
        self.state.listening = None
