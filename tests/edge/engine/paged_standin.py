"""A paged stand-in for the model runner, for scheduler and engine-loop unit tests.

Its next token is a deterministic function of every token it reads back through the block
table, so a wrong block, a shared writable slot or a lost KV entry changes the output.
"""

from __future__ import annotations

from fieldline.edge.engine.scheduler import ScheduledSeq
from fieldline.edge.engine.sequence import Sequence

VOCAB = 97


def next_token(context: list[int]) -> int:
    """The stand-in model: a deterministic function of the whole context."""
    return (sum((i + 1) * t for i, t in enumerate(context)) + 7) % VOCAB


def reference(prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


class PagedStandIn:
    """Writes token ids into a paged 'KV cache' by slot and reads them back per sequence."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.kv: list[int | None] = [None] * (num_blocks * block_size)

    def slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def execute(self, batch: list[ScheduledSeq]) -> list[int | None]:
        written: dict[int, int] = {}
        for item in batch:
            seq = item.seq
            for pos in range(
                seq.num_computed_tokens, seq.num_computed_tokens + item.num_new_tokens
            ):
                slot = self.slot(seq, pos)
                assert slot not in written, f"slot {slot} written twice in one step"
                written[slot] = seq.seq_id
                self.kv[slot] = seq.token_ids[pos]
        out: list[int | None] = []
        for item in batch:
            seq = item.seq
            if not item.sample:
                out.append(None)
                continue
            context = [self.kv[self.slot(seq, p)] for p in range(seq.num_tokens)]
            assert None not in context
            out.append(next_token(context))  # type: ignore[arg-type]
        return out
