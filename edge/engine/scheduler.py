"""Scheduler: waiting/running queues, continuous batching under a token budget (work in progress)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fieldline.edge.engine.sequence import Sequence


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # compute seq.token_ids[seq.num_computed_tokens : +num_new_tokens]
    sample: bool  # after this step every token of seq is computed -> sample one token


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
