"""The demo's hand-written random Llama is a real Hugging Face Llama: transformers reads it and
gives the engine's logits; the demo's chat template renders through the gateway's renderer."""

from __future__ import annotations

from pathlib import Path

import torch

from fieldline.cli.harness.tiny_llm import write_demo_llm
from fieldline.edge.engine.config import EngineConfig
from fieldline.edge.engine.engine import LLMEngine
from fieldline.edge.engine.sequence import SamplingParams
from fieldline.edge.llm.chat_template import ChatMessage, load_chat_template


def test_demo_checkpoint_matches_transformers_greedy(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    path = write_demo_llm(tmp_path / "llm")
    engine = LLMEngine(EngineConfig(model=str(path), num_blocks=64))
    ids = engine.encode("the press line stopped")
    (out,) = engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=8,
            min_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
        )[0, len(ids) :].tolist()
    assert out.output_token_ids == ref
    template = load_chat_template(path)
    assert not template.is_default
    text = template.render([ChatMessage("user", "hello")])
    assert text == "<s><|user|> hello\n<|assistant|> "
