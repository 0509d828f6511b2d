"""LLMEngine and AsyncLLMEngine over the real ModelRunner and a tiny random Llama written by
transformers: token counts, greedy agreement under preemption and chunking, abort and
cancellation freeing blocks, incremental streaming."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch

from fieldline.edge.engine.async_engine import AsyncLLMEngine
from fieldline.edge.engine.config import EngineConfig
from fieldline.edge.engine.engine import LLMEngine
from fieldline.edge.engine.sequence import SamplingParams

VOCAB = 256


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.5,  # large weights: greedy choices are not near-ties
        bos_token_id=1,
        eos_token_id=2,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)
    return path


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [3, 17, 40, 9, 33, 64, 1, 21][:n]
    return [torch.randint(3, VOCAB, (length,), generator=gen).tolist() for length in lengths]


def hf_greedy(path: Path, batch: list[list[int]], max_tokens: int) -> list[list[int]]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    outputs = []
    with torch.no_grad():
        for prompt in batch:
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            outputs.append(out[0, len(prompt) :].tolist())
    return outputs


def all_free(engine: LLMEngine) -> bool:
    bm = engine.scheduler.block_manager
    return bm.num_free_blocks == bm.num_blocks


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def test_generate_returns_max_tokens_and_frees_every_block(tiny_llama: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), num_blocks=64, max_num_seqs=4))
    batch = prompts(8)
    params = [
        SamplingParams(temperature=0.8, seed=i, max_tokens=5 + i, ignore_eos=True) for i in range(8)
    ]
    outputs = engine.generate(batch, params)
    for i, out in enumerate(outputs):
        assert len(out.output_token_ids) == 5 + i and out.finish_reason == "length"
        assert all(0 <= t < VOCAB for t in out.output_token_ids)
    assert engine.scheduler.eos_token_ids == {2}  # read from the checkpoint
    assert engine.scheduler.max_model_len == 512
    snap = engine.metrics_snapshot()
    assert snap.num_generated_tokens == sum(5 + i for i in range(8))
    assert all_free(engine)
    engine.scheduler.block_manager.check_invariants()


def test_greedy_agrees_with_transformers_under_preemption_and_chunks(tiny_llama: Path) -> None:
    batch = prompts(6)
    expected = hf_greedy(tiny_llama, batch, GREEDY.max_tokens)
    # 12 blocks of 16 slots cannot hold six sequences of up to 76 tokens: preemption.
    config = EngineConfig(
        model=str(tiny_llama), num_blocks=12, max_prefill_chunk=7, max_num_batched_tokens=24
    )
    engine = LLMEngine(config)
    got = [o.output_token_ids for o in engine.generate(batch, GREEDY)]
    assert engine.scheduler.num_preemptions > 0
    assert got == expected
    # Again, now hitting the prefix cache the first run filled.
    got = [o.output_token_ids for o in engine.generate(batch, GREEDY)]
    assert engine.metrics_snapshot().prefix_cache_hits > 0
    assert got == expected
    assert all_free(engine)


def test_abort_frees_blocks(tiny_llama: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), num_blocks=32))
    ids = [engine.add_request(p, GREEDY) for p in prompts(3)]
    engine.step()
    engine.step()
    assert not all_free(engine)
    for request_id in ids:
        out = engine.abort(request_id)
        assert out is not None and out.finish_reason == "abort"
    assert all_free(engine) and not engine.has_unfinished()


def test_async_engine_streams_and_cancellation_frees_blocks(tiny_llama: Path) -> None:
    async def main() -> None:
        engine = LLMEngine(EngineConfig(model=str(tiny_llama), num_blocks=32))
        async with AsyncLLMEngine(engine) as aengine:
            stream = [ids async for ids, _ in aengine.generate(prompts(1)[0], GREEDY)]
            assert len(stream) == GREEDY.max_tokens  # one delta per token, as they came
            assert sum(len(ids) for ids in stream) == GREEDY.max_tokens

            async def endless() -> None:
                params = SamplingParams(max_tokens=400, ignore_eos=True)
                async for _ in aengine.generate(prompts(2)[1], params):
                    pass

            task = asyncio.create_task(endless())
            while all_free(engine):
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            deadline = time.monotonic() + 10
            while not all_free(engine):
                assert time.monotonic() < deadline, "cancelled request kept its blocks"
                await asyncio.sleep(0.01)

    asyncio.run(main())
