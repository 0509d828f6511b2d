"""Paged attention: the Triton kernel (interpreted on CPU) against the torch reference, and the
reference against dense causal attention."""

from __future__ import annotations

import pytest
import torch

from fieldline.kernels.kv_cache import write_kv_ref
from fieldline.kernels.paged_attention import paged_attention, paged_attention_ref
from tests.kernels.checks import BF16, assert_close

BLOCK = 16
CPU = torch.device("cpu")


def make_batch(
    ctx_lens: list[int],
    new_lens: list[int],
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int = 0,
    device: torch.device = CPU,
) -> tuple[torch.Tensor, ...]:
    """A ragged batch whose KV lives in scattered cache blocks, written through slot mapping."""
    g = torch.Generator().manual_seed(seed)
    blocks_per = [(c + BLOCK - 1) // BLOCK for c in ctx_lens]
    num_blocks = sum(blocks_per) + 3
    order = torch.randperm(num_blocks, generator=g)
    k_cache = torch.zeros(num_blocks, BLOCK, kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    tables = torch.full((len(ctx_lens), max(blocks_per)), -1, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per):
        tables[i, :n] = order[used : used + n].to(torch.int32)
        used += n
    for i, ctx in enumerate(ctx_lens):
        k = torch.randn(ctx, kv_heads, head_dim, generator=g).to(dtype)
        v = torch.randn(ctx, kv_heads, head_dim, generator=g).to(dtype)
        pos = torch.arange(ctx)
        slots = tables[i, pos // BLOCK].long() * BLOCK + pos % BLOCK
        write_kv_ref(k, v, k_cache, v_cache, slots)
    q = torch.randn(sum(new_lens), heads, head_dim, generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(new_lens).cumsum(0).tolist()], dtype=torch.int32)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32)
    return tuple(t.to(device) for t in (q, k_cache, v_cache, tables, cu, ctx))


def run_both(*args: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale = head_dim**-0.5
    return paged_attention(*args, scale), paged_attention_ref(*args, scale)


@pytest.mark.parametrize("ratio", [1, 2, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_ragged_gqa(ratio: int, head_dim: int, device: torch.device) -> None:
    # Prompts that end inside, exactly at, and across block boundaries.
    lens = [1, 15, 16, 17, 40]
    args = make_batch(lens, lens, 4, 4 // ratio, head_dim, torch.float32, device=device)
    out, ref = run_both(*args, head_dim=head_dim)
    assert_close(out, ref, what=f"prefill gqa={ratio} d={head_dim}")


def test_chunked_prefill_onto_existing_context(device: torch.device) -> None:
    ctx = [33, 50, 18]
    new = [8, 17, 18]  # chunks of a prompt whose earlier part is already cached
    args = make_batch(ctx, new, 4, 2, 64, torch.float32, seed=1, device=device)
    out, ref = run_both(*args, head_dim=64)
    assert_close(out, ref, what="chunked prefill")


@pytest.mark.parametrize("ctx", [1, 2, 16, 17, 63, 129, 300])
def test_decode_context_lengths(ctx: int, device: torch.device) -> None:
    args = make_batch(
        [ctx, max(1, ctx // 3)], [1, 1], 8, 2, 64, torch.float32, seed=ctx, device=device
    )
    out, ref = run_both(*args, head_dim=64)
    assert_close(out, ref, what=f"decode ctx={ctx}")


def test_decode_one_batch_of_many_context_lengths(device: torch.device) -> None:
    # One decode step over 40 sequences whose context lengths spread over 1..300.
    ctxs = sorted({1, 2, 15, 16, 17, 31, 32, 33, 300, *range(3, 300, 11)})
    args = make_batch(ctxs, [1] * len(ctxs), 4, 2, 64, torch.float32, seed=7, device=device)
    out, ref = run_both(*args, head_dim=64)
    assert_close(out, ref, what=f"decode over {len(ctxs)} context lengths")


@pytest.mark.slow
@pytest.mark.parametrize(("ratio", "head_dim"), [(1, 64), (2, 128), (4, 128)])
def test_decode_full_sweep(ratio: int, head_dim: int, device: torch.device) -> None:
    # Every context length 1..300 in one decode batch (each sequence is independent); about a
    # minute per case under the interpreter.
    ctxs = list(range(1, 301))
    args = make_batch(
        ctxs, [1] * 300, 4, 4 // ratio, head_dim, torch.float32, seed=ratio, device=device
    )
    out, ref = run_both(*args, head_dim=head_dim)
    assert_close(out, ref, what=f"decode 1..300 gqa={ratio} d={head_dim}")


@pytest.mark.slow
@pytest.mark.parametrize("head_dim", [64, 128])
def test_chunked_prefill_sweep(head_dim: int, device: torch.device) -> None:
    # Chunks of every size 1..40 onto contexts that end anywhere in a block, GQA 4.
    new = list(range(1, 41))
    ctx = [n + (7 * n) % 53 for n in new]
    args = make_batch(ctx, new, 8, 2, head_dim, torch.float32, seed=head_dim, device=device)
    out, ref = run_both(*args, head_dim=head_dim)
    assert_close(out, ref, what=f"chunked prefill sweep d={head_dim}")


@pytest.mark.parametrize("dtype", [torch.float16, BF16])
def test_mixed_batch_half_precision(dtype: torch.dtype, device: torch.device) -> None:
    args = make_batch([40, 7, 120], [40, 1, 9], 4, 2, 64, dtype, seed=3, device=device)
    out, ref = run_both(*args, head_dim=64)
    assert out.dtype == dtype
    assert_close(out, ref, what=f"mixed batch {dtype}")


def test_reference_equals_dense_causal_attention() -> None:
    """The reference itself, on one contiguous sequence, against torch's SDPA."""
    lens = [45]
    q, kc, vc, tables, cu, ctx = make_batch(lens, lens, 4, 2, 64, torch.float32, seed=5)
    pos = torch.arange(45)
    slots = tables[0, pos // BLOCK].long() * BLOCK + pos % BLOCK
    k = kc.view(-1, 2, 64)[slots].repeat_interleave(2, dim=1)
    v = vc.view(-1, 2, 64)[slots].repeat_interleave(2, dim=1)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True
    ).transpose(0, 1)
    ref = paged_attention_ref(q, kc, vc, tables, cu, ctx, 64**-0.5)
    assert_close(ref, dense, what="reference vs dense")


def test_launcher_rejects_bad_inputs(device: torch.device) -> None:
    q, kc, vc, tables, cu, ctx = make_batch([5], [5], 4, 2, 64, torch.float32, device=device)
    with pytest.raises(ValueError, match="share a dtype"):
        paged_attention(q.half(), kc, vc, tables, cu, ctx, 0.1)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_attention(q[:, :3], kc, vc, tables, cu, ctx, 0.1)
    with pytest.raises(ValueError, match="int32"):
        paged_attention(q, kc, vc, tables.long(), cu, ctx, 0.1)
    with pytest.raises(ValueError, match="head_dim of q"):
        paged_attention(q[..., :32], kc, vc, tables, cu, ctx, 0.1)
    with pytest.raises(ValueError, match="num_seqs \\+ 1"):
        paged_attention(q, kc, vc, tables, cu[:1], ctx, 0.1)
    with pytest.raises(ValueError, match="contiguous"):
        paged_attention(
            q.transpose(1, 2).contiguous().transpose(1, 2), kc, vc, tables, cu, ctx, 0.1
        )
    with pytest.raises(ValueError, match="power of two"):
        paged_attention(q, kc[:, :12], vc[:, :12], tables, cu, ctx, 0.1)
    with pytest.raises(ValueError, match="one device"):
        paged_attention(q, kc, vc, tables.to("meta"), cu, ctx, 0.1)
