"""Reading a Hugging Face checkpoint directory: config.json into ModelConfig, *.safetensors into tensors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

SUPPORTED = ("llama", "qwen2")
QUANT_KEY = "fieldline_quantization"


class CheckpointError(Exception):
    """A checkpoint directory that cannot be loaded; the message says what is missing."""


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    quantization: str | None = None  # "int8_weight_only" for checkpoints from quantize.py


def read_config(model_dir: Path) -> ModelConfig:
    path = model_dir / "config.json"
    try:
        c = json.loads(path.read_text())
    except OSError as exc:
        raise CheckpointError(f"{model_dir} has no readable config.json ({exc.strerror})") from exc
    model_type = c.get("model_type")
    if model_type not in SUPPORTED:
        raise CheckpointError(f"model_type {model_type!r} is not supported (only {SUPPORTED})")
    heads = int(c["num_attention_heads"])
    # transformers 5 writes "rope_parameters" (theta inside); older checkpoints "rope_scaling".
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_theta = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
    rope_scaling = (
        rope if rope.get("rope_type", rope.get("type")) not in (None, "default") else None
    )
    eos = c.get("eos_token_id")
    gen = model_dir / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id", eos)
    eos_ids = tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(c["vocab_size"]),
        hidden_size=int(c["hidden_size"]),
        intermediate_size=int(c["intermediate_size"]),
        num_layers=int(c["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=int(c.get("head_dim") or c["hidden_size"] // heads),
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(c.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases; Llama only when attention_bias says so.
        attention_bias=model_type == "qwen2" or bool(c.get("attention_bias", False)),
        eos_token_ids=eos_ids,
        quantization=(c.get(QUANT_KEY) or {}).get("method"),
    )


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir} has no *.safetensors files")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    return weights
