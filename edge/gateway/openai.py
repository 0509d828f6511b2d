"""POST /v1/completions and /v1/chat/completions: answers, SSE streams, usage, the cache.

Both forms run one path: `_answer` holds the model's lease (`async with`) for as long as its
pieces flow, and yields them from edge/llm/completions.answer (the response cache first: a hit
never reaches the engine). A stream sends them as SSE; a plain request collects them. A
client that goes away closes that path, which releases the lease and aborts the engine
request: a stream through EventStream, a plain request through a watch on the connection.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import structlog
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from fieldline.edge.engine.async_engine import EngineStoppedError
from fieldline.edge.gateway.deps import GatewayState, StateDep
from fieldline.edge.gateway.schemas import ChatRequest, CompletionRequest
from fieldline.edge.llm.completions import Piece, Recipe, answer, collect, prepare
from fieldline.edge.llm.response_cache import CachedAnswer
from fieldline.edge.llm.runtime import ModelUnavailable
from fieldline.shared.ids import new_id

log = structlog.get_logger(__name__)
router = APIRouter(prefix="/v1")
T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


class EventStream(StreamingResponse):
    """Server-sent events that stop, and close their generators (aborting the engine request),
    as soon as the client disconnects, whatever ASGI version the server speaks. `source` is
    the generator the events are made from: closed too, should the events never have started."""

    def __init__(
        self,
        content: AsyncGenerator[str, None],
        source: AsyncGenerator[Any, None],
        on_disconnect: Callable[[], None],
    ) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._content, self._source = content, source
        self._on_disconnect = on_disconnect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The events close first; the source then, in case the events never started.
        async with (
            aclosing(self._source),
            aclosing(self._content),
            anyio.create_task_group() as tg,
        ):

            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:
                    self._on_disconnect()
                tg.cancel_scope.cancel()

            tg.start_soon(stream)
            await self.listen_for_disconnect(receive)
            if not tg.cancel_scope.cancel_called:
                self._on_disconnect()
            tg.cancel_scope.cancel()


@dataclass(frozen=True)
class _Shape:
    """How one endpoint shapes its answers, and the model and prompt they come from."""

    chat: bool
    model: str
    fingerprint: str
    request_id: str
    created: int
    prompt_tokens: int

    def choice(self, text: str, finish: str | None, *, delta: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        key = "delta" if delta else "message"
        body: dict[str, Any] = (
            {"content": text} if delta else {"role": "assistant", "content": text}
        )
        if delta and not text and finish is not None:
            body = {}
        return {"index": 0, key: body, "logprobs": None, "finish_reason": finish}

    def envelope(self, choices: list[dict[str, Any]], *, chunk: bool) -> dict[str, Any]:
        obj = (
            ("chat.completion.chunk" if chunk else "chat.completion")
            if self.chat
            else "text_completion"
        )
        return {
            "id": self.request_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
        }


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(data: dict[str, Any] | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n"


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, state: StateDep) -> Any:
    recipe = _refuse_bad(lambda: body.recipe())
    return await _serve(
        state,
        request,
        recipe,
        _Endpoint(chat=False, model=body.model, include_usage=body.include_usage),
        stream=body.stream,
    )


@router.post("/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, state: StateDep) -> Any:
    recipe = _refuse_bad(lambda: body.recipe(state.settings.default_max_tokens))
    return await _serve(
        state,
        request,
        recipe,
        _Endpoint(chat=True, model=body.model, include_usage=body.include_usage),
        stream=body.stream,
    )


@dataclass(frozen=True)
class _Endpoint:
    """What the request asked for besides the recipe."""

    chat: bool
    model: str
    include_usage: bool

    @property
    def route(self) -> str:
        return "chat" if self.chat else "completions"


def _refuse_bad(make: Callable[[], Recipe]) -> Recipe:
    try:
        return make()
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None


async def _answer(
    state: GatewayState, recipe: Recipe, endpoint: _Endpoint
) -> AsyncGenerator[tuple[_Shape, Piece], None]:
    """The answer's pieces, with the lease on the model held while they flow.

    Refusals raise HTTPException before the first piece: 503 (no model, or its engine
    stopped), 404 (another model), 400 (what the model or engine cannot take). Closing this early releases the
    lease and aborts the engine request.
    """
    try:
        async with state.services.llm.lease() as served:
            if endpoint.model != served.name:
                raise HTTPException(
                    404,
                    f"model {endpoint.model!r} is not served here; this node serves {served.name!r}",
                )
            try:
                req = await prepare(served, recipe)
            except ValueError as exc:
                raise HTTPException(400, str(exc)) from None
            state.services.hot.record(recipe)
            shape = _Shape(
                chat=endpoint.chat,
                model=served.name,
                fingerprint=served.ref,
                request_id=new_id("chatcmpl" if endpoint.chat else "cmpl"),
                created=int(time.time()),
                prompt_tokens=len(req.prompt_ids),
            )
            pieces = answer(served, req, state.services.cache)
            async with aclosing(pieces):
                try:
                    first = await anext(pieces)
                except ValueError as exc:  # the engine refused it (too long for the model)
                    raise HTTPException(400, str(exc)) from None
                except EngineStoppedError as exc:  # stopping, or a swap retired it
                    raise HTTPException(503, str(exc)) from None
                yield shape, first
                async for piece in pieces:
                    yield shape, piece
    except ModelUnavailable as exc:
        raise HTTPException(503, str(exc)) from None


async def _serve(
    state: GatewayState, request: Request, recipe: Recipe, endpoint: _Endpoint, *, stream: bool
) -> Any:
    pieces = _answer(state, recipe, endpoint)
    if stream:
        # The first piece before the 200: a refused request gets its status, not a broken stream.
        shape, first = await anext(pieces)
        state.metrics.requests.labels(endpoint.route, "200").inc()
        events = _events(shape, first, pieces, endpoint.include_usage)
        return EventStream(events, pieces, on_disconnect=state.metrics.disconnects.inc)
    try:
        shape, done = await _unless_gone(request, _collect(pieces))
    except ClientGone:
        state.metrics.disconnects.inc()
        raise HTTPException(499, "client closed the connection") from None
    except EngineStoppedError as exc:
        raise HTTPException(503, str(exc)) from None
    state.metrics.requests.labels(endpoint.route, "200").inc()
    body = shape.envelope([shape.choice(done.text, done.finish_reason, delta=False)], chunk=False)
    body["usage"] = _usage(done.prompt_tokens, done.completion_tokens)
    return JSONResponse(body)


async def _collect(
    pieces: AsyncGenerator[tuple[_Shape, Piece], None],
) -> tuple[_Shape, CachedAnswer]:
    """The whole answer: the same pieces a stream would send, joined."""
    async with aclosing(pieces):
        shape, first = await anext(pieces)

        async def rest() -> AsyncIterator[Piece]:
            yield first
            async for _, piece in pieces:
                yield piece

        return shape, await collect(rest(), shape.prompt_tokens)


async def _unless_gone(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (so the engine aborts) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone()
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _events(
    shape: _Shape,
    first: Piece,
    pieces: AsyncGenerator[tuple[_Shape, Piece], None],
    include_usage: bool,
) -> AsyncGenerator[str, None]:
    """The SSE events of an answer whose first piece is in hand."""
    usage_null: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(text: str, finish: str | None, *, role: bool = False) -> str:
        choice = shape.choice(text, finish, delta=True)
        if role:
            choice["delta"] = {"role": "assistant", "content": ""}
        return _sse({**shape.envelope([choice], chunk=True), **usage_null})

    async with aclosing(pieces):
        if shape.chat:  # the role comes first, as OpenAI sends it
            yield chunk("", None, role=True)
        piece = first
        while True:
            if piece.text:
                yield chunk(piece.text, None)
            if piece.finish_reason is not None:
                break
            try:
                _, piece = await anext(pieces)
            except Exception as exc:  # mid-stream: the status is already sent
                log.warning("stream ended by an error", error=str(exc))
                yield _sse({"error": {"message": str(exc), "type": "service_unavailable"}})
                return
        yield chunk("", piece.finish_reason)
        if include_usage:
            usage = _usage(shape.prompt_tokens, piece.completion_tokens)
            yield _sse({**shape.envelope([], chunk=True), "usage": usage})
        yield _sse("[DONE]")
