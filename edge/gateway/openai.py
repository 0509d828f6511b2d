"""POST /v1/completions and /v1/chat/completions: answers, SSE streams, usage, the cache.

A deterministic request is looked up in the response cache first; a hit never reaches the
engine. A client that goes away aborts its request: a stream through EventStream, a plain
request through a watch on the connection.
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
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from fieldline.edge.engine.async_engine import EngineStoppedError
from fieldline.edge.gateway.deps import GatewayState, StateDep
from fieldline.edge.gateway.schemas import ChatRequest, CompletionRequest
from fieldline.edge.llm.completions import (
    GenerationRequest,
    Piece,
    Recipe,
    build_request,
    remember,
    run_to_end,
    stream_pieces,
)
from fieldline.edge.llm.response_cache import CachedAnswer
from fieldline.edge.llm.runtime import ModelUnavailable, ServedModel
from fieldline.shared.ids import new_id

router = APIRouter(prefix="/v1")
T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


class EventStream(StreamingResponse):
    """Server-sent events that stop, and close their generator (aborting the engine request),
    as soon as the client disconnects, whatever ASGI version the server speaks."""

    def __init__(self, content: AsyncIterator[str], on_disconnect: Any = None) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._content = content
        self._on_disconnect = on_disconnect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        if self._on_disconnect:
                            self._on_disconnect()
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                if self._on_disconnect and not tg.cancel_scope.cancel_called:
                    self._on_disconnect()
                tg.cancel_scope.cancel()
        finally:
            aclose = getattr(self._content, "aclose", None)
            if aclose is not None:
                await aclose()


@dataclass(frozen=True)
class _Shape:
    """How one endpoint shapes its answers."""

    chat: bool
    model: str
    fingerprint: str
    request_id: str
    created: int

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
        chat=False,
        model=body.model,
        stream=body.stream,
        include_usage=body.include_usage,
        route="completions",
    )


@router.post("/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, state: StateDep) -> Any:
    recipe = _refuse_bad(lambda: body.recipe(state.settings.default_max_tokens))
    return await _serve(
        state,
        request,
        recipe,
        chat=True,
        model=body.model,
        stream=body.stream,
        include_usage=body.include_usage,
        route="chat",
    )


def _refuse_bad(make: Callable[[], Recipe]) -> Recipe:
    try:
        return make()
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None


async def _serve(
    state: GatewayState,
    request: Request,
    recipe: Recipe,
    *,
    chat: bool,
    model: str,
    stream: bool,
    include_usage: bool,
    route: str,
) -> Any:
    lease = state.llm.lease()
    try:
        served = await lease.__aenter__()
    except ModelUnavailable as exc:
        raise HTTPException(503, str(exc)) from None
    released = handed_off = False

    async def release() -> None:  # once: the stream's end or this handler's, not both
        nonlocal released
        if not released:
            released = True
            await lease.__aexit__(None, None, None)

    try:
        if model != served.name:
            raise HTTPException(
                404, f"model {model!r} is not served here; this node serves {served.name!r}"
            )
        try:
            req = build_request(served, recipe)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        state.hot.record(recipe)
        shape = _Shape(
            chat=chat,
            model=served.name,
            fingerprint=served.ref,
            request_id=new_id("chatcmpl" if chat else "cmpl"),
            created=int(time.time()),
        )
        cached = state.cache.get(req.cache_key) if req.cache_key is not None else None
        if stream:
            events = await _open_stream(state, served, req, shape, cached, include_usage, release)
            state.metrics.requests.labels(route, "200").inc()
            handed_off = True  # the stream releases the lease when it ends
            return EventStream(events, on_disconnect=state.metrics.disconnects.inc)
        if cached is None:
            try:
                cached = await _unless_gone(request, run_to_end(served, req))
            except ClientGone:
                state.metrics.disconnects.inc()
                raise HTTPException(499, "client closed the connection") from None
            except ValueError as exc:
                raise HTTPException(400, str(exc)) from None
            remember(state.cache, req, cached)
        assert cached is not None
        state.metrics.requests.labels(route, "200").inc()
        body = shape.envelope(
            [shape.choice(cached.text, cached.finish_reason, delta=False)], chunk=False
        )
        body["usage"] = _usage(cached.prompt_tokens, cached.completion_tokens)
        return JSONResponse(body)
    finally:
        if not handed_off:
            await release()


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


async def _open_stream(
    state: GatewayState,
    served: ServedModel,
    req: GenerationRequest,
    shape: _Shape,
    cached: CachedAnswer | None,
    include_usage: bool,
    release: Callable[[], Awaitable[None]],
) -> AsyncGenerator[str, None]:
    """The SSE event generator, with its first piece already computed, so a request the engine
    refuses is a 400 before any 200 goes out."""
    pieces: AsyncGenerator[Piece, None] | None = None
    first: Piece | None = None
    if cached is None:
        pieces = stream_pieces(served, req)
        try:
            first = await anext(pieces)
        except ValueError as exc:
            await pieces.aclose()
            await release()
            raise HTTPException(400, str(exc)) from None
        except BaseException:
            await pieces.aclose()
            await release()
            raise
    usage_null: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(text: str, finish: str | None, *, role: bool = False) -> str:
        choice = shape.choice(text, finish, delta=True)
        if role:
            choice["delta"] = {"role": "assistant", "content": ""}
        return _sse({**shape.envelope([choice], chunk=True), **usage_null})

    async def live() -> AsyncGenerator[str | CachedAnswer, None]:
        """Chunks of a generation running now; its answer (for cache and usage) last."""
        assert pieces is not None and first is not None
        parts: list[str] = []
        piece = first
        async with aclosing(pieces):
            while True:
                parts.append(piece.text)
                if piece.text:
                    yield chunk(piece.text, None)
                if piece.finish_reason is not None:
                    break
                piece = await anext(pieces)
        answer = CachedAnswer(
            "".join(parts), piece.finish_reason, len(req.prompt_ids), piece.completion_tokens
        )
        remember(state.cache, req, answer)
        yield answer

    async def events() -> AsyncGenerator[str, None]:
        try:
            if shape.chat:  # the role comes first, as OpenAI sends it
                yield chunk("", None, role=True)
            answer = cached
            if answer is not None:
                if answer.text:
                    yield chunk(answer.text, None)
            else:
                try:
                    async with aclosing(live()) as items:
                        async for item in items:
                            if isinstance(item, CachedAnswer):
                                answer = item
                            else:
                                yield item
                except EngineStoppedError as exc:  # mid-stream: the status is already sent
                    yield _sse({"error": {"message": str(exc), "type": "service_unavailable"}})
                    return
            assert answer is not None
            yield chunk("", answer.finish_reason)
            if include_usage:
                usage = _usage(answer.prompt_tokens, answer.completion_tokens)
                yield _sse({**shape.envelope([], chunk=True), "usage": usage})
            yield _sse("[DONE]")
        finally:
            await release()

    return events()
