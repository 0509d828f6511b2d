"""Writing new K/V into the paged cache by slot mapping: the Triton kernel and its torch reference.

Cache layout per layer: [num_blocks, block_size, num_kv_heads, head_dim]; slot = block * block_size
+ offset. A slot of -1 skips the token (padding).
"""

from __future__ import annotations

import torch

from fieldline.kernels import check_devices
from fieldline.kernels.triton_compat import tl, triton


def write_kv_ref(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64
) -> None:
    num_blocks, block_size = k_cache.shape[:2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_flat = k_cache.view(num_blocks * block_size, *k_cache.shape[2:])
    v_flat = v_cache.view(num_blocks * block_size, *v_cache.shape[2:])
    k_flat[slots] = key[keep].to(k_cache.dtype)
    v_flat[slots] = value[keep].to(v_cache.dtype)


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_vt,
    stride_cache_slot,
    ROW: tl.constexpr,  # num_kv_heads * head_dim
    BLOCK: tl.constexpr,
):
    # One program per token: copy its [num_kv_heads * head_dim] row into its slot.
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    if slot < 0:
        return
    for start in range(0, ROW, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < ROW
        k = tl.load(key_ptr + token * stride_kt + offs, mask=mask)
        v = tl.load(value_ptr + token * stride_vt + offs, mask=mask)
        tl.store(k_cache_ptr + slot * stride_cache_slot + offs, k, mask=mask)
        tl.store(v_cache_ptr + slot * stride_cache_slot + offs, v, mask=mask)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton launcher for write_kv_ref's contract; checks shapes, dtypes and contiguity."""
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(
            f"key and value must be [tokens, kv_heads, head_dim], got {key.shape} and {value.shape}"
        )
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must be [num_blocks, block_size, kv_heads, head_dim] alike"
        )
    if k_cache.shape[2:] != key.shape[1:]:
        raise ValueError(
            f"cache heads/head_dim {tuple(k_cache.shape[2:])} != key's {tuple(key.shape[1:])}"
        )
    if slot_mapping.shape != (key.shape[0],) or slot_mapping.dtype not in (
        torch.int32,
        torch.int64,
    ):
        raise ValueError("slot_mapping must be an int32/int64 vector with one slot per token")
    if key.dtype != k_cache.dtype or value.dtype != v_cache.dtype:
        raise ValueError(f"key dtype {key.dtype} must equal the cache dtype {k_cache.dtype}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the KV cache must be contiguous")
    check_devices(_write_kv_kernel, "write_kv", key, value, k_cache, v_cache, slot_mapping)
    key = key if key.stride(-1) == 1 and key.stride(-2) == key.shape[-1] else key.contiguous()
    value = (
        value
        if value.stride(-1) == 1 and value.stride(-2) == value.shape[-1]
        else value.contiguous()
    )
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    row = key.shape[1] * key.shape[2]
    _write_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        value.stride(0),
        row,
        ROW=row,
        BLOCK=min(1024, triton.next_power_of_2(row)),
    )
