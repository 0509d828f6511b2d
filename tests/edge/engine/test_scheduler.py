"""Scheduler: budgets, chunked prefill, preemption, aging and SLO mode, driven by a paged
stand-in runner (paged_standin.py) so that a wrong block or a lost KV slot changes tokens."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldline.edge.engine.config import EngineConfig
from fieldline.edge.engine.scheduler import Scheduler, SchedulerOutput
from fieldline.edge.engine.sequence import SamplingParams, Sequence, SequenceStatus
from tests.edge.engine.paged_standin import VOCAB, PagedStandIn, reference

BS = 4


def assert_no_shared_writable_slot(sched: Scheduler) -> None:
    """Blocks a live sequence may still write are referenced by that sequence alone."""
    owner: dict[int, int] = {}
    for seq in sched.running:
        for block_id in seq.block_table:
            owner.setdefault(block_id, seq.seq_id)
    for seq in sched.running:
        for block_id in seq.block_table[
            seq.num_computed_tokens // sched.block_manager.block_size :
        ]:
            assert sched.block_manager.blocks[block_id].ref_count == 1, (seq, block_id)
            assert owner[block_id] == seq.seq_id, (seq, block_id)
    for seq in sched.waiting:
        assert seq.block_table == [] and seq.num_computed_tokens == 0


def drive(sched: Scheduler, runner: PagedStandIn, max_steps: int = 5000) -> list[SchedulerOutput]:
    """Step until everything finished, checking the budgets and slots at every step."""
    outputs = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return outputs
        out = sched.schedule()
        assert out.num_batched_tokens <= sched.token_budget
        assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
        assert len(out.scheduled) <= sched.config.max_num_seqs
        assert len(sched.running) <= sched.config.max_num_seqs
        assert len({s.seq.seq_id for s in out.scheduled}) == len(out.scheduled)
        for item in out.scheduled:
            assert item.num_new_tokens >= 1
            if item.seq.num_computed_tokens < item.seq.num_prompt_tokens:
                assert item.num_new_tokens <= sched.config.max_prefill_chunk
        assert_no_shared_writable_slot(sched)
        sched.postprocess(out, runner.execute(out.scheduled))
        sched.block_manager.check_invariants()
        outputs.append(out)
    raise AssertionError("requests did not finish")


def make(
    num_blocks: int = 64, clock=None, max_model_len: int | None = None, **overrides
) -> tuple[Scheduler, PagedStandIn]:
    config = EngineConfig(model="unused", block_size=BS, num_blocks=num_blocks, **overrides)
    kwargs = {"clock": clock} if clock is not None else {}
    sched = Scheduler(config, num_blocks, eos_token_ids=(), max_model_len=max_model_len, **kwargs)
    return sched, PagedStandIn(num_blocks, BS)


def add(sched: Scheduler, seq_id: int, prompt: list[int], max_tokens: int, **kw) -> Sequence:
    seq = Sequence(seq_id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), **kw)
    sched.add(seq)
    return seq


PROMPTS = [[(3 * i + j) % VOCAB for j in range(n)] for i, n in enumerate([5, 17, 1, 33, 8, 12])]


def assert_all_blocks_free(sched: Scheduler) -> None:
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    assert all(b.ref_count == 0 for b in sched.block_manager.blocks)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_continuous_batching_matches_reference(prefix_caching: bool) -> None:
    sched, runner = make(
        max_num_seqs=3, max_num_batched_tokens=20, enable_prefix_caching=prefix_caching
    )
    seqs = [add(sched, i, p, max_tokens=6 + i) for i, p in enumerate(PROMPTS)]
    outputs = drive(sched, runner)
    for seq, prompt in zip(seqs, PROMPTS, strict=True):
        assert seq.status == SequenceStatus.FINISHED_LENGTH
        assert seq.output_token_ids == reference(prompt, seq.sampling_params.max_tokens)
    # Decodes and prefill chunks shared steps.
    assert any({s.num_new_tokens == 1 for s in o.scheduled} == {True, False} for o in outputs)
    assert_all_blocks_free(sched)


def test_decodes_are_scheduled_before_prefill_chunks() -> None:
    sched, runner = make(max_num_batched_tokens=8, max_prefill_chunk=8)
    add(sched, 0, [1, 2], max_tokens=5)
    sched.postprocess(out := sched.schedule(), runner.execute(out.scheduled))
    add(sched, 1, list(range(30)), max_tokens=2)
    out = sched.schedule()
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [(0, 1), (1, 7)]


def test_chunked_prefill_splits_long_prompts() -> None:
    sched, runner = make(max_prefill_chunk=8, max_num_batched_tokens=64)
    prompt = list(range(30))
    seq = add(sched, 0, prompt, max_tokens=3)
    outputs = drive(sched, runner)
    chunks = [(o.scheduled[0].num_new_tokens, o.scheduled[0].sample) for o in outputs]
    assert chunks == [(8, False), (8, False), (8, False), (6, True), (1, True), (1, True)]
    assert seq.output_token_ids == reference(prompt, 3)


def test_prefix_cache_skips_shared_blocks_and_keeps_tokens() -> None:
    sched, runner = make(max_num_seqs=1)
    shared = list(range(1, 14))  # 3 full blocks + 1 token
    first = add(sched, 0, [*shared, 50], max_tokens=4)
    drive(sched, runner)
    second = add(sched, 1, [*shared, 60, 61], max_tokens=4)
    out = sched.schedule()
    assert second.num_computed_tokens == 12 and out.scheduled[0].num_new_tokens == 3
    sched.postprocess(out, runner.execute(out.scheduled))
    drive(sched, runner)
    assert first.output_token_ids == reference([*shared, 50], 4)
    assert second.output_token_ids == reference([*shared, 60, 61], 4)
    stats = sched.stats().blocks
    assert stats.prefix_cache_hits == 12
    assert_all_blocks_free(sched)


def test_shared_prefix_in_flight_is_computed_once() -> None:
    sched, runner = make(max_num_batched_tokens=256, max_prefill_chunk=256)
    shared = list(range(1, 33))  # 8 full blocks
    a = add(sched, 0, [*shared, 40, 41], max_tokens=3)
    b = add(sched, 1, [*shared, 50], max_tokens=3)
    c = add(sched, 2, [90, 91, 92], max_tokens=3)  # unrelated: not held back
    first = sched.schedule()
    assert [s.seq for s in first.scheduled] == [a, c]
    sched.postprocess(first, runner.execute(first.scheduled))
    second = sched.schedule()
    assert [(s.seq, s.num_new_tokens) for s in second.scheduled if s.seq is b] == [(b, 1)]
    assert b.num_cached_tokens == 32
    sched.postprocess(second, runner.execute(second.scheduled))
    drive(sched, runner)
    assert b.output_token_ids == reference([*shared, 50], 3)
    assert a.output_token_ids == reference([*shared, 40, 41], 3)
    assert_all_blocks_free(sched)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_under_small_kv_budget_keeps_tokens(prefix_caching: bool) -> None:
    sched, runner = make(
        num_blocks=14, max_num_seqs=6, max_prefill_chunk=6, enable_prefix_caching=prefix_caching
    )
    seqs = [add(sched, i, p, max_tokens=12) for i, p in enumerate(PROMPTS)]
    outputs = drive(sched, runner)
    assert sum(len(o.preempted) for o in outputs) > 0
    assert sched.num_preemptions > 0
    for seq, prompt in zip(seqs, PROMPTS, strict=True):
        assert seq.output_token_ids == reference(prompt, 12)
    assert_all_blocks_free(sched)


def test_preemption_picks_least_urgent_victim() -> None:
    sched, runner = make(num_blocks=4, max_num_seqs=2)
    urgent = add(sched, 0, [1, 2, 3], max_tokens=8, priority=0)
    lax = add(sched, 1, [4, 5, 6], max_tokens=8, priority=5)
    for _ in range(10):
        out = sched.schedule()
        if out.preempted:
            break
        sched.postprocess(out, runner.execute(out.scheduled))
    assert out.preempted == [lax] and lax.status == SequenceStatus.WAITING
    assert urgent.status == SequenceStatus.RUNNING and sched.waiting[0] is lax
    assert lax.block_table == [] and lax.num_computed_tokens == 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_stream(aging_s: float, steps: int) -> Sequence:
    """One slot; a low-priority request waits under a stream of high-priority ones."""
    clock = FakeClock()
    sched, runner = make(clock=clock, max_num_seqs=1, priority_aging_s=aging_s)
    low = add(sched, 0, [1, 2, 3], max_tokens=2, priority=3)
    for step in range(steps):
        if step % 2 == 0:
            add(sched, 1000 + step, [step % VOCAB, 5], max_tokens=2, priority=0)
        out = sched.schedule()
        sched.postprocess(out, runner.execute(out.scheduled))
        clock.now += 0.1
    return low


def test_aging_lets_low_priority_finish_under_high_priority_stream() -> None:
    assert not run_stream(aging_s=1000.0, steps=200).is_finished  # starves without aging
    low = run_stream(aging_s=1.0, steps=200)
    assert low.status == SequenceStatus.FINISHED_LENGTH
    assert low.output_token_ids == reference([1, 2, 3], 2)


def test_slo_mode_shrinks_budget_when_slow_and_grows_it_back() -> None:
    sched, runner = make(
        num_blocks=256, max_num_seqs=4, max_num_batched_tokens=256, slo_itl_p95_ms=50.0
    )
    for i in range(4):
        add(sched, i, [i + 1] * 3, max_tokens=400)

    def step(duration_s: float) -> int:
        out = sched.schedule()
        assert out.num_batched_tokens <= sched.token_budget
        sched.postprocess(out, runner.execute(out.scheduled))
        sched.report_step(duration_s)
        return sched.token_budget

    budgets = [step(0.2) for _ in range(60)]  # far over 50 ms
    assert budgets[-1] == sched.min_token_budget < 256
    assert all(b2 <= b1 for b1, b2 in itertools.pairwise(budgets))
    budgets = [step(0.005) for _ in range(200)]  # well under
    assert budgets[-1] == 256
    assert all(b2 >= b1 for b1, b2 in itertools.pairwise(budgets))


def test_slo_budget_limits_prefill_per_step() -> None:
    sched, _runner = make(
        max_num_seqs=4, max_num_batched_tokens=256, max_prefill_chunk=256, slo_itl_p95_ms=10.0
    )
    sched.token_budget = sched.min_token_budget  # as if shrunk by slow steps
    add(sched, 0, list(range(100)), max_tokens=1)
    out = sched.schedule()
    assert out.num_batched_tokens == sched.min_token_budget == 32


def test_abort_frees_blocks_immediately() -> None:
    sched, runner = make(max_num_seqs=4)
    seqs = [add(sched, i, p, max_tokens=50) for i, p in enumerate(PROMPTS)]
    for _ in range(5):
        sched.postprocess(out := sched.schedule(), runner.execute(out.scheduled))
    for seq in seqs:
        assert sched.abort(seq.seq_id) is seq
        assert seq.status == SequenceStatus.FINISHED_ABORTED and seq.block_table == []
    assert sched.abort(12345) is None
    assert not sched.has_unfinished()
    assert_all_blocks_free(sched)
    sched.block_manager.check_invariants()


def test_stop_tokens_eos_and_max_model_len() -> None:
    config = EngineConfig(model="unused", block_size=BS, num_blocks=32)
    prompt = [1, 2, 3]
    ref = reference(prompt, 10)
    cases = [
        (SamplingParams(max_tokens=10, stop_token_ids=[ref[2]]), (), None, ref[:3], "stop"),
        (SamplingParams(max_tokens=10), (ref[1],), None, ref[:2], "stop"),
        (SamplingParams(max_tokens=10, ignore_eos=True), (ref[1],), None, ref, "length"),
        (SamplingParams(max_tokens=10), (), 7, ref[:4], "length"),
    ]
    for params, eos, max_len, expected, reason in cases:
        sched = Scheduler(config, 32, eos_token_ids=eos, max_model_len=max_len)
        seq = Sequence(0, prompt, params)
        sched.add(seq)
        drive(sched, PagedStandIn(32, BS))
        assert (seq.output_token_ids, seq.finish_reason) == (expected, reason)


def test_add_rejects_requests_that_can_never_run() -> None:
    sched, _ = make(num_blocks=4, max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len"):
        add(sched, 0, list(range(32)), max_tokens=1)
    with pytest.raises(ValueError, match="KV cache"):
        add(sched, 1, list(range(10)), max_tokens=10)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=8),
    max_tokens=st.integers(1, 12),
    num_blocks=st.integers(13, 40),
    max_num_seqs=st.integers(1, 6),
    budget=st.integers(6, 64),
    chunk=st.integers(1, 16),
    prefix_caching=st.booleans(),
    abort_every=st.integers(0, 5),
)
def test_random_workloads_keep_tokens_and_return_every_block(
    lengths: list[int],
    max_tokens: int,
    num_blocks: int,
    max_num_seqs: int,
    budget: int,
    chunk: int,
    prefix_caching: bool,
    abort_every: int,
) -> None:
    sched, runner = make(
        num_blocks=num_blocks,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_prefill_chunk=chunk,
        enable_prefix_caching=prefix_caching,
    )
    # Prompts share leading tokens so the prefix cache has something to find.
    prompts = [
        [(j * 7) % VOCAB if j < 12 else (i + j) % VOCAB for j in range(n)]
        for i, n in enumerate(lengths)
    ]
    seqs = [add(sched, i, p, max_tokens=max_tokens) for i, p in enumerate(prompts)]
    aborted: set[int] = set()
    step = 0
    while sched.has_unfinished():
        step += 1
        assert step < 5000
        if abort_every and step % (abort_every * 7) == 0:
            live = sched.running + sched.waiting
            sched.abort(live[step % len(live)].seq_id)
            aborted.add(live[step % len(live)].seq_id)
        out = sched.schedule()
        assert out.num_batched_tokens <= budget and len(out.scheduled) <= max_num_seqs
        assert_no_shared_writable_slot(sched)
        sched.postprocess(out, runner.execute(out.scheduled))
        sched.block_manager.check_invariants()
    for seq, prompt in zip(seqs, prompts, strict=True):
        expected = reference(prompt, max_tokens)
        if seq.seq_id in aborted:
            assert seq.finish_reason == "abort"
            assert seq.output_token_ids == expected[: seq.num_output_tokens]
        else:
            assert seq.output_token_ids == expected
    assert_all_blocks_free(sched)
