"""One generation as the gateway, the prefetch job and the alert explainer run it.

A `Recipe` is a request in model-independent form (messages or prompt, sampling parameters,
defaults applied); `build_request` turns it into engine input for the model being served,
with its cache key when it is deterministic. `stream_pieces` runs it on the engine, applying
stop strings; `complete` answers it from the cache or runs it to the end and caches it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
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


def build_request(served: ServedModel, recipe: Recipe) -> GenerationRequest:
    """Engine input for `recipe` on `served`; ValueError for what the model cannot take."""
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


async def stream_pieces(
    served: ServedModel, req: GenerationRequest, priority: int = PRIORITY_REQUEST
) -> AsyncGenerator[Piece, None]:
    """Run `req` on the engine. Closing this early aborts the request (its KV blocks free)."""
    # Text that might be the start of a stop string is held back until it cannot be.
    hold = max((len(s) for s in req.stop), default=1) - 1
    text, emitted, tokens = "", 0, 0
    deltas = served.engine.stream(req.prompt_ids, req.params, priority=priority)
    async with aclosing(deltas):
        async for delta in deltas:
            tokens += len(delta.token_ids)
            text += delta.text
            if req.stop:
                cut = _first_stop(text, req.stop, max(0, emitted - hold))
                if cut is not None:  # returning closes the stream: the engine aborts the rest
                    yield Piece(text[emitted:cut], "stop", tokens)
                    return
            if delta.finished:
                yield Piece(text[emitted:], delta.finish_reason or "stop", tokens)
                return
            safe = len(text) - hold
            if safe > emitted:
                yield Piece(text[emitted:safe], None, tokens)
                emitted = safe


def _first_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


async def run_to_end(
    served: ServedModel, req: GenerationRequest, priority: int = PRIORITY_REQUEST
) -> CachedAnswer:
    parts: list[str] = []
    finish, tokens = "stop", 0
    async with aclosing(stream_pieces(served, req, priority)) as pieces:
        async for piece in pieces:
            parts.append(piece.text)
            tokens = piece.completion_tokens
            if piece.finish_reason is not None:
                finish = piece.finish_reason
    return CachedAnswer("".join(parts), finish, len(req.prompt_ids), tokens)


async def complete(
    served: ServedModel,
    req: GenerationRequest,
    cache: ResponseCache,
    *,
    priority: int = PRIORITY_REQUEST,
    prefetched: bool = False,
) -> tuple[CachedAnswer, bool]:
    """The answer and whether it came from the cache (a deterministic repeat)."""
    if req.cache_key is not None:
        hit = cache.get(req.cache_key, count=not prefetched)
        if hit is not None:
            return hit, True
    answer = await run_to_end(served, req, priority)
    remember(cache, req, answer, prefetched=prefetched)
    return answer, False


def remember(
    cache: ResponseCache, req: GenerationRequest, answer: CachedAnswer, *, prefetched: bool = False
) -> None:
    """Cache a finished deterministic answer (never an aborted one)."""
    if req.cache_key is not None and answer.finish_reason in ("stop", "length"):
        cache.put(req.cache_key, answer, prefetched=prefetched)
