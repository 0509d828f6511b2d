"""BlockManager: allocation, reference counts, prefix hits, collision check, LRU reuse."""

from __future__ import annotations

import pytest

from fieldline.edge.engine import block_manager as bm_module
from fieldline.edge.engine.block_manager import BlockManager
from fieldline.edge.engine.sequence import SamplingParams, Sequence

BS = 4


def make_seq(seq_id: int, tokens: list[int]) -> Sequence:
    return Sequence(seq_id, tokens, SamplingParams(max_tokens=4))


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """Admit seq and pretend the model computed every token (what postprocess does)."""
    bm.allocate(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)


def test_allocate_and_free_returns_every_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    seq = make_seq(0, list(range(10)))
    assert bm.can_allocate(seq, 10)
    bm.allocate(seq, 10)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    seq.num_computed_tokens = 10
    assert bm.can_append(seq, 2)
    bm.may_append(seq, 2)  # positions 10, 11 fit the third block
    assert len(seq.block_table) == 3
    bm.may_append(seq, 3)  # position 12 needs a fourth
    assert len(seq.block_table) == 4
    bm.check_invariants()
    bm.deallocate(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == []
    bm.check_invariants()


def test_cannot_allocate_past_capacity() -> None:
    bm = BlockManager(num_blocks=2, block_size=BS, enable_prefix_caching=False)
    seq = make_seq(0, list(range(9)))
    assert not bm.can_allocate(seq, 9)
    assert bm.can_allocate(seq, 8)


def test_shared_prefix_is_hit_and_reference_counted() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq(0, list(range(10)))  # full blocks [0..3], [4..7]
    compute_all(bm, a)
    b = make_seq(1, [*range(8), 50, 51, 52])
    assert bm.match_prefix(b) == a.block_table[:2]
    bm.allocate(b, b.num_tokens - 8)
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] not in a.block_table
    for block_id in a.block_table[:2]:
        assert bm.blocks[block_id].ref_count == 2
    stats = bm.stats()
    assert stats.prefix_cache_queries == 10 + 11 and stats.prefix_cache_hits == 8
    bm.deallocate(a)
    assert all(bm.blocks[i].ref_count == 1 for i in b.block_table)
    bm.deallocate(b)
    assert bm.num_free_blocks == 16
    bm.check_invariants()


def test_whole_prompt_hit_still_leaves_the_last_token_to_compute() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    compute_all(bm, make_seq(0, list(range(8))))
    again = make_seq(1, list(range(8)))
    bm.allocate(again, 1)
    # Both blocks are cached, but only the first is reused: token 7 must be computed
    # so a token can be sampled after it.
    assert again.num_computed_tokens == 4
    assert again.num_computed_tokens < again.num_tokens


def test_prefix_caching_off_never_hits() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=False)
    compute_all(bm, make_seq(0, list(range(10))))
    b = make_seq(1, list(range(10)))
    bm.allocate(b, 10)
    assert b.num_computed_tokens == 0 and bm.stats().prefix_cache_hits == 0


def test_hash_collision_never_shares_another_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bm_module, "hash_block", lambda parent, tokens: 42)
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq(0, [1, 2, 3, 4, 5])
    compute_all(bm, a)
    assert bm.hash_to_block == {42: a.block_table[0]}
    b = make_seq(1, [9, 9, 9, 9, 5])  # same (forced) hash, different tokens
    assert bm.match_prefix(b) == []
    bm.allocate(b, 5)
    assert b.num_computed_tokens == 0 and b.block_table[0] != a.block_table[0]
    b.num_computed_tokens = 5
    bm.cache_full_blocks(b)  # the first writer keeps the hash
    assert bm.hash_to_block == {42: a.block_table[0]}
    bm.check_invariants()


def test_freed_cached_blocks_are_reused_least_recently_used_first() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    seqs = [make_seq(i, [10 * i + j for j in range(5)]) for i in range(3)]
    cached = []
    for seq in seqs:
        compute_all(bm, seq)  # one full cached block + one partial, freed in order
        cached.append(seq.block_table[0])
        bm.deallocate(seq)
    assert len(bm.cached_free) == 3 and bm.num_free_blocks == 4

    # A hit on seqs[0]'s prefix revives its block (and makes it most recently used).
    revived = make_seq(3, seqs[0].token_ids)
    bm.allocate(revived, 1)
    assert revived.block_table[0] == cached[0]
    bm.deallocate(revived)

    # Fresh blocks come from the clean free list first, then the LRU: seqs[1], seqs[2], seqs[0].
    hog = make_seq(4, list(range(100, 116)))
    bm.allocate(hog, 16)
    assert hog.block_table[1:] == [cached[1], cached[2], cached[0]]
    assert bm.hash_to_block == {}  # every cached prefix was evicted
    assert bm.match_prefix(make_seq(5, seqs[1].token_ids)) == []
    bm.deallocate(hog)
    assert bm.num_free_blocks == 4
    bm.check_invariants()


def test_deallocate_twice_is_caught() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    seq = make_seq(0, [1, 2])
    bm.allocate(seq, 2)
    table = list(seq.block_table)
    bm.deallocate(seq)
    seq.block_table = table
    with pytest.raises(AssertionError, match="double free"):
        bm.deallocate(seq)
