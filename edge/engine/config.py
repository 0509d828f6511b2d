"""EngineConfig: one slotted dataclass holding every engine knob, checked in __post_init__."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

DTYPES = ("float32", "float16", "bfloat16")
# KV budget when neither num_blocks nor kv_cache_bytes is set: small enough for a Jetson
# sharing its memory with the CPU, big enough for tens of requests on a small model.
DEFAULT_KV_CACHE_BYTES = 512 * 1024 * 1024


@dataclass(slots=True)
class EngineConfig:
    model: str  # checkpoint directory
    dtype: str = "float32"
    device: str = "cpu"
    attention_backend: str = "auto"
    block_size: int = 16
    num_blocks: int | None = None  # at most one of num_blocks / kv_cache_bytes;
    kv_cache_bytes: int | None = None  # neither -> DEFAULT_KV_CACHE_BYTES
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_prefill_chunk: int = 512  # prompt tokens of one sequence per step
    max_model_len: int | None = None  # None -> the model's max_position_embeddings
    enable_prefix_caching: bool = True
    slo_itl_p95_ms: float | None = None  # set -> adapt the per-step token budget
    priority_aging_s: float = 5.0  # waiting this long improves priority by one level
    seed: int = 0
    # pack float32 CPU weights for oneDNN at load: decode 2-5x faster; off = plain F.linear
    prepack_weights: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.kv_cache_bytes is not None:
            raise ValueError("set at most one of num_blocks and kv_cache_bytes")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be >= 1, got {self.kv_cache_bytes}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.slo_itl_p95_ms is not None and self.slo_itl_p95_ms <= 0:
            raise ValueError(f"slo_itl_p95_ms must be > 0, got {self.slo_itl_p95_ms}")
        if self.priority_aging_s <= 0:
            raise ValueError(f"priority_aging_s must be > 0, got {self.priority_aging_s}")

    def resolve_num_blocks(self, bytes_per_block: int) -> int:
        """Blocks in the KV cache, given the bytes one block takes over all layers (K and V)."""
        if self.num_blocks is not None:
            return self.num_blocks
        budget = self.kv_cache_bytes if self.kv_cache_bytes is not None else DEFAULT_KV_CACHE_BYTES
        num_blocks = budget // bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"kv cache budget {budget} B is below one block ({bytes_per_block} B)")
        return num_blocks

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> EngineConfig:
        data = json.loads(s)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown engine config keys: {sorted(unknown)}")
        return cls(**data)
