"""The admin API's front door, run before any route reads a byte of the body: /v1/* needs a
usable bearer key (401), a body over the limit is refused (413), and every state-changing call
is written to the audit trail with its outcome."""

from __future__ import annotations

import json

import anyio
import structlog
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fieldline.cloud.context import CloudContext
from fieldline.cloud.store import audit as audit_store
from fieldline.cloud.store import auth as auth_store
from fieldline.cloud.store.auth import ApiKey
from fieldline.shared.clock import utcnow

log = structlog.get_logger(__name__)

PROTECTED_PREFIX = "/v1/"
# The streamed artifact upload keeps its own, larger limit (max_artifact_bytes).
STREAMED = {("POST", "/v1/artifacts")}
CHANGES = {"POST", "PUT", "PATCH", "DELETE"}
SCOPE_KEY = "fieldline.api_key"  # where the checked key waits for deps.current_key


def bearer_secret(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The secret of an "Authorization: Bearer <secret>" header, compared as bytes: a header
    that is not ASCII is no key (never an error)."""
    for name, value in headers:
        if name.lower() != b"authorization":
            continue
        scheme, _, secret = value.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not secret.strip() or not secret.isascii():
            return None
        return secret.strip().decode("ascii")
    return None


def declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class BodyTooLarge(HTTPException):
    """Raised into the route that reads past the limit (the 413 is already on its way)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds {limit} bytes")


async def _refuse(send: Send, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    # Connection: close, so the server drops the unread body instead of draining it.
    headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """Pure ASGI middleware (outermost), so nothing is parsed for a caller without a key."""

    def __init__(self, app: ASGIApp, ctx: CloudContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        headers = scope.get("headers", [])
        secret = bearer_secret(headers)
        # Off the loop, as the routes' own queries are: the store's lock may be held by a long
        # query in a worker thread, and the tunnel shares this loop.
        key = await anyio.to_thread.run_sync(self._lookup, secret) if secret is not None else None
        if key is None:
            await _refuse(
                send, 401, "missing or unknown API key: send 'Authorization: Bearer <key>'"
            )
            return
        if not key.usable(utcnow()):
            state = "revoked" if key.revoked_at is not None else "expired"
            await anyio.to_thread.run_sync(
                self._audit, key, method, path, 401, f"refused: key {state}"
            )
            await _refuse(send, 401, f"this API key is {state}")
            return
        limit = self.ctx.settings.http_max_body_bytes
        streamed = (method, path.rstrip("/")) in STREAMED
        length = declared_length(headers)
        if not streamed and length is not None and length > limit:
            await _refuse(send, 413, f"request body exceeds {limit} bytes")
            return
        scope[SCOPE_KEY] = key
        status = 500  # what the audit says when the app ends without answering
        started = False
        cut_off = False  # the 413 went out; what the app sends after it is dropped

        async def capture(message: Message) -> None:
            nonlocal status, started
            if cut_off:
                return
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        seen = 0

        async def limited() -> Message:
            nonlocal seen, cut_off, status, started
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit and not cut_off:  # chunked, no declared length: stop here
                    if not started:
                        await _refuse(send, 413, f"request body exceeds {limit} bytes")
                        status, started = 413, True
                    cut_off = True
                if cut_off:
                    raise BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, receive if streamed else limited, capture)
        finally:
            if method in CHANGES:
                query = scope.get("query_string", b"").decode("latin-1")
                with anyio.CancelScope(shield=True):  # a client gone mid-call is audited too
                    await anyio.to_thread.run_sync(self._audit, key, method, path, status, query)

    def _lookup(self, secret: str) -> ApiKey | None:
        return auth_store.lookup_api_key(self.ctx.db, secret=secret)

    def _audit(self, key: ApiKey, method: str, path: str, status: int, detail: str) -> None:
        try:
            audit_store.record(
                self.ctx.db,
                key_id=key.id,
                role=key.role.value,
                method=method,
                path=path,
                status=status,
                detail=detail[: audit_store.MAX_DETAIL_CHARS],
                keep=self.ctx.settings.audit_max_rows,
            )
        except Exception:  # the call's own outcome stands; a lost audit row is logged
            log.exception("audit record failed", method=method, path=path)
            self.ctx.metrics.audit_failures.inc()
