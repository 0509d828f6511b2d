"""Scheduler: waiting/running queues, continuous batching under a per-step token budget.

One step holds decodes first, then prefill chunks (at most max_prefill_chunk prompt tokens of
one sequence) with what is left of the budget. When blocks run out, the least urgent running
sequence is preempted by recompute. Urgency is the request priority, improved by one level
per priority_aging_s waited, so nothing starves. In SLO mode the token budget adapts to keep
p95 inter-token latency under a target: multiplicative decrease, additive increase.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from fieldline.edge.engine.block_manager import BlockManager, BlockStats
from fieldline.edge.engine.config import EngineConfig
from fieldline.edge.engine.sequence import Sequence, SequenceStatus
from fieldline.shared.health import p95

SLO_WINDOW = 32  # inter-token latency samples (step durations) kept
SLO_MIN_SAMPLES = 8  # samples needed before the budget moves
SLO_DECREASE = 0.7  # budget multiplier when p95 is over the target
SLO_HEADROOM = 0.8  # grow only while p95 < SLO_HEADROOM * target
SLO_INCREASE_DIVISOR = 32  # additive growth per step: max_num_batched_tokens / this
SLO_MIN_BUDGET = 32  # budget floor; raised to max_num_seqs so every decode fits

Urgency = tuple[int, float, int]  # (effective priority, arrival time, seq id): lower first


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # compute seq.token_ids[seq.num_computed_tokens : +num_new_tokens]
    sample: bool  # after this step every token of seq is computed -> sample one token


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    token_budget: int
    num_preemptions: int
    kv_slots_live: int  # slots holding tokens of running sequences (shared blocks once)
    kv_slots_allocated: int  # slots in blocks referenced by running sequences
    blocks: BlockStats


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        num_blocks: int,
        eos_token_ids: Iterable[int] = (),
        max_model_len: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len or config.max_model_len
        self.clock = clock
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.token_budget = config.max_num_batched_tokens
        self.min_token_budget = min(
            config.max_num_batched_tokens, max(SLO_MIN_BUDGET, config.max_num_seqs)
        )
        self._itl_ms: deque[float] = deque(maxlen=SLO_WINDOW)
        self._last_step_decoded = False

    # -- queue management ------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue seq; raise ValueError for a request this engine can never finish."""
        if self.max_model_len is not None and seq.num_tokens >= self.max_model_len:
            raise ValueError(
                f"prompt of {seq.num_tokens} tokens leaves no room under "
                f"max_model_len={self.max_model_len}"
            )
        longest = seq.num_tokens + seq.sampling_params.max_tokens
        if self.max_model_len is not None:
            longest = min(longest, self.max_model_len)
        if self.block_manager.blocks_needed(longest) > self.block_manager.num_blocks:
            raise ValueError(
                f"request may reach {longest} tokens, more than the KV cache holds "
                f"({self.block_manager.num_blocks} blocks of {self.block_manager.block_size})"
            )
        if seq.arrival_time is None:
            seq.arrival_time = self.clock()
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def abort(self, seq_id: int) -> Sequence | None:
        """Finish seq_id as aborted and free its blocks now; None when it is not queued."""
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.seq_id == seq_id:
                    queue.remove(seq)
                    self.block_manager.deallocate(seq)
                    seq.status = SequenceStatus.FINISHED_ABORTED
                    return seq
        return None

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def effective_priority(self, seq: Sequence, now: float) -> int:
        assert seq.arrival_time is not None
        waited = max(0.0, now - seq.arrival_time)
        return seq.priority - int(waited / self.config.priority_aging_s)

    # -- one step --------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's work: running decodes, running prefill chunks, then admissions."""
        now = self.clock()

        def urgency(s: Sequence) -> Urgency:
            return (self.effective_priority(s, now), s.arrival_time or 0.0, s.seq_id)

        out = SchedulerOutput()
        budget = self._schedule_running(out, self.token_budget, urgency)
        # Nothing is admitted in a step that preempted: the freed blocks would go straight
        # back to a victim.
        if not out.preempted:
            self._admit_waiting(out, budget, urgency)
        assert out.num_batched_tokens <= self.token_budget
        assert len(out.scheduled) <= self.config.max_num_seqs
        self._last_step_decoded = any(
            s.sample and s.seq.num_output_tokens > 0 for s in out.scheduled
        )
        return out

    def _schedule_running(
        self, out: SchedulerOutput, budget: int, urgency: Callable[[Sequence], Urgency]
    ) -> int:
        """Decodes first, then unfinished prefills, most urgent first; preempt the least
        urgent unscheduled sequence when blocks run out. Returns the budget left."""
        bm = self.block_manager
        scheduled: set[int] = set()
        by_urgency = sorted(self.running, key=urgency)
        decodes = [s for s in by_urgency if s.num_tokens - s.num_computed_tokens == 1]
        prefills = [s for s in by_urgency if s.num_tokens - s.num_computed_tokens > 1]
        for seq in decodes + prefills:
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING:
                continue  # preempted above as a victim
            num_new = min(seq.num_tokens - seq.num_computed_tokens, self._chunk(), budget)
            while not bm.can_append(seq, num_new):
                victim = max((s for s in self.running if s.seq_id not in scheduled), key=urgency)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue
            bm.may_append(seq, num_new)
            self._emit(out, seq, num_new)
            scheduled.add(seq.seq_id)
            budget -= num_new
        return budget

    def _admit_waiting(
        self, out: SchedulerOutput, budget: int, urgency: Callable[[Sequence], Urgency]
    ) -> None:
        """Admit waiting sequences, most urgent first, with their cached prefix.

        Stops at the first that does not fit, so a large request is not overtaken forever.
        One whose next prefix block another sequence is computing right now waits a step
        and then reuses it, instead of computing the same prefix twice.
        """
        bm = self.block_manager
        inflight = self._inflight_prefix_hashes()
        for seq in sorted(self.waiting, key=urgency):
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            hits = bm.match_prefix(seq)
            if inflight and bm.first_miss_hash(seq, hits) in inflight:
                continue
            num_cached = len(hits) * bm.block_size
            num_new = min(seq.num_tokens - num_cached, self._chunk(), budget)
            if not bm.can_allocate(seq, num_new):
                break
            bm.allocate(seq, num_new)
            assert seq.num_computed_tokens == num_cached
            self.waiting.remove(seq)
            self.running.append(seq)
            seq.status = SequenceStatus.RUNNING
            self._emit(out, seq, num_new)
            budget -= num_new
            if bm.enable_prefix_caching:
                inflight.update(bm.pending_hashes(seq))

    def postprocess(self, output: SchedulerOutput, sampled: list[int | None]) -> list[Sequence]:
        """Advance computed tokens, append sampled ones, finish stopped sequences.

        Returns the sequences that received a token this step (finished ones included).
        """
        assert len(sampled) == len(output.scheduled), (len(sampled), len(output.scheduled))
        updated: list[Sequence] = []
        for item, token in zip(output.scheduled, sampled, strict=True):
            seq = item.seq
            if seq.status != SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            seq.num_computed_tokens += item.num_new_tokens
            assert seq.num_computed_tokens <= seq.num_tokens
            self.block_manager.cache_full_blocks(seq)
            if not item.sample:
                continue
            assert token is not None, f"runner returned no token for {seq}"
            seq.append_token(token)
            updated.append(seq)
            status = self._stop_status(seq, token)
            if status is not None:
                self._finish(seq, status)
        return updated

    # -- SLO mode --------------------------------------------------------------------------

    def report_step(self, duration_s: float) -> None:
        """Feed the last step's duration (an inter-token latency for its decodes)."""
        target = self.config.slo_itl_p95_ms
        if target is None or not self._last_step_decoded:
            return
        self._itl_ms.append(duration_s * 1000.0)
        if len(self._itl_ms) < SLO_MIN_SAMPLES:
            return
        p95 = self.itl_p95_ms()
        if p95 > target:
            self.token_budget = max(self.min_token_budget, int(self.token_budget * SLO_DECREASE))
            self._itl_ms.clear()  # judge the new budget on fresh samples only
        elif p95 < SLO_HEADROOM * target:
            step = max(1, self.config.max_num_batched_tokens // SLO_INCREASE_DIVISOR)
            self.token_budget = min(self.config.max_num_batched_tokens, self.token_budget + step)

    def itl_p95_ms(self) -> float:
        return p95(self._itl_ms) or 0.0

    # -- stats -----------------------------------------------------------------------------

    def stats(self) -> SchedulerStats:
        filled: dict[int, int] = {}
        bs = self.block_manager.block_size
        for seq in self.running:
            for i, block_id in enumerate(seq.block_table):
                n = max(0, min(bs, seq.num_tokens - i * bs))
                filled[block_id] = max(filled.get(block_id, 0), n)
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            token_budget=self.token_budget,
            num_preemptions=self.num_preemptions,
            kv_slots_live=sum(filled.values()),
            kv_slots_allocated=len(filled) * bs,
            blocks=self.block_manager.stats(),
        )

    # -- helpers ---------------------------------------------------------------------------

    def _inflight_prefix_hashes(self) -> set[int]:
        if not self.block_manager.enable_prefix_caching:
            return set()
        inflight: set[int] = set()
        for seq in self.running:
            if seq.num_computed_tokens < seq.num_tokens - 1:  # still prefilling
                inflight.update(self.block_manager.pending_hashes(seq))
        return inflight

    def _chunk(self) -> int:
        return self.config.max_prefill_chunk

    def _emit(self, out: SchedulerOutput, seq: Sequence, num_new: int) -> None:
        assert num_new >= 1
        sample = seq.num_computed_tokens + num_new == seq.num_tokens
        out.scheduled.append(ScheduledSeq(seq, num_new, sample))

    def _preempt(self, seq: Sequence) -> None:
        """Preempt by recompute: free the blocks, forget the KV, wait at the front."""
        self.running.remove(seq)
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.insert(0, seq)
        self.num_preemptions += 1

    def _finish(self, seq: Sequence, status: SequenceStatus) -> None:
        self.running.remove(seq)
        self.block_manager.deallocate(seq)
        seq.status = status

    def _stop_status(self, seq: Sequence, token: int) -> SequenceStatus | None:
        params = seq.sampling_params
        if token in params.stop_token_ids or (
            not params.ignore_eos and token in self.eos_token_ids
        ):
            return SequenceStatus.FINISHED_STOPPED
        if seq.num_output_tokens >= params.max_tokens:
            return SequenceStatus.FINISHED_LENGTH
        if self.max_model_len is not None and seq.num_tokens >= self.max_model_len:
            return SequenceStatus.FINISHED_LENGTH
        return None
