"""Incremental detokenization: one request's output text, decoded a few tokens at a time.

As vLLM's incremental detokenizer: per request a prefix offset and a read offset into the
output ids; each step decodes only the window from the prefix offset (the tokens of the last
emitted piece, which give the new tokens their context: a leading space, a merged byte) and
emits what that window adds beyond the prefix text. Text ending in U+FFFD may be an incomplete
UTF-8 character: it is held back until the character completes. Work per request is O(length).
tokenizers' own DecodeStream does the same in Rust, but its work cannot be counted from Python
and it holds back without bound; hence this module.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
# Held back this many tokens, a trailing U+FFFD is forced out if the text before the last
# MAX_INCOMPLETE_TOKENS tokens is final. A UTF-8 character has at most 4 bytes and each
# non-special token carries at least one, so a character cannot span more tokens than that;
# the bound keeps a stream of invalid bytes (which decode to U+FFFD forever) O(length).
MAX_HELD_TOKENS = 8
MAX_INCOMPLETE_TOKENS = 4


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class IncrementalDetokenizer:
    """The text of one growing list of token ids; step() returns what the new ids add."""

    def __init__(self, tokenizer: Decoder, ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = ids  # the request's output ids, appended to by the engine
        self._prefix_offset = 0  # start of the context window
        self._read_offset = 0  # end of the ids already emitted
        self._prefix_text = ""  # decode(ids[prefix_offset:read_offset])
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far (joined on each call: read it once, at the end)."""
        return "".join(self._pieces)

    def step(self, *, final: bool = False) -> str:
        """The text the ids appended since the last call add; "" while it is held back.

        With `final` nothing is held back, so the emitted pieces join to decode(ids).
        """
        ids = self._ids
        if len(ids) == self._read_offset:
            return ""
        new_text = self._tokenizer.decode(ids[self._prefix_offset :])
        if new_text.endswith(REPLACEMENT_CHAR) and not final:
            return self._force(new_text)
        return self._emit(new_text, len(ids))

    def _emit(self, window_text: str, upto: int) -> str:
        piece = window_text[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, upto
        self._prefix_text = self._tokenizer.decode(self._ids[self._prefix_offset : upto])
        if piece:
            self._pieces.append(piece)
        return piece

    def _force(self, window_text: str) -> str:
        """Emit up to the last few tokens when too many are held and that text is final."""
        if len(self._ids) - self._read_offset <= MAX_HELD_TOKENS:
            return ""
        split = len(self._ids) - MAX_INCOMPLETE_TOKENS
        head = self._tokenizer.decode(self._ids[self._prefix_offset : split])
        # The later tokens did not change it: nothing after them can.
        if not window_text.startswith(head):
            return ""
        return self._emit(head, split)
