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


def write_demo_llm(
    directory: Path,
    seed: int = 0,
    *,
    hidden: int = HIDDEN,
    layers: int = LAYERS,
    heads: int = HEADS,
    kv_heads: int = KV_HEADS,
) -> Path:
    """Write config.json, model.safetensors, tokenizer.json, tokenizer_config.json (bench/gateway.py
    asks for a bigger one)."""
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
        show_progress=False,
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
    head_dim = hidden // heads
    inter = 2 * hidden

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.2

    weights = {
        "model.embed_tokens.weight": rand(VOCAB, hidden),
        "model.norm.weight": torch.ones(hidden),
        "lm_head.weight": rand(VOCAB, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}"
        weights |= {
            f"{p}.input_layernorm.weight": torch.ones(hidden),
            f"{p}.post_attention_layernorm.weight": torch.ones(hidden),
            f"{p}.self_attn.q_proj.weight": rand(heads * head_dim, hidden),
            f"{p}.self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
            f"{p}.self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
            f"{p}.self_attn.o_proj.weight": rand(hidden, heads * head_dim),
            f"{p}.mlp.gate_proj.weight": rand(inter, hidden),
            f"{p}.mlp.up_proj.weight": rand(inter, hidden),
            f"{p}.mlp.down_proj.weight": rand(hidden, inter),
        }
    save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
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
