"""Paged attention over a flattened variable-length batch: the Triton kernel and its torch reference.

One call covers prefill, chunked prefill and decode: sequence i owns query rows
cu_seqlens_q[i]:cu_seqlens_q[i+1], its new tokens sit at the last positions of its
context_lens[i] tokens (already written to the cache) and attend causally.
"""

from __future__ import annotations

import torch

from fieldline.kernels import check_devices
from fieldline.kernels.triton_compat import tl, triton


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


@triton.jit
def _paged_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    cu_q_ptr,
    ctx_lens_ptr,
    scale,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_ot,
    stride_oh,
    stride_bt,
    GROUP: tl.constexpr,  # num_heads // num_kv_heads
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    CACHE_BLOCK: tl.constexpr,  # the KV cache's block size, also the KV tile
    BLOCK_M: tl.constexpr,  # query rows per program
    PRECISION: tl.constexpr,  # "ieee" for fp32 (exact parity), "tf32" otherwise (ignored for halves)
):
    # Grid: (sequence, head, query block). Each program walks its sequence's KV blocks through
    # the block table with an online softmax, up to the last position its queries may see.
    seq = tl.program_id(0)
    head = tl.program_id(1)
    mblk = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + seq)
    n_new = tl.load(cu_q_ptr + seq + 1) - q_start
    if mblk * BLOCK_M >= n_new:
        return
    ctx = tl.load(ctx_lens_ptr + seq)
    kv_head = head // GROUP

    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows within the sequence
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < n_new
    d_valid = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=m_valid[:, None] & d_valid[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    q_pos = ctx - n_new + offs_m  # absolute positions of these queries

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    kv_end = tl.minimum(ctx, ctx - n_new + (mblk + 1) * BLOCK_M)
    offs_s = tl.arange(0, CACHE_BLOCK)
    for start in range(0, kv_end, CACHE_BLOCK):
        block = tl.load(block_tables_ptr + seq * stride_bt + start // CACHE_BLOCK)
        offs_n = start + offs_s  # absolute KV positions of this tile
        kv_off = (
            block * stride_kb + offs_s[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :]
        )
        kv_mask = (offs_n < ctx)[:, None] & d_valid[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)  # [CACHE_BLOCK, BLOCK_D]
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_M, CACHE_BLOCK]
        visible = (offs_n[None, :] <= q_pos[:, None]) & (offs_n[None, :] < ctx)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows with nothing visible yet keep m = -inf; guard the exp so they stay zero, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(
        out_ptr + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=m_valid[:, None] & d_valid[None, :],
    )


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Triton launcher for paged_attention_ref's contract; checks shapes, strides and dtypes."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "q must be [tokens, heads, head_dim] and the caches [blocks, block_size, kv_heads, head_dim]"
        )
    _, num_heads, head_dim = q.shape
    _, cache_block, num_kv_heads, cache_dim = k_cache.shape
    if cache_dim != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) and of the cache ({cache_dim}) differ")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if q.dtype != k_cache.dtype or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"q ({q.dtype}) and the caches ({k_cache.dtype}) must share a dtype")
    if cache_block < 16 or cache_block & (cache_block - 1):
        raise ValueError(f"the cache block size must be a power of two >= 16, got {cache_block}")
    if q.stride(-1) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("q's last dim and the caches must be contiguous")
    num_seqs = context_lens.shape[0]
    if cu_seqlens_q.shape != (num_seqs + 1,) or block_tables.shape[0] != num_seqs:
        raise ValueError(
            "cu_seqlens_q must be [num_seqs + 1] and block_tables [num_seqs, max_blocks]"
        )
    for t in (block_tables, cu_seqlens_q, context_lens):
        if t.dtype != torch.int32:
            raise ValueError("block_tables, cu_seqlens_q and context_lens must be int32")
    check_devices(
        _paged_attention_kernel,
        "paged_attention",
        q,
        k_cache,
        v_cache,
        block_tables,
        cu_seqlens_q,
        context_lens,
    )
    out = torch.empty_like(q)
    if q.shape[0] == 0:
        return out
    max_new = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item())
    block_m = 16 if max_new <= 16 else 32
    grid = (num_seqs, num_heads, triton.cdiv(max_new, block_m))
    block_tables = block_tables.contiguous()
    cu_seqlens_q, context_lens = cu_seqlens_q.contiguous(), context_lens.contiguous()
    _paged_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        cu_seqlens_q,
        context_lens,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        CACHE_BLOCK=cache_block,
        BLOCK_M=block_m,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out
