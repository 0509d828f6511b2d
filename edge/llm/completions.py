"""One generation as the gateway, the prefetch job and the alert explainer run it.

A `Recipe` is a request in model-independent form (messages or prompt, sampling parameters,
defaults applied); `prepare` turns it into engine input for the model being served (chat
template and tokenizer run in a worker thread, off the event loop), with its cache key when
it is deterministic. `generate` streams it from the engine, cut at its stop strings; `answer`
streams it from the cache or from `generate`, caching what finished; `collect` joins a stream
into the whole answer. Streamed and whole answers are the same pieces.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from fieldline.edge.engine.sequence import SamplingParams
from fieldline.edge.llm.chat_template import ChatMessage
from fieldline.edge.llm.response_cache import (
    CachedAnswer,
    ResponseCache,
    cache_key,
    is_deterministic,
)
from fieldline.edge.llm.runtime import ServedModel
from fieldline.edge.llm.stop_strings import StopMatcher

# Lower runs first in the engine: people first, then warming, then alert explanations.
PRIORITY_REQUEST = 0
PRIORITY_PREFETCH = 5
PRIORITY_EXPLAIN = 10


@dataclass(frozen=True)
class Recipe:
    """A completion or chat request, normalized; hashable (the prefetch job counts them)."""

    kind: str  # "chat" | "completion"
    messages: tuple[ChatMessage, ...] = ()
    prompt: str | tuple[int, ...] = ""
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def deterministic(self) -> bool:
        return is_deterministic(self.temperature, self.seed)


@dataclass(frozen=True)
class GenerationRequest:
    """Engine input for one served model."""

    prompt_ids: list[int]
    params: SamplingParams
    stop: tuple[str, ...]
    cache_key: str | None  # None: not deterministic, never cached


@dataclass(frozen=True)
class Piece:
    """New text; the last piece of a generation carries its finish reason."""

    text: str
    finish_reason: str | None
    completion_tokens: int  # tokens generated so far


async def prepare(served: ServedModel, recipe: Recipe) -> GenerationRequest:
    """build_request in a worker thread: template rendering and tokenizing stay off the loop."""
    return await asyncio.to_thread(build_request, served, recipe)


def build_request(served: ServedModel, recipe: Recipe) -> GenerationRequest:
    """Engine input for `recipe` on `served`; ValueError for what the model cannot take.

    Blocking (Jinja and the tokenizer): call it through prepare() on the event loop.
    """
    if recipe.kind == "chat":
        prompt_ids = served.chat_ids(list(recipe.messages))
        stop = tuple(dict.fromkeys(recipe.stop + served.chat_template.stop))
    else:
        prompt_ids = served.encode(
            list(recipe.prompt) if isinstance(recipe.prompt, tuple) else recipe.prompt
        )
        stop = recipe.stop
    params = SamplingParams(
        temperature=recipe.temperature,
        top_p=recipe.top_p,
        top_k=recipe.top_k,
        seed=recipe.seed,
        max_tokens=recipe.max_tokens,
        ignore_eos=recipe.ignore_eos,
    )
    key = None
    if recipe.deterministic:
        normalized = {
            "prompt": prompt_ids,
            "max_tokens": recipe.max_tokens,
            "temperature": recipe.temperature,
            "top_p": recipe.top_p,
            "top_k": recipe.top_k,
            "seed": recipe.seed,
            "stop": sorted(stop),
            "ignore_eos": recipe.ignore_eos,
        }
        key = cache_key(served.ref, normalized)
    return GenerationRequest(prompt_ids, params, stop, key)


async def generate(
    served: ServedModel, req: GenerationRequest, priority: int = PRIORITY_REQUEST
) -> AsyncGenerator[Piece, None]:
    """Run `req` on the engine; the last piece has the finish reason ("stop" at a stop string).

    Raises ValueError (before any piece) for a request the engine refuses. Closing this early
    aborts the request, which frees its KV blocks.
    """
    stops = StopMatcher(req.stop)
    tokens = 0
    deltas = served.engine.stream(req.prompt_ids, req.params, priority=priority)
    async with aclosing(deltas):
        async for delta in deltas:
            tokens += len(delta.token_ids)
            cut = stops.feed(delta.text)
            if cut.stopped:  # returning closes the stream: the engine aborts the rest
                yield Piece(cut.text, "stop", tokens)
                return
            if delta.finished:
                yield Piece(cut.text + stops.flush(), delta.finish_reason or "stop", tokens)
                return
            if cut.text:
                yield Piece(cut.text, None, tokens)


async def answer(
    served: ServedModel,
    req: GenerationRequest,
    cache: ResponseCache,
    *,
    priority: int = PRIORITY_REQUEST,
    prefetched: bool = False,
) -> AsyncGenerator[Piece, None]:
    """The answer's pieces: one from the cache for a deterministic repeat, else generate()'s,
    with the finished answer cached (a stream closed early is not)."""
    if req.cache_key is not None:
        hit = cache.get(req.cache_key, count=not prefetched)
        if hit is not None:
            yield Piece(hit.text, hit.finish_reason, hit.completion_tokens)
            return
    parts: list[str] = []
    async with aclosing(generate(served, req, priority)) as pieces:
        async for piece in pieces:
            parts.append(piece.text)
            if piece.finish_reason is not None:  # cached before the consumer may stop reading
                done = CachedAnswer(
                    "".join(parts),
                    piece.finish_reason,
                    len(req.prompt_ids),
                    piece.completion_tokens,
                )
                _remember(cache, req, done, prefetched=prefetched)
            yield piece


async def collect(pieces: AsyncIterator[Piece], prompt_tokens: int) -> CachedAnswer:
    """A stream of pieces joined into the whole answer."""
    parts: list[str] = []
    finish, tokens = "stop", 0
    async for piece in pieces:
        parts.append(piece.text)
        tokens = piece.completion_tokens
        if piece.finish_reason is not None:
            finish = piece.finish_reason
    return CachedAnswer("".join(parts), finish, prompt_tokens, tokens)


async def run_to_end(
    served: ServedModel, req: GenerationRequest, priority: int = PRIORITY_REQUEST
) -> CachedAnswer:
    """generate() to the end, uncached."""
    async with aclosing(generate(served, req, priority)) as pieces:
        return await collect(pieces, len(req.prompt_ids))


async def complete(
    served: ServedModel,
    req: GenerationRequest,
    cache: ResponseCache,
    *,
    priority: int = PRIORITY_REQUEST,
    prefetched: bool = False,
) -> CachedAnswer:
    """answer() to the end: from the cache, or generated and then cached."""
    pieces = answer(served, req, cache, priority=priority, prefetched=prefetched)
    async with aclosing(pieces):
        return await collect(pieces, len(req.prompt_ids))


def _remember(
    cache: ResponseCache, req: GenerationRequest, done: CachedAnswer, *, prefetched: bool = False
) -> None:
    """Cache a finished deterministic answer (never an aborted one)."""
    if req.cache_key is not None and done.finish_reason in ("stop", "length"):
        cache.put(req.cache_key, done, prefetched=prefetched)
