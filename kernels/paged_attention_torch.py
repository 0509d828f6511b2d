"""Paged attention in vectorized torch: the fast path where there is no Triton (CPU).

Same contract as paged_attention_ref. Decode rows (one new token) of all sequences go through one
batched scaled_dot_product_attention over their gathered blocks; sequences with several new
tokens (prefill, chunks) are few per step and go one by one, so padding never multiplies work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fieldline.kernels.paged_attention import paged_attention_ref


def _gather(cache: torch.Tensor, tables: torch.Tensor, length: int) -> torch.Tensor:
    # cache: [num_blocks, block_size, kv_heads, D]; tables: [S, nb] -> [S, length, kv_heads, D]
    s, nb = tables.shape
    out = cache[tables.long().clamp(min=0)].reshape(s, nb * cache.shape[1], *cache.shape[2:])
    return out[:, :length]


def paged_attention_torch(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1] int32
    context_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
) -> torch.Tensor:
    n_new = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    decode = (n_new == 1).nonzero().flatten()
    if len(decode) < 2:  # nothing to batch
        return paged_attention_ref(
            q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale
        )
    out = torch.empty_like(q)
    num_heads = q.shape[1]
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // kv_heads
    # decode rows: [S_d, H, 1, D] against [S_d, H, L, D] keys, masked past each context length
    rows = cu_seqlens_q[:-1].long()[decode]
    ctx = context_lens.long()[decode]
    length = int(ctx.max())
    nb = (length + block_size - 1) // block_size
    tables = block_tables[decode, :nb]
    # keys stay at kv_heads: SDPA's enable_gqa maps head h to kv head h // group without a copy
    k = _gather(k_cache, tables, length).transpose(1, 2)  # [S_d, kv_heads, L, D]
    v = _gather(v_cache, tables, length).transpose(1, 2)
    qd = q[rows].unsqueeze(2)  # [S_d, H, 1, D]
    mask = torch.arange(length, device=q.device)[None, :] < ctx[:, None]  # [S_d, L]
    o = F.scaled_dot_product_attention(
        qd, k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=group > 1
    )
    out[rows] = o.squeeze(2).to(q.dtype)
    # the rest (prefill and chunks) one sequence at a time, through the reference
    for i in (n_new != 1).nonzero().flatten().tolist():
        a, b = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        if a == b:
            continue
        out[a:b] = paged_attention_ref(
            q[a:b],
            k_cache,
            v_cache,
            block_tables[i : i + 1],
            torch.tensor([0, b - a], dtype=torch.int32, device=q.device),
            context_lens[i : i + 1],
            scale,
        )
    return out
