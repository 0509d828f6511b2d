"""autotune: profile a few decode steps and one prefill on this device, return an EngineConfig.

The KV cache is sized by the given byte budget (never a share of "GPU memory": Jetsons share it
with the CPU); the profile picks max_num_seqs, the per-step token budget and the prefill chunk.
"""

from __future__ import annotations

import dataclasses
import time

import structlog

from fieldline.edge.engine.config import EngineConfig
from fieldline.edge.engine.model_runner import ModelRunner
from fieldline.edge.engine.scheduler import ScheduledSeq
from fieldline.edge.engine.sequence import SamplingParams, Sequence

log = structlog.get_logger(__name__)

BATCH_SIZES = (1, 4, 16, 64)  # decode batch sizes profiled (capped by the KV cache)
PROFILE_CONTEXT = 64  # prompt tokens per profiled sequence
DECODE_STEPS = 5  # timed decode steps per batch size (after one warm-up step); the fastest counts
# Never fewer concurrent sequences than this (when the cache holds them): a decode step of 4 rows
# costs about what one of 1 row does on any device we target (the weights are read once per step),
# and a noisy profile on a busy machine once chose 1, which serializes every request.
MIN_MAX_SEQS = 4
PREFILL_TOKENS = 256  # prompt tokens of the timed prefill step
# without an SLO: stop growing the batch once a 4x bigger batch gains less than this in tokens/s
MIN_BATCH_GAIN = 1.15
DEFAULT_TOKEN_BUDGET = 2048
MAX_TOKEN_BUDGET = 8192
MAX_CHUNK = 512


@dataclasses.dataclass(frozen=True)
class Profile:
    decode_step_s: dict[int, float]  # batch size -> seconds per decode step
    prefill_token_s: float  # seconds per prompt token in a prefill step


def _blocks(n_tokens: int, block_size: int) -> int:
    return -(-n_tokens // block_size)


def profile(runner: ModelRunner) -> Profile:
    """Time decode steps at a few batch sizes and one prefill, on synthetic sequences."""
    bs = runner.config.block_size
    vocab = runner.model_config.vocab_size
    per_seq = _blocks(PROFILE_CONTEXT + DECODE_STEPS + 2, bs)
    params = SamplingParams(temperature=0.0, max_tokens=DECODE_STEPS + 2, ignore_eos=True)
    decode: dict[int, float] = {}
    for b in BATCH_SIZES:
        if b * per_seq > runner.num_blocks:
            break
        seqs = []
        for i in range(b):
            seq = Sequence(i, [(7 * i + j) % vocab for j in range(PROFILE_CONTEXT)], params)
            seq.block_table = list(range(i * per_seq, (i + 1) * per_seq))
            seqs.append(seq)
        # prefill without timing, then one untimed decode step as warm-up
        tokens = runner.execute([ScheduledSeq(s, PROFILE_CONTEXT, True) for s in seqs])
        times = []
        for step in range(DECODE_STEPS + 1):
            for s, t in zip(seqs, tokens, strict=True):
                s.num_computed_tokens = s.num_tokens
                s.append_token(int(t or 0))
            t0 = time.perf_counter()
            tokens = runner.execute([ScheduledSeq(s, 1, True) for s in seqs])
            if step:
                times.append(time.perf_counter() - t0)
        # the fastest step: other processes only ever add time, so the minimum is the device's own
        decode[b] = min(times)
    if not decode:
        raise ValueError(
            f"kv cache of {runner.num_blocks} blocks cannot hold one {PROFILE_CONTEXT}-token sequence"
        )
    n = min(PREFILL_TOKENS, runner.num_blocks * bs)
    seq = Sequence(0, [j % vocab for j in range(n)], params)
    seq.block_table = list(range(_blocks(n, bs)))
    t0 = time.perf_counter()
    runner.execute([ScheduledSeq(seq, n, True)])
    prefill_token_s = (time.perf_counter() - t0) / n
    return Profile(decode, prefill_token_s)


def choose(
    prof: Profile, base: EngineConfig, num_blocks: int, slo_itl_p95_ms: float | None
) -> EngineConfig:
    """Turn a profile into engine knobs (pure, so it is testable without timing noise)."""
    sizes = sorted(prof.decode_step_s)
    if slo_itl_p95_ms is not None:
        slo_s = slo_itl_p95_ms / 1000.0
        fitting = [b for b in sizes if prof.decode_step_s[b] <= slo_s]
        max_seqs = fitting[-1] if fitting else sizes[0]
        # fill the rest of the step's time with prompt tokens, so decodes keep their ITL
        spare = max(0.0, slo_s - prof.decode_step_s[max_seqs])
        budget = max_seqs + int(spare / max(prof.prefill_token_s, 1e-9))
    else:
        max_seqs = sizes[0]
        for b in sizes[1:]:
            prev = max_seqs / prof.decode_step_s[max_seqs]
            if b / prof.decode_step_s[b] < prev * MIN_BATCH_GAIN:
                break
            max_seqs = b
        budget = DEFAULT_TOKEN_BUDGET
        max_seqs = max(max_seqs, min(MIN_MAX_SEQS, sizes[-1]))
    # a sequence needs at least one block; more seqs than blocks only causes preemption churn
    max_seqs = max(1, min(max_seqs, num_blocks))
    budget = max(max_seqs + 16, min(budget, MAX_TOKEN_BUDGET))
    chunk = max(16, min(MAX_CHUNK, budget - max_seqs))
    return dataclasses.replace(
        base,
        num_blocks=num_blocks,
        kv_cache_bytes=None,
        max_num_seqs=max_seqs,
        max_num_batched_tokens=budget,
        max_prefill_chunk=chunk,
        slo_itl_p95_ms=slo_itl_p95_ms,
    )


def autotune(
    config: EngineConfig, slo_itl_p95_ms: float | None, kv_cache_bytes: int
) -> EngineConfig:
    """Profile the model of `config` on its device under `kv_cache_bytes` of KV cache."""
    sized = dataclasses.replace(config, num_blocks=None, kv_cache_bytes=kv_cache_bytes)
    runner = ModelRunner(sized)
    prof = profile(runner)
    tuned = choose(prof, config, runner.num_blocks, slo_itl_p95_ms)
    log.info(
        "autotuned",
        decode_step_ms={b: round(s * 1000, 2) for b, s in prof.decode_step_s.items()},
        prefill_token_ms=round(prof.prefill_token_s * 1000, 3),
        num_blocks=tuned.num_blocks,
        max_num_seqs=tuned.max_num_seqs,
        max_num_batched_tokens=tuned.max_num_batched_tokens,
        max_prefill_chunk=tuned.max_prefill_chunk,
    )
    return tuned
