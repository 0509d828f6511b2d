"""int8 weight-only checkpoints: per-output-channel symmetric int8 for the linear layers.

The result is an ordinary checkpoint directory (config.json marked, safetensors with int8
weights and float32 `*.weight_scale`), loadable by the engine and shippable as an artifact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from fieldline.edge.engine.loader import QUANT_KEY, load_weights, read_config
from fieldline.kernels.w8a16 import quantize_per_channel

QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COPIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
)


def _is_quantized(name: str) -> bool:
    # Embeddings, norms and lm_head stay float: they are small next to the blocks and the
    # logits are the most sensitive to rounding.
    return name.endswith(".weight") and any(f".{p}." in name for p in QUANTIZED)


def quantize_checkpoint(src: Path, dst: Path) -> dict[str, int]:
    """Write the int8 version of `src` into `dst`; returns byte counts before and after."""
    read_config(src)  # fails early, with a clear error, on what the engine cannot load
    weights = load_weights(src)
    out: dict[str, torch.Tensor] = {}
    before = after = 0
    for name, w in weights.items():
        before += w.numel() * w.element_size()
        if _is_quantized(name):
            w_int8, scale = quantize_per_channel(w)
            out[name] = w_int8.contiguous()
            out[f"{name}_scale"] = scale.contiguous()
        else:
            out[name] = w.contiguous()
    after = sum(t.numel() * t.element_size() for t in out.values())
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config[QUANT_KEY] = {
        "method": "int8_weight_only",
        "per_channel": True,
        "layers": list(QUANTIZED),
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for name in COPIED:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return {"bytes_before": before, "bytes_after": after}


def dequantize_checkpoint(src: Path, dst: Path) -> None:
    """The float checkpoint the int8 one stands for (w_int8 * scale): the int8 tests' reference."""
    weights = load_weights(src)
    out = {}
    for name, w in weights.items():
        if name.endswith("_scale"):
            continue
        scale = weights.get(f"{name}_scale")
        out[name] = (w.float() * scale[:, None]).contiguous() if scale is not None else w
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config.pop(QUANT_KEY, None)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
