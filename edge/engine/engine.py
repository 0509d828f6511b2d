"""LLMEngine: requests in, tokens out; each step() is schedule -> execute -> postprocess."""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import structlog

from fieldline.edge.engine.config import EngineConfig
from fieldline.edge.engine.detokenizer import IncrementalDetokenizer
from fieldline.edge.engine.metrics import EngineMetrics, MetricsSnapshot
from fieldline.edge.engine.scheduler import Scheduler
from fieldline.edge.engine.sequence import SamplingParams, Sequence

if TYPE_CHECKING:
    from fieldline.edge.engine.model_runner import ModelRunner

log = structlog.get_logger(__name__)


@dataclass
class RequestMetrics:
    """Times on the time.monotonic() clock, in seconds."""

    arrival_time: float
    token_times: list[float] = field(default_factory=list)
    finished_time: float | None = None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival_time if self.token_times else None

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.token_times)]

    @property
    def latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass
class RequestOutput:
    """What one step added to a request: its new tokens and the text they add."""

    request_id: str
    prompt_token_ids: list[int]
    new_token_ids: list[int]  # tokens generated since this request's previous output
    new_text: str  # text they add ("" without a tokenizer, or while a character is partial)
    # All tokens so far (a stop token included): the request's own list, which later steps
    # extend, so it is whole once finished. Not copied per step, which would be O(n^2).
    output_token_ids: list[int]
    text: (
        str | None
    )  # the whole decoded output, on the finished output (None before, or no tokenizer)
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    metrics: RequestMetrics


@dataclass
class _Request:
    request_id: str
    seq: Sequence
    metrics: RequestMetrics
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    detokenizer: IncrementalDetokenizer | None = None


class LLMEngine:
    def __init__(self, config: EngineConfig, runner: ModelRunner | None = None) -> None:
        if runner is None:
            from fieldline.edge.engine.model_runner import ModelRunner

            runner = ModelRunner(config)
        self.config = config
        self.runner = runner
        self.tokenizer = _tokenizer_for(config, runner)
        model_config = getattr(runner, "model_config", None)
        eos = set(getattr(model_config, "eos_token_ids", None) or ())
        if self.tokenizer is not None:
            eos |= set(getattr(self.tokenizer, "eos_token_ids", None) or ())
        max_model_len = config.max_model_len or getattr(
            model_config, "max_position_embeddings", None
        )
        self.scheduler = Scheduler(config, runner.num_blocks, eos, max_model_len)
        self.metrics = EngineMetrics()
        self._requests: dict[str, _Request] = {}
        self._by_seq_id: dict[int, _Request] = {}
        self._seq_ids = itertools.count()
        log.info(
            "engine ready",
            model=config.model,
            num_blocks=runner.num_blocks,
            block_size=config.block_size,
            max_model_len=max_model_len,
        )

    # -- requests --------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        request_id: str | None = None,
    ) -> str:
        """Queue a request; raise ValueError when it can never run (too long, bad id)."""
        prompt_ids = self.encode(prompt)
        seq_id = next(self._seq_ids)
        request_id = request_id if request_id is not None else f"req-{seq_id}"
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        now = time.monotonic()
        seq = Sequence(seq_id, prompt_ids, params, priority=priority, arrival_time=now)
        self.scheduler.add(seq)
        request = _Request(request_id, seq, RequestMetrics(arrival_time=now), prompt_ids)
        if self.tokenizer is not None:
            request.detokenizer = IncrementalDetokenizer(self.tokenizer, request.output_ids)
        self._requests[request_id] = self._by_seq_id[seq_id] = request
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; None when it is unknown or done."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return None
        del self._by_seq_id[request.seq.seq_id]
        self.scheduler.abort(request.seq.seq_id)
        request.metrics.finished_time = time.monotonic()
        self.metrics.num_requests_finished += 1
        return self._output(request)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop --------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batch; return an output for every request that got a token or finished."""
        started = time.monotonic()
        output = self.scheduler.schedule()
        sampled = self.runner.execute(output.scheduled) if output.scheduled else []
        updated = self.scheduler.postprocess(output, sampled)
        now = time.monotonic()
        self.scheduler.report_step(now - started)
        return [self._on_token(seq, now) for seq in updated]

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams],
    ) -> list[RequestOutput]:
        """Run prompts to completion (alongside anything already queued); outputs in order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        ids: list[str] = []
        try:
            for prompt, sp in zip(cast(list[str | list[int]], prompts), params_list, strict=True):
                ids.append(self.add_request(prompt, sp))
        except ValueError:
            for request_id in ids:  # all or nothing
                self.abort(request_id)
            raise
        pending = set(ids)
        final: dict[str, RequestOutput] = {}
        while pending:
            for out in self.step():
                if out.finished and out.request_id in pending:
                    final[out.request_id] = out
                    pending.discard(out.request_id)
        return [final[i] for i in ids]

    def metrics_snapshot(self) -> MetricsSnapshot:
        return self.metrics.snapshot(self.scheduler.stats())

    def cached_prefix_tokens(self, prompt: str | list[int]) -> int:
        """Leading prompt tokens whose KV is in the prefix cache now (counts nothing)."""
        ids = self.encode(prompt)
        probe = Sequence(-1, ids, SamplingParams(max_tokens=1))
        return len(self.scheduler.block_manager.match_prefix(probe)) * self.config.block_size

    # -- text ------------------------------------------------------------------------------

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.config.model} has no tokenizer: pass token ids")
            ids = list(self.tokenizer.encode(prompt))
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError("empty prompt")
        return ids

    # -- helpers ---------------------------------------------------------------------------

    def _on_token(self, seq: Sequence, now: float) -> RequestOutput:
        request = self._by_seq_id[seq.seq_id]
        times = request.metrics.token_times
        if times:
            self.metrics.itl.observe(now - times[-1])
        else:
            self.metrics.ttft.observe(now - request.metrics.arrival_time)
        times.append(now)
        self.metrics.num_generated_tokens += 1
        if seq.is_finished:
            request.metrics.finished_time = now
            self.metrics.num_requests_finished += 1
            self.metrics.request_latency.observe(now - request.metrics.arrival_time)
            del self._requests[request.request_id], self._by_seq_id[seq.seq_id]
        return self._output(request)

    def _output(self, request: _Request) -> RequestOutput:
        """The tokens appended since the last output and their text (decoded incrementally)."""
        seq, ids = request.seq, request.output_ids
        new = seq.num_output_tokens - len(ids)
        new_ids = seq.token_ids[-new:] if new > 0 else []
        ids.extend(new_ids)
        detok, finished = request.detokenizer, seq.is_finished
        new_text = detok.step(final=finished) if detok is not None else ""
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_ids,
            new_token_ids=new_ids,
            new_text=new_text,
            output_token_ids=ids,
            text=detok.text if detok is not None and finished else None,
            finished=finished,
            finish_reason=seq.finish_reason,
            metrics=request.metrics,
        )


def _tokenizer_for(config: EngineConfig, runner: Any) -> Any:
    """The runner's tokenizer if it has one, else the checkpoint's, else None."""
    tokenizer = getattr(runner, "tokenizer", None)
    if tokenizer is not None or not os.path.isdir(config.model):
        return tokenizer
    try:
        from fieldline.edge.engine.tokenizer import load_tokenizer
    except ModuleNotFoundError as exc:
        log.warning("no tokenizer module; token ids only", error=str(exc))
        return None
    return load_tokenizer(config.model)
