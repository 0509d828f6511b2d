"""BlockManager: fixed-size KV blocks, a free list, reference counts and a prefix cache.

The prefix cache keys FULL, computed blocks by a hash chain (hash of the parent block's hash
and the block's tokens). Only full blocks are shared, and they are never written again, so no
copy-on-write is needed. Freed blocks that hold a cached prefix wait in an LRU list and are
the last to be reused, least recently used first; a later prefix hit revives them.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass

from fieldline.edge.engine.sequence import Sequence

ROOT_HASH = 0  # parent hash of a sequence's first block


def hash_block(parent_hash: int, token_ids: tuple[int, ...]) -> int:
    """64-bit hash of one full block, chained to its parent's hash."""
    h = hashlib.blake2b(digest_size=8)
    h.update(parent_hash.to_bytes(8, "little", signed=False))
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little")


class Block:
    __slots__ = ("block_id", "hash", "ref_count", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set while the block is registered in the prefix cache
        self.token_ids: tuple[int, ...] = ()  # the tokens the hash stands for (collision check)


@dataclass
class BlockStats:
    num_blocks: int
    num_free_blocks: int  # clean + cached-free (both can be handed out)
    num_cached_free_blocks: int  # free but holding a reusable prefix
    prefix_cache_queries: int  # prompt tokens looked up at admission (in TOKENS)
    prefix_cache_hits: int  # of those, tokens found in the cache (in TOKENS)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        assert num_blocks >= 1 and block_size >= 1
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: deque[int] = deque(range(num_blocks))  # hold no cached prefix
        self.cached_free: OrderedDict[int, None] = OrderedDict()  # LRU first, ids of ref 0
        self.hash_to_block: dict[int, int] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # -- queries ---------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids) + len(self.cached_free)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached block ids covering seq's leading full blocks, never its last token."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent = ROOT_HASH
        # (num_tokens - 1) // block_size: the last token always stays to be computed,
        # so a token can be sampled after the step.
        for i in range((seq.num_tokens - 1) // self.block_size):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            parent = hash_block(parent, tokens)
            block_id = self.hash_to_block.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break  # a miss, or a hash collision: never share another prefix's KV
            hits.append(block_id)
        return hits

    def first_miss_hash(self, seq: Sequence, hits: list[int]) -> int | None:
        """Hash of seq's first full block after its cached prefix; None past its full blocks."""
        i = len(hits)
        if i >= (seq.num_tokens - 1) // self.block_size:
            return None
        parent = self.blocks[hits[-1]].hash if hits else ROOT_HASH
        assert parent is not None
        return hash_block(
            parent, tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
        )

    def pending_hashes(self, seq: Sequence) -> list[int]:
        """Hashes of seq's full blocks not yet computed and registered (its prefix in flight)."""
        hashes: list[int] = []
        parent = seq.block_hashes[-1] if seq.block_hashes else ROOT_HASH
        for i in range(len(seq.block_hashes), seq.num_tokens // self.block_size):
            parent = hash_block(
                parent, tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            )
            hashes.append(parent)
        return hashes

    def stats(self) -> BlockStats:
        return BlockStats(
            num_blocks=self.num_blocks,
            num_free_blocks=self.num_free_blocks,
            num_cached_free_blocks=len(self.cached_free),
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
        )

    # -- admission: can_allocate / allocate ------------------------------------------------

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether seq can be admitted with its cached prefix plus num_new_tokens computed."""
        hits = self.match_prefix(seq)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        num_cached = len(hits) * self.block_size
        needed = self.blocks_needed(num_cached + num_new_tokens) - len(hits)
        return needed + revived <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give seq its cached prefix blocks (advancing num_computed_tokens) and fresh blocks."""
        assert not seq.block_table and seq.num_computed_tokens == 0, seq
        hits = self.match_prefix(seq)
        parent = ROOT_HASH
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.cached_free[block_id]
            block.ref_count += 1
            assert block.hash is not None
            parent = block.hash
            seq.block_table.append(block_id)
            seq.block_hashes.append(parent)
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
        if self.enable_prefix_caching:
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += seq.num_cached_tokens
        self.may_append(seq, num_new_tokens)

    # -- growth: can_append / may_append ---------------------------------------------------

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens)
        return needed - len(seq.block_table) <= self.num_free_blocks

    def may_append(self, seq: Sequence, num_new_tokens: int) -> None:
        """Add blocks so positions up to num_computed_tokens + num_new_tokens - 1 have slots."""
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens)
        while len(seq.block_table) < needed:
            seq.block_table.append(self._take_free_block())

    def _take_free_block(self) -> int:
        if self.free_block_ids:
            block_id = self.free_block_ids.popleft()
        else:
            # Evict the least recently used cached prefix.
            assert self.cached_free, "out of KV blocks: call can_append/can_allocate first"
            block_id, _ = self.cached_free.popitem(last=False)
            block = self.blocks[block_id]
            assert block.hash is not None
            del self.hash_to_block[block.hash]
            block.hash, block.token_ids = None, ()
        block = self.blocks[block_id]
        assert block.ref_count == 0
        block.ref_count = 1
        return block_id

    # -- prefix registration ---------------------------------------------------------------

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register seq's newly completed full blocks (all tokens computed) in the cache."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        parent = seq.block_hashes[-1] if seq.block_hashes else ROOT_HASH
        for i in range(len(seq.block_hashes), num_full):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            parent = hash_block(parent, tokens)
            seq.block_hashes.append(parent)
            block = self.blocks[seq.block_table[i]]
            # First writer wins: a duplicate computed alongside stays private and is
            # simply freed later.
            if parent not in self.hash_to_block and block.hash is None:
                self.hash_to_block[parent] = block.block_id
                block.hash, block.token_ids = parent, tokens

    # -- release ---------------------------------------------------------------------------

    def deallocate(self, seq: Sequence) -> None:
        """Drop seq's references; blocks reaching zero go back to the free or LRU list."""
        # Tail first, so a sequence's later blocks are evicted before its earlier ones
        # (the heads of prefixes are the ones most likely to be shared).
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"double free of block {block_id}"
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    self.cached_free[block_id] = None
                else:
                    self.free_block_ids.append(block_id)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def check_invariants(self) -> None:
        """Every block is exactly one of: referenced, clean free, cached free (tests call this)."""
        free = set(self.free_block_ids)
        cached = set(self.cached_free)
        assert len(free) == len(self.free_block_ids) and not free & cached
        for block in self.blocks:
            in_free, in_cached = block.block_id in free, block.block_id in cached
            assert block.ref_count >= 0
            if block.ref_count > 0:
                assert not in_free and not in_cached, block.block_id
            else:
                assert in_free != in_cached, block.block_id
                assert in_cached == (block.hash is not None), block.block_id
            if block.hash is not None:
                assert self.hash_to_block[block.hash] == block.block_id
        assert len(self.hash_to_block) == sum(b.hash is not None for b in self.blocks)
