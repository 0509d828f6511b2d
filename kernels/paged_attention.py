"""Paged attention over a flattened variable-length batch: the Triton kernel and its torch reference.

One call covers prefill, chunked prefill and decode: sequence i owns query rows
cu_seqlens_q[i]:cu_seqlens_q[i+1], its new tokens sit at the last positions of its
context_lens[i] tokens (already written to the cache) and attend causally.
"""

from __future__ import annotations

import torch


def paged_attention_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1] int32
    context_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
) -> torch.Tensor:
    _, num_heads, head_dim = q.shape  # q: [num_tokens, num_heads, head_dim]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    for i in range(len(lens)):
        start, end, ctx = cu[i], cu[i + 1], lens[i]
        n_new = end - start
        if n_new == 0:
            continue
        n_blocks = (ctx + block_size - 1) // block_size
        blocks = block_tables[i, :n_blocks].long()
        # k, v: [ctx, num_kv_heads, head_dim] gathered from the cache through the block table
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx]
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx]
        k = k.repeat_interleave(group, dim=1).float()  # [ctx, num_heads, head_dim]
        v = v.repeat_interleave(group, dim=1).float()
        qi = q[start:end].float()  # [n_new, num_heads, head_dim]
        scores = torch.einsum("thd,chd->htc", qi, k) * scale  # [num_heads, n_new, ctx]
        q_pos = torch.arange(ctx - n_new, ctx, device=q.device)[:, None]  # [n_new, 1]
        k_pos = torch.arange(ctx, device=q.device)[None, :]  # [1, ctx]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.einsum("htc,chd->thd", probs, v).to(q.dtype)
    return out
