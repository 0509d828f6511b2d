"""The demo's LLM: a tiny Llama checkpoint with RANDOM weights and a tokenizer trained at demo start.

It exists to show the plumbing (push, int8, autotune, the gateway, the cache, explanations),
not language: its answers are noise, and the demo says so. Written with torch and safetensors
directly, in Hugging Face's Llama layout, so the demo needs no transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "the press line stopped at station four",
    "temperature of the oven is within limits",
    "the conveyor belt moves parts to the camera",
    "inspect the weld seam and report defects",
    "a scratch on the part surface was found",
    "check the camera lens and the lighting",
    "the operator restarted the line after the alarm",
] * 8
SPECIAL = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
VOCAB = 384
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
MAX_POSITIONS = 1024
# A chat template of the checkpoint's own, as real checkpoints carry in tokenizer_config.json.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def write_demo_llm(directory: Path, seed: int = 0) -> Path:
    """Write config.json, model.safetensors, tokenizer.json, tokenizer_config.json."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "add_bos_token": True,
                "chat_template": CHAT_TEMPLATE,
            }
        )
    )

    gen = torch.Generator().manual_seed(seed)
    head_dim = HIDDEN // HEADS
    inter = 2 * HIDDEN

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.2

    weights = {
        "model.embed_tokens.weight": rand(VOCAB, HIDDEN),
        "model.norm.weight": torch.ones(HIDDEN),
        "lm_head.weight": rand(VOCAB, HIDDEN),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        weights |= {
            f"{p}.input_layernorm.weight": torch.ones(HIDDEN),
            f"{p}.post_attention_layernorm.weight": torch.ones(HIDDEN),
            f"{p}.self_attn.q_proj.weight": rand(HEADS * head_dim, HIDDEN),
            f"{p}.self_attn.k_proj.weight": rand(KV_HEADS * head_dim, HIDDEN),
            f"{p}.self_attn.v_proj.weight": rand(KV_HEADS * head_dim, HIDDEN),
            f"{p}.self_attn.o_proj.weight": rand(HIDDEN, HEADS * head_dim),
            f"{p}.mlp.gate_proj.weight": rand(inter, HIDDEN),
            f"{p}.mlp.up_proj.weight": rand(inter, HIDDEN),
            f"{p}.mlp.down_proj.weight": rand(HIDDEN, inter),
        }
    save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": inter,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory
