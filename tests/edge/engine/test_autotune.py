"""autotune returns a config that fits the KV budget and the SLO, survives JSON, and runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from fieldline.edge.engine.autotune import autotune
from fieldline.edge.engine.config import EngineConfig
from fieldline.edge.engine.engine import LLMEngine
from fieldline.edge.engine.sequence import SamplingParams
from tests.edge.engine.test_parity import write_checkpoint

KV_BYTES = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("autotune") / "m", "qwen2")


@pytest.mark.parametrize("slo_ms", [None, 50.0])
def test_autotune_config_round_trips_and_runs(model: Path, slo_ms: float | None) -> None:
    tuned = autotune(EngineConfig(model=str(model)), slo_ms, KV_BYTES)
    again = EngineConfig.from_json(tuned.to_json())
    assert again == tuned
    assert tuned.num_blocks is not None and tuned.kv_cache_bytes is None
    # the budget is honoured: blocks of 2 layers x 16 slots x 2 kv heads x 16 dims x 4 B, K and V
    assert tuned.num_blocks * 2 * 2 * 16 * 2 * 16 * 4 <= KV_BYTES
    assert tuned.max_num_batched_tokens >= tuned.max_prefill_chunk
    assert tuned.slo_itl_p95_ms == slo_ms
    out = LLMEngine(again).generate(
        [[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    )
    assert len(out[0].output_token_ids) == 4


def test_choose_never_serializes_on_a_noisy_profile() -> None:
    """A profile where batch 4 looked 4x slower than batch 1 (seen on a busy machine) still
    admits several sequences; an SLO that only batch 1 meets keeps batch 1."""
    from fieldline.edge.engine.autotune import MIN_MAX_SEQS, Profile, choose

    noisy = Profile({1: 0.048, 4: 0.188, 16: 0.2}, prefill_token_s=0.001)
    base = EngineConfig(model="unused")
    assert choose(noisy, base, num_blocks=1000, slo_itl_p95_ms=None).max_num_seqs == MIN_MAX_SEQS
    assert choose(noisy, base, num_blocks=1000, slo_itl_p95_ms=50.0).max_num_seqs == 1
    clean = Profile({1: 0.020, 4: 0.021, 16: 0.025, 64: 0.05}, prefill_token_s=0.001)
    assert choose(clean, base, num_blocks=1000, slo_itl_p95_ms=None).max_num_seqs == 64
