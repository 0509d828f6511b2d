"""Paged attention in vectorized torch: the fast path where there is no Triton (CPU).

Same contract as paged_attention_ref. Decode rows (one new token) of all sequences go through one
batched scaled_dot_product_attention over their gathered blocks; sequences with several new
tokens (prefill, chunks) are few per step and go one by one through SDPA too, so padding never
multiplies work and GQA never copies K/V per query head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gather(cache: torch.Tensor, tables: torch.Tensor, length: int) -> torch.Tensor:
    # cache: [num_blocks, block_size, kv_heads, D]; tables: [S, nb] -> [S, length, kv_heads, D]
    # index_select over whole blocks as rows: about 4x faster than advanced indexing on CPU
    s, nb = tables.shape
    rows = cache.view(cache.shape[0], -1)
    out = torch.index_select(rows, 0, tables.reshape(-1).long().clamp(min=0))
    return out.view(s, nb * cache.shape[1], *cache.shape[2:])[:, :length]


def _decode(
    q: torch.Tensor,  # [S, H, D]: one query row per sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,  # [S, max_blocks]
    ctx: torch.Tensor,  # [S] int64
    scale: float,
) -> torch.Tensor:
    # The group of query heads sharing a kv head becomes the query length: [S, kv_heads, group, D]
    # against [S, kv_heads, L, D], masked past each context length (GQA with no K/V copy, and
    # faster on CPU than SDPA's enable_gqa).
    s, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    length = int(ctx.max())
    nb = (length + k_cache.shape[1] - 1) // k_cache.shape[1]
    k = _gather(k_cache, tables[:, :nb], length).transpose(1, 2)
    v = _gather(v_cache, tables[:, :nb], length).transpose(1, 2)
    mask = torch.arange(length, device=q.device)[None, :] < ctx[:, None]  # [S, L]
    o = F.scaled_dot_product_attention(
        q.reshape(s, kv_heads, num_heads // kv_heads, head_dim),
        k,
        v,
        attn_mask=mask[:, None, None, :],
        scale=scale,
    )
    return o.reshape(s, num_heads, head_dim)


def _prefill(
    q: torch.Tensor,  # [n_new, H, D]: the last n_new positions of a ctx-token sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,  # [max_blocks]
    ctx: int,
    scale: float,
) -> torch.Tensor:
    n_new = q.shape[0]
    nb = (ctx + k_cache.shape[1] - 1) // k_cache.shape[1]
    k = _gather(k_cache, table[None, :nb], ctx)[0].transpose(0, 1)  # [kv_heads, ctx, D]
    v = _gather(v_cache, table[None, :nb], ctx)[0].transpose(0, 1)
    qh = q.transpose(0, 1)  # [H, n_new, D]
    gqa = q.shape[1] != k_cache.shape[2]
    if n_new == ctx:  # a whole prompt: plain causal
        o = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:  # a chunk after cached context: row i sees positions <= ctx - n_new + i
        q_pos = torch.arange(ctx - n_new, ctx, device=q.device)[:, None]
        mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos  # [n_new, ctx]
        o = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return o.transpose(0, 1)  # [n_new, H, D]


def paged_attention_torch(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1] int32
    context_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
) -> torch.Tensor:
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    decode = [i for i in range(len(lens)) if cu[i + 1] - cu[i] == 1]
    if decode:
        idx = torch.tensor(decode, device=q.device)
        rows = cu_seqlens_q[:-1].long()[idx]
        out[rows] = _decode(
            q[rows], k_cache, v_cache, block_tables[idx], context_lens.long()[idx], scale
        ).to(q.dtype)
    for i in range(len(lens)):
        a, b = cu[i], cu[i + 1]
        if b - a > 1:
            out[a:b] = _prefill(q[a:b], k_cache, v_cache, block_tables[i], lens[i], scale)
    return out
