"""Incremental detokenization with a byte-level BPE trained here (on CJK text, so characters
split across tokens): the pieces join to the full decode, a partial character is held back,
and the decode work grows linearly with the output."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fieldline.edge.engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from fieldline.edge.engine.tokenizer import Tokenizer, load_tokenizer
from tests.edge.engine.conftest import CJK_CORPUS, CORPUS, train_tokenizer


class CountingTokenizer:
    """The real tokenizer, with its decode work counted (calls and tokens decoded)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.calls = 0
        self.tokens = 0

    def decode(self, ids: list[int]) -> str:
        self.calls += 1
        self.tokens += len(ids)
        return self.tokenizer.decode(ids)


@pytest.fixture(scope="module")
def cjk(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    directory = train_tokenizer(tmp_path_factory.mktemp("cjk"), 400, CJK_CORPUS + CORPUS)
    tokenizer = load_tokenizer(directory)
    assert tokenizer is not None
    return tokenizer


def stream(tokenizer: Tokenizer | CountingTokenizer, ids: list[int], sizes: list[int]) -> list[str]:
    """Feed `ids` to a detokenizer in steps of `sizes` tokens; the pieces it returned."""
    out: list[int] = []
    detok = IncrementalDetokenizer(tokenizer, out)
    pieces, i = [], 0
    for size in sizes:
        out.extend(ids[i : i + size])
        i += size
        pieces.append(detok.step(final=i >= len(ids)))
    assert i >= len(ids)
    assert detok.text == "".join(pieces)
    return pieces


@pytest.mark.parametrize("seed", range(20))
def test_random_ids_stream_to_the_full_decode(cjk: Tokenizer, seed: int) -> None:
    rng = random.Random(seed)
    vocab = 400
    ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 300))]
    sizes = [rng.choice((1, 1, 1, 2, 3)) for _ in range(len(ids))]
    assert "".join(stream(cjk, ids, sizes)) == cjk.decode(ids)


@pytest.mark.parametrize("text", [CJK_CORPUS[0] + CJK_CORPUS[4], "检查 the weld 焊缝 ✓ ok"])
def test_a_character_split_across_tokens_is_held_back_until_it_completes(
    cjk: Tokenizer, text: str
) -> None:
    ids = cjk.encode(text)[1:]  # no BOS
    assert any(cjk.decode([i]).endswith(REPLACEMENT_CHAR) for i in ids), "no split character"
    pieces = stream(cjk, ids, [1] * len(ids))
    assert "".join(pieces) == text
    assert not any(REPLACEMENT_CHAR in p for p in pieces)  # never a half character shown
    assert "" in pieces  # some token's bytes waited for the next token's


def test_a_run_of_invalid_bytes_is_not_held_without_bound(cjk: Tokenizer) -> None:
    lone = next(i for i in range(3, 400) if cjk.decode([i]) == REPLACEMENT_CHAR)
    ids = [lone] * 500 + cjk.encode("ok")[1:]
    counting = CountingTokenizer(cjk)
    pieces = stream(counting, ids, [1] * len(ids))
    assert "".join(pieces) == cjk.decode(ids)
    assert sum(1 for p in pieces if p) > 50  # it flowed, not one piece at the end
    assert counting.tokens < 30 * len(ids)


def decode_work(tokenizer: Tokenizer, n: int) -> CountingTokenizer:
    rng = random.Random(n)
    ids = [rng.randrange(3, 400) for _ in range(n)]
    counting = CountingTokenizer(tokenizer)
    assert "".join(stream(counting, ids, [1] * n)) == tokenizer.decode(ids)
    return counting


def test_decode_work_grows_linearly_with_the_output(cjk: Tokenizer) -> None:
    small, large = decode_work(cjk, 500), decode_work(cjk, 2000)
    # a full re-decode per token would decode n^2/2 tokens: 2,000,000 for n = 2,000
    assert large.tokens <= 12 * 2000 and large.calls <= 3 * 2000
    assert large.tokens / small.tokens < 5.0  # 4x the tokens; quadratic would be 16x


def test_context_dependent_decoders_keep_their_spaces(tmp_path: Path) -> None:
    """A Metaspace (SentencePiece-style) decoder drops the first token's leading space: the
    window's prefix gives each new token its context, so the spaces come out right."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"]))
    tokenizer = Tokenizer(tok, [], None)
    ids = tokenizer.encode("the press line stopped at station four")
    text = "the press line stopped at station four"
    assert "".join(tokenizer.decode([i]) for i in ids) != text  # token by token loses them
    pieces = stream(tokenizer, ids, [1] * len(ids))
    assert "".join(pieces) == tokenizer.decode(ids) == text
