"""Greedy parity with transformers: tiny random Llama and Qwen2 checkpoints written here, 16 prompts,
32 tokens, token for token in fp32 — with prefix caching on and off, under a KV budget that forces
preemption, with prefill chunked small, and with llama3 rope scaling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fieldline.edge.engine.config import EngineConfig
from fieldline.edge.engine.engine import LLMEngine
from fieldline.edge.engine.sequence import SamplingParams

VOCAB = 384
MAX_TOKENS = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def write_checkpoint(path: Path, family: str, **extra: object) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(
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
        **extra,
    )
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    model.eval().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("parity")
    return {
        "llama": write_checkpoint(root / "llama", "llama"),
        "qwen2-tied": write_checkpoint(root / "qwen2", "qwen2", tie_word_embeddings=True),
        "llama3-rope": write_checkpoint(root / "llama3", "llama", rope_scaling=LLAMA3_ROPE),
    }


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    lengths = [1, 2, 5, 9, 15, 16, 17, 23, 31, 32, 33, 48, 64, 80, 100, 120]
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


_expected: dict[str, list[list[int]]] = {}


def hf_greedy(path: Path) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    key = str(path)
    if key not in _expected:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        outs = []
        # A plain argmax loop over transformers' forward (with its KV cache): generate() with
        # min_new_tokens would mask EOS, while the engine's ignore_eos keeps it choosable.
        with torch.no_grad():
            for p in prompts():
                step = model(torch.tensor([p]), use_cache=True)
                tokens: list[int] = []
                for _ in range(MAX_TOKENS):
                    nxt = int(step.logits[0, -1].argmax())
                    tokens.append(nxt)
                    step = model(
                        torch.tensor([[nxt]]), past_key_values=step.past_key_values, use_cache=True
                    )
                outs.append(tokens)
        _expected[key] = outs
    return _expected[key]


CASES = {
    "prefix-cache-on": dict(enable_prefix_caching=True),
    "prefix-cache-off": dict(enable_prefix_caching=False),
    "preemption": dict(num_blocks=14, max_num_seqs=16),
    "small-chunks": dict(max_prefill_chunk=8, max_num_batched_tokens=16),
    # every other case runs the oneDNN-prepacked CPU linears; this one the plain F.linear
    "plain-linears": dict(prepack_weights=False),
}


# Every scheduling case on Llama; the other families (which differ in the model only) on two.
RUNS = [("llama", c) for c in CASES] + [
    (f, c) for f in ("qwen2-tied", "llama3-rope") for c in ("prefix-cache-on", "preemption")
]


@pytest.mark.parametrize(("family", "case"), RUNS)
def test_greedy_equals_transformers(checkpoints: dict[str, Path], family: str, case: str) -> None:
    path = checkpoints[family]
    config = EngineConfig(model=str(path), **CASES[case])  # type: ignore[arg-type]
    engine = LLMEngine(config)
    got = [o.output_token_ids for o in engine.generate(prompts(), GREEDY)]
    if case == "preemption":
        assert engine.scheduler.num_preemptions > 0
    expected = hf_greedy(path)
    mismatched = [i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e]
    assert not mismatched, f"prompts {mismatched} differ from transformers"


def test_text_prompt_through_tokenizer_and_cli(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """A text prompt goes through the checkpoint's tokenizer.json; the CLI prints the same text."""
    import shutil
    import subprocess
    import sys

    from tests.edge.engine.conftest import train_tokenizer

    model = tmp_path / "with-tokenizer"
    shutil.copytree(checkpoints["llama"], model)
    train_tokenizer(model, VOCAB)
    engine = LLMEngine(EngineConfig(model=str(model)))
    assert engine.tokenizer is not None and engine.tokenizer.eos_token_ids == [2]
    prompt = "the press line stopped"
    ids = engine.tokenizer.encode(prompt)
    assert ids[0] == 1 and engine.tokenizer.decode(ids) == prompt
    out = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    by_ids = engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert out[0].output_token_ids == by_ids[0].output_token_ids
    assert out[0].text == engine.tokenizer.decode(out[0].output_token_ids)
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "fieldline.cli",
            "engine",
            "generate",
            "--model",
            str(model),
            "--prompt",
            prompt,
            "--max-tokens",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    # greedy may stop early at EOS in the CLI (no ignore_eos); its text is a prefix of ours
    assert out[0].text.startswith(cli.stdout.strip())
