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
