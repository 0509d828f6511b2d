"""LLMEngine and AsyncLLMEngine bookkeeping (outputs, stops, abort, metrics, streaming,
cancellation) over the paged stand-in runner; test_engine_model.py runs the real model."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest

from fieldline.edge.engine.async_engine import AsyncLLMEngine, EngineStoppedError
from fieldline.edge.engine.config import EngineConfig
from fieldline.edge.engine.engine import LLMEngine
from fieldline.edge.engine.scheduler import ScheduledSeq
from fieldline.edge.engine.sequence import SamplingParams
from tests.edge.engine.paged_standin import VOCAB, PagedStandIn, reference

BS = 4
NUM_BLOCKS = 64


@dataclass
class StandInModelConfig:
    eos_token_ids: list[int] = field(default_factory=list)
    max_position_embeddings: int = 128


class LetterTokenizer:
    """Token i <-> one letter; enough to check text deltas."""

    eos_token_ids: list[int] = []

    def encode(self, text: str) -> list[int]:
        return [(ord(c) - 97) % VOCAB for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


class StandInRunner(PagedStandIn):
    def __init__(self, step_delay_s: float = 0.0, eos: list[int] | None = None) -> None:
        super().__init__(NUM_BLOCKS, BS)
        self.num_blocks = NUM_BLOCKS
        self.model_config = StandInModelConfig(eos_token_ids=eos or [])
        self.tokenizer = LetterTokenizer()
        self.step_delay_s = step_delay_s

    def execute(self, batch: list[ScheduledSeq]) -> list[int | None]:
        time.sleep(self.step_delay_s)
        return super().execute(batch)


def make_engine(runner: StandInRunner | None = None, **overrides) -> LLMEngine:
    config = EngineConfig(model="unused", block_size=BS, num_blocks=NUM_BLOCKS, **overrides)
    return LLMEngine(config, runner or StandInRunner())


def all_free(engine: LLMEngine) -> bool:
    bm = engine.scheduler.block_manager
    return bm.num_free_blocks == bm.num_blocks


PROMPTS = [[1, 2, 3], list(range(5, 30)), [7], list(range(40, 50))]


def test_generate_returns_max_tokens_in_order_with_metrics() -> None:
    engine = make_engine(max_num_seqs=2, max_prefill_chunk=8)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (5, 9, 1, 7)]
    outputs = engine.generate(PROMPTS, params)
    for out, prompt, p in zip(outputs, PROMPTS, params, strict=True):
        assert out.prompt_token_ids == prompt
        assert out.output_token_ids == reference(prompt, p.max_tokens)
        assert out.finished and out.finish_reason == "length"
        assert out.text == LetterTokenizer().decode(out.output_token_ids)
        assert out.metrics.ttft is not None and out.metrics.ttft >= 0
        assert len(out.metrics.itl) == p.max_tokens - 1
        assert out.metrics.latency is not None and out.metrics.latency >= out.metrics.ttft
    snap = engine.metrics_snapshot()
    assert snap.num_requests_finished == 4 and snap.num_generated_tokens == 22
    assert snap.ttft.count == 4 and snap.itl.count == 18 and snap.request_latency.count == 4
    assert snap.num_running == snap.num_waiting == 0 and snap.kv_usage == 0.0
    assert not engine.has_unfinished() and all_free(engine)


def test_text_prompt_is_tokenized_and_eos_stops_unless_ignored() -> None:
    prompt = LetterTokenizer().encode("hello")
    eos = reference(prompt, 3)[2]
    engine = make_engine(StandInRunner(eos=[eos]))
    stopped, ignored = engine.generate(
        ["hello", "hello"],
        [SamplingParams(max_tokens=6), SamplingParams(max_tokens=6, ignore_eos=True)],
    )
    assert stopped.output_token_ids == reference(prompt, 3) and stopped.finish_reason == "stop"
    assert ignored.output_token_ids == reference(prompt, 6)


def test_max_model_len_defaults_to_the_model_and_caps_output() -> None:
    runner = StandInRunner()
    runner.model_config.max_position_embeddings = 10
    engine = make_engine(runner)
    (out,) = engine.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=50, ignore_eos=True))
    assert len(out.output_token_ids) == 6 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(list(range(10)), SamplingParams())


def test_abort_frees_blocks_immediately_and_others_finish() -> None:
    engine = make_engine()
    ids = [engine.add_request(p, SamplingParams(max_tokens=20, ignore_eos=True)) for p in PROMPTS]
    for _ in range(4):
        engine.step()
    free_before = engine.scheduler.block_manager.num_free_blocks
    victim = engine._requests[ids[1]].seq
    held = len(victim.block_table)
    assert held > 0
    out = engine.abort(ids[1])
    assert out is not None and out.finished and out.finish_reason == "abort"
    assert engine.scheduler.block_manager.num_free_blocks == free_before + held
    assert engine.abort(ids[1]) is None
    finished = {}
    while engine.has_unfinished():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert set(finished) == {ids[0], ids[2], ids[3]}
    assert all_free(engine)


def test_duplicate_request_id_is_refused() -> None:
    engine = make_engine()
    engine.add_request([1], SamplingParams(), request_id="a")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([2], SamplingParams(), request_id="a")
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request([], SamplingParams())


# -- AsyncLLMEngine ----------------------------------------------------------------------


def test_async_generate_streams_tokens_incrementally() -> None:
    async def main() -> None:
        engine = make_engine(StandInRunner(step_delay_s=0.01))
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        async with AsyncLLMEngine(engine) as aengine:
            tick_task = asyncio.create_task(ticker())
            params = SamplingParams(max_tokens=8, ignore_eos=True)
            chunks = [c async for c in aengine.generate([1, 2, 3], params)]
            tokens = [t for ids, _ in chunks for t in ids]
            assert tokens == reference([1, 2, 3], 8)
            assert len(chunks) == 8  # one token per step, delivered as it came
            assert "".join(text for _, text in chunks) == LetterTokenizer().decode(tokens)
            # The loop kept running while the model stepped in its thread.
            assert ticks >= 8
            tick_task.cancel()

            deltas = [d async for d in aengine.stream("abc", params, request_id="r1")]
            assert deltas[-1].finished and deltas[-1].finish_reason == "length"
            assert not any(d.finished for d in deltas[:-1])
            snap = await aengine.metrics_snapshot()
            assert snap.num_requests_finished == 2
        assert all_free(engine)

    asyncio.run(main())


def test_async_concurrent_requests_and_cancellation_frees_blocks() -> None:
    async def main() -> None:
        engine = make_engine(StandInRunner(step_delay_s=0.005))
        params = SamplingParams(max_tokens=200, ignore_eos=True)
        async with AsyncLLMEngine(engine) as aengine:

            async def consume(prompt: list[int], n: int) -> list[int]:
                got: list[int] = []
                async for ids, _ in aengine.generate(prompt, params):
                    got += ids
                    if len(got) >= n:
                        break  # the client went away
                return got

            long_task = asyncio.create_task(consume(list(range(30)), 10_000))
            short = await asyncio.gather(consume([1, 2], 5), consume([3, 4, 5], 7))
            assert short == [reference([1, 2], 5), reference([3, 4, 5], 7)]
            await asyncio.sleep(0.05)
            assert not all_free(engine)  # the long one still holds blocks
            long_task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await long_task
            deadline = time.monotonic() + 5
            while not (all_free(engine) and not engine.has_unfinished()):
                assert time.monotonic() < deadline, "cancelled request kept its blocks"
                await asyncio.sleep(0.01)
            assert engine.metrics_snapshot().num_running == 0

    asyncio.run(main())


def test_async_rejects_bad_requests_and_stop_ends_streams() -> None:
    async def main() -> None:
        engine = make_engine(StandInRunner(step_delay_s=0.005))
        aengine = AsyncLLMEngine(engine)
        with pytest.raises(EngineStoppedError):
            await anext(aengine.generate([1], SamplingParams()))
        await aengine.start()
        with pytest.raises(ValueError, match="max_model_len"):
            await anext(aengine.generate(list(range(500)), SamplingParams()))

        got: list[int] = []

        async def consume() -> None:
            async for ids, _ in aengine.generate([1], SamplingParams(max_tokens=100)):
                got.extend(ids)

        task = asyncio.create_task(consume())
        while not got:
            await asyncio.sleep(0.01)
        await aengine.stop()
        with pytest.raises(EngineStoppedError):
            await task
        assert all_free(engine) and not engine.has_unfinished()

    asyncio.run(main())
