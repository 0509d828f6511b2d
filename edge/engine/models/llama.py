"""The Llama/Qwen2 decoder over a flattened batch, attention through the kernels' backend seam.

Weights keep Hugging Face's names; linear layers are float or int8 weight-only (from
edge/engine/quantize.py), the latter run through kernels.dispatch.int8_linear. Float32 weights on
CPU are prepacked for oneDNN at load (kernels.dispatch.prepack_linear): decode runs 2-5x faster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fieldline.edge.engine.loader import CheckpointError, ModelConfig
from fieldline.kernels.dispatch import (
    AttentionBackend,
    can_prepack_linear,
    int8_linear,
    packed_linear,
    prepack_linear,
)


@dataclass
class Linear:
    weight: torch.Tensor  # [out, in] float, int8 with `scale`, or oneDNN-packed when `packed`
    bias: torch.Tensor | None = None
    scale: torch.Tensor | None = None  # [out] float32 for int8 weights
    packed: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            return int8_linear(x, self.weight, self.scale, self.bias)
        if self.packed:
            return packed_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def prepacked(self, batch_hint: int) -> Linear:
        """This layer with its weight packed for the CPU fast path; itself where there is none.

        The plain weight is dropped (not kept beside the packed copy), so memory stays flat.
        """
        if self.scale is not None or self.packed or not can_prepack_linear(self.weight):
            return self
        return Linear(prepack_linear(self.weight, batch_hint), self.bias, packed=True)


@dataclass
class Batch:
    """The flat batch of one step (built by ModelRunner)."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [S, max_blocks] int32
    cu_seqlens_q: torch.Tensor  # [S + 1] int32
    context_lens: torch.Tensor  # [S] int32
    logits_indices: torch.Tensor  # [N] int64: rows whose next token is sampled


def fuse(parts: list[Linear]) -> Linear:
    """One Linear whose output is the parts' outputs side by side (float or int8 alike)."""
    bias = None
    if any(p.bias is not None for p in parts):
        bias = torch.cat(
            [p.bias if p.bias is not None else p.weight.new_zeros(p.weight.shape[0]) for p in parts]
        )
    scales = [p.scale for p in parts]
    scale = torch.cat(scales) if all(sc is not None for sc in scales) else None  # type: ignore[arg-type]
    assert not any(p.packed for p in parts), "fuse before packing"
    return Linear(torch.cat([p.weight for p in parts]).contiguous(), bias, scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary frequencies, with llama3 scaling when the config asks for it (as transformers does)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind != "llama3":
        raise CheckpointError(f"rope_scaling type {kind!r} is not supported (default, llama3)")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, head_dim]; cos, sin: [T, 1, head_dim]; halves rotated as transformers does
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LlamaModel:
    def __init__(
        self,
        cfg: ModelConfig,
        weights: dict[str, torch.Tensor],
        *,
        dtype: torch.dtype,
        device: torch.device,
        backend: AttentionBackend,
        prepack_batch: int | None = None,
    ):
        """prepack_batch: pack float32 CPU linears for this many rows per step (None: don't)."""
        self.cfg = cfg
        self.backend = backend
        self.scale = cfg.head_dim**-0.5

        def tensor(name: str) -> torch.Tensor:
            if name not in weights:
                raise CheckpointError(f"checkpoint lacks tensor {name}")
            t = weights[name]
            return t.to(device) if t.dtype == torch.int8 else t.to(device=device, dtype=dtype)

        def linear(prefix: str, bias: bool = False) -> Linear:
            w = tensor(f"{prefix}.weight")
            scale = weights.get(f"{prefix}.weight_scale")
            b = tensor(f"{prefix}.bias") if bias else None
            if w.dtype == torch.int8:
                if scale is None:
                    raise CheckpointError(f"int8 tensor {prefix}.weight has no weight_scale")
                return Linear(w, b, scale.to(device=device, dtype=torch.float32))
            return Linear(w, b)

        self.embed = tensor("model.embed_tokens.weight")
        self.layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}"
            self.layers.append(
                {
                    "in_norm": tensor(f"{p}.input_layernorm.weight"),
                    # q, k and v (and gate and up) as one matmul each: one pass over x.
                    "qkv": fuse(
                        [linear(f"{p}.self_attn.{n}_proj", cfg.attention_bias) for n in "qkv"]
                    ),
                    "o": linear(f"{p}.self_attn.o_proj"),
                    "post_norm": tensor(f"{p}.post_attention_layernorm.weight"),
                    "gate_up": fuse([linear(f"{p}.mlp.gate_proj"), linear(f"{p}.mlp.up_proj")]),
                    "down": linear(f"{p}.mlp.down_proj"),
                }
            )
        self.norm = tensor("model.norm.weight")
        tied = cfg.tie_word_embeddings or "lm_head.weight" not in weights
        self.lm_head = Linear(self.embed) if tied else linear("lm_head")
        if prepack_batch is not None:
            # a tied lm_head gets its own packed copy: the embedding lookup needs the plain rows
            self.lm_head = self.lm_head.prepacked(prepack_batch)
            for layer in self.layers:
                for name in ("qkv", "o", "gate_up", "down"):
                    layer[name] = layer[name].prepacked(prepack_batch)
        inv_freq = rope_inv_freq(cfg).to(device)
        pos = torch.arange(cfg.max_position_embeddings, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(dtype)  # [max_pos, head_dim]
        self.sin = emb.sin().to(dtype)

    @torch.inference_mode()
    def forward(
        self, batch: Batch, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """Logits [N, vocab] for the rows in batch.logits_indices."""
        cfg = self.cfg
        t = batch.input_ids.shape[0]
        h = self.embed[batch.input_ids]  # [T, hidden]
        cos = self.cos[batch.positions].unsqueeze(1)  # [T, 1, head_dim]
        sin = self.sin[batch.positions].unsqueeze(1)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            x = rms_norm(h, layer["in_norm"], cfg.rms_norm_eps)
            q_size = cfg.num_heads * cfg.head_dim
            kv_size = cfg.num_kv_heads * cfg.head_dim
            qkv = layer["qkv"](x)  # [T, q_size + 2 * kv_size]
            # q and k rotate together: one rope over [T, heads + kv_heads, head_dim]
            qk = apply_rope(
                qkv[:, : q_size + kv_size].view(t, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim),
                cos,
                sin,
            )
            q, k = qk[:, : cfg.num_heads], qk[:, cfg.num_heads :]
            v = qkv[:, q_size + kv_size :].view(t, cfg.num_kv_heads, cfg.head_dim)
            self.backend.write_kv(k, v, k_cache, v_cache, batch.slot_mapping)
            attn = self.backend.attention(
                q,
                k_cache,
                v_cache,
                batch.block_tables,
                batch.cu_seqlens_q,
                batch.context_lens,
                self.scale,
            )  # [T, heads, head_dim]
            h = h + layer["o"](attn.reshape(t, cfg.num_heads * cfg.head_dim))
            x = rms_norm(h, layer["post_norm"], cfg.rms_norm_eps)
            gate, up = layer["gate_up"](x).chunk(2, dim=-1)
            h = h + layer["down"](F.silu(gate) * up)
        last = rms_norm(h[batch.logits_indices], self.norm, cfg.rms_norm_eps)
        return self.lm_head(last).float()
