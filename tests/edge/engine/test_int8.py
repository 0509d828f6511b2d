"""int8 weight-only: the engine on a quantized checkpoint equals transformers on the dequantized
weights (greedy), and its logits stay near the fp32 model's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fieldline.edge.engine.config import EngineConfig
from fieldline.edge.engine.engine import LLMEngine
from fieldline.edge.engine.quantize import dequantize_checkpoint, quantize_checkpoint
from fieldline.edge.engine.scheduler import ScheduledSeq
from fieldline.edge.engine.sequence import SamplingParams, Sequence
from tests.edge.engine.test_parity import MAX_TOKENS, hf_greedy, prompts, write_checkpoint

# Relative to the logits' spread: int8 rounding of 7 linear layers moves logits by a few %.
LOGIT_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("int8")
    fp32 = write_checkpoint(root / "fp32", "qwen2")
    sizes = quantize_checkpoint(fp32, root / "int8")
    assert sizes["bytes_after"] < sizes["bytes_before"]
    dequantize_checkpoint(root / "int8", root / "dequant")
    return {"fp32": fp32, "int8": root / "int8", "dequant": root / "dequant"}


def test_int8_greedy_equals_transformers_on_dequantized(ckpts: dict[str, Path]) -> None:
    engine = LLMEngine(EngineConfig(model=str(ckpts["int8"])))
    assert engine.runner.model_config.quantization == "int8_weight_only"
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    got = [o.output_token_ids for o in engine.generate(prompts(), params)]
    expected = hf_greedy(ckpts["dequant"])
    mismatched = [i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e]
    assert not mismatched, f"prompts {mismatched} differ"


def _first_logits(path: Path, prompt: list[int]) -> torch.Tensor:
    engine = LLMEngine(EngineConfig(model=str(path), num_blocks=16, enable_prefix_caching=False))
    seq = Sequence(0, prompt, SamplingParams(temperature=0.0))
    engine.scheduler.block_manager.allocate(seq, len(prompt))
    return engine.runner.logits([ScheduledSeq(seq, len(prompt), True)])[0]


def test_int8_logits_stay_near_fp32(ckpts: dict[str, Path]) -> None:
    for prompt in prompts()[::4]:
        fp32 = _first_logits(ckpts["fp32"], prompt)
        int8 = _first_logits(ckpts["int8"], prompt)
        spread = fp32.max() - fp32.min()
        assert (int8 - fp32).abs().max() <= LOGIT_TOLERANCE * spread
