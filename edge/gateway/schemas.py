"""The OpenAI-compatible request bodies the gateway accepts, validated with bounded sizes.

Fields the engine cannot honour (n > 1, logprobs, penalties, echo, suffix) are refused with a
400 that names them rather than silently ignored; unknown extra fields are ignored, as
OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fieldline.edge.llm.chat_template import ChatMessage
from fieldline.edge.llm.completions import Recipe
from fieldline.shared.health import GatewayHealth, LlmHealth

MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_PROMPT_CHARS = 1_000_000
MAX_MESSAGES = 1024


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0, le=100_000)  # an extension; 0 = off
    ignore_eos: bool = False  # an extension (as vLLM's): generate max_tokens whatever comes
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = Field(default=None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences must have 1 to {MAX_STOP_CHARS} characters")
        return v

    @model_validator(mode="after")
    def _supported(self) -> _Sampling:
        if self.n != 1:
            raise ValueError("n must be 1: this gateway returns one choice per request")
        if self.logprobs:
            raise ValueError("logprobs are not supported by this gateway")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported (use 0)")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for part in self.content:
            if part.type != "text":
                raise ValueError(f"content parts of type {part.type!r} are not supported")
        return "".join(p.text or "" for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)

    def recipe(self, default_max_tokens: int) -> Recipe:
        messages = []
        for m in self.messages:
            # "developer" is OpenAI's newer name for the system role.
            role = "system" if m.role == "developer" else m.role
            messages.append(ChatMessage(role, m.text()))
        if sum(len(m.content) for m in messages) > MAX_PROMPT_CHARS:
            raise ValueError(f"messages exceed {MAX_PROMPT_CHARS} characters")
        return Recipe(
            kind="chat",
            messages=tuple(messages),
            max_tokens=self.max_completion_tokens or self.max_tokens or default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=self.stops,
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionRequest:
        if self.echo or self.suffix:
            raise ValueError("echo and suffix are not supported by this gateway")
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list) and len(p) != 1:
            raise ValueError("send one prompt per request (a list of prompts is not supported)")
        if isinstance(p, str) and len(p) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt exceeds {MAX_PROMPT_CHARS} characters")
        return self

    def recipe(self) -> Recipe:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            p = p[0]  # type: ignore[assignment]
        prompt: str | tuple[int, ...] = p if isinstance(p, str) else tuple(p)  # type: ignore[arg-type]
        return Recipe(
            kind="completion",
            prompt=prompt,
            max_tokens=self.max_tokens or 16,  # OpenAI's default for completions
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=self.stops,
            ignore_eos=self.ignore_eos,
        )


class HealthResponse(BaseModel):
    """GET /health: ok (200) when an LLM serves, else unavailable (503) with the reason."""

    status: Literal["ok", "unavailable"]
    detail: str | None = None
    llm: LlmHealth
    gateway: GatewayHealth
