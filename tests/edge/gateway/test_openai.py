"""Streaming through the real gateway (tiny random Llamas written by transformers, tokenizers
trained here): a stream's text equals the plain answer's for the same greedy request, also
for multi-byte (CJK) output and with a stop string split across two pieces; a streamed chat
of 2,000 tokens costs decode work linear in its length."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch

from fieldline.shared.config import LLMSettings
from tests.edge.engine.conftest import CJK_CORPUS
from tests.support.tiny_llm import ThreadedGateway, write_tiny_llama

MODEL = "assistant"
LLM = LLMSettings(device="cpu", autotune=False, kv_cache_bytes=16 * 1024 * 1024)
CJK_VOCAB = 600  # mostly pieces of CJK characters: the random model writes them


def start(path: Path) -> ThreadedGateway:
    g = ThreadedGateway(llm=LLM).start()
    g.load(path, MODEL, "1")
    return g


@pytest.fixture(scope="module")
def ascii_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedGateway]:
    torch.set_num_threads(2)
    path = write_tiny_llama(tmp_path_factory.mktemp("ascii") / "tiny", max_positions=4096)
    g = start(path)
    yield g
    g.stop()


@pytest.fixture(scope="module")
def cjk_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedGateway]:
    torch.set_num_threads(2)
    path = write_tiny_llama(
        tmp_path_factory.mktemp("cjk") / "tiny",
        seed=1,
        vocab=CJK_VOCAB,
        corpus=CJK_CORPUS,
    )
    g = start(path)
    yield g
    g.stop()


def plain(g: ThreadedGateway, path: str, body: dict) -> dict:
    """The non-streamed answer, computed by the engine (the response cache is emptied first)."""
    assert g.services is not None
    g.services.cache.clear()
    r = httpx.post(f"{g.url}{path}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]  # type: ignore[no-any-return]


def streamed(g: ThreadedGateway, path: str, body: dict) -> tuple[list[str], str | None]:
    """The text pieces of the streamed answer, computed by the engine, and its finish reason."""
    assert g.services is not None
    g.services.cache.clear()
    pieces, finish = [], None
    with httpx.stream("POST", f"{g.url}{path}", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            text = choice["delta"].get("content") if "delta" in choice else choice["text"]
            if text:
                pieces.append(text)
            finish = choice["finish_reason"] or finish
    return pieces, finish


def chat(content: str, max_tokens: int) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


def test_a_streamed_chat_equals_the_plain_answer(ascii_gateway: ThreadedGateway) -> None:
    body = chat("Why did the conveyor belt stop?", 40)
    answer = plain(ascii_gateway, "/v1/chat/completions", body)
    pieces, finish = streamed(ascii_gateway, "/v1/chat/completions", body)
    assert "".join(pieces) == answer["message"]["content"] and len(pieces) > 5
    assert finish == answer["finish_reason"] == "length"


def test_multi_byte_output_streams_whole_characters(cjk_gateway: ThreadedGateway) -> None:
    for path, body in (
        ("/v1/chat/completions", chat(CJK_CORPUS[3], 60)),
        ("/v1/completions", {**chat("", 60), "prompt": CJK_CORPUS[0], "messages": None}),
    ):
        answer = plain(cjk_gateway, path, body)
        text = answer["message"]["content"] if "message" in answer else answer["text"]
        pieces, _ = streamed(cjk_gateway, path, body)
        assert "".join(pieces) == text
        assert sum("\u3040" <= ch <= "\u9fff" for ch in text) >= 10  # kana and CJK ideographs


def test_a_stop_string_split_across_two_pieces(ascii_gateway: ThreadedGateway) -> None:
    body = {**chat("", 40), "prompt": "the press line", "messages": None}
    pieces, _ = streamed(ascii_gateway, "/v1/completions", body)
    text = "".join(pieces)
    # a stop string made of the last character of one piece and the first of the next
    stop, at = next(
        (pair, i)
        for k in range(1, len(pieces))
        if text.index(pair := pieces[k - 1][-1] + pieces[k][0])
        == (i := len("".join(pieces[:k])) - 1)
    )
    cut = plain(ascii_gateway, "/v1/completions", {**body, "stop": [stop]})
    assert cut["text"] == text[:at] and cut["finish_reason"] == "stop"
    got, finish = streamed(ascii_gateway, "/v1/completions", {**body, "stop": [stop]})
    assert "".join(got) == text[:at] and finish == "stop"


def counting_decode(g: ThreadedGateway) -> tuple[dict[str, int], Callable[[], None]]:
    """Count the served tokenizer's decode calls and the tokens they decode; and an undo."""
    assert g.services is not None and g.services.llm.current is not None
    tokenizer = g.services.llm.current.engine.engine.tokenizer
    original = tokenizer.decode
    work = {"calls": 0, "tokens": 0}

    def decode(ids: list[int]) -> str:
        work["calls"] += 1
        work["tokens"] += len(ids)
        return original(ids)  # type: ignore[no-any-return]

    tokenizer.decode = decode
    return work, lambda: delattr(tokenizer, "decode")


def test_a_streamed_chat_of_2000_tokens_costs_linear_decode_work(
    ascii_gateway: ThreadedGateway,
) -> None:
    work, undo = counting_decode(ascii_gateway)
    try:
        cost = {}
        for n in (500, 2000):
            before = dict(work)
            pieces, finish = streamed(ascii_gateway, "/v1/chat/completions", chat("Shift log:", n))
            assert finish == "length" and pieces
            cost[n] = {k: work[k] - before[k] for k in work}
    finally:
        undo()
    # a full re-decode per token would decode about n^2/2 tokens: 2,000,000 for 2,000
    assert cost[2000]["tokens"] <= 12 * 2000 and cost[2000]["calls"] <= 3 * 2000
    assert cost[2000]["tokens"] / cost[500]["tokens"] < 5.0  # 4x the tokens; quadratic: 16x


def test_templates_and_tokenizers_run_off_the_event_loop(ascii_gateway: ThreadedGateway) -> None:
    assert ascii_gateway.services is not None and ascii_gateway.services.llm.current is not None
    served = ascii_gateway.services.llm.current
    tokenizer = served.engine.engine.tokenizer
    threads: set[str] = set()

    def recording(name: str) -> Callable[..., object]:
        original = getattr(tokenizer, name)

        def call(*args: object) -> object:
            threads.add(threading.current_thread().name)
            return original(*args)

        return call

    tokenizer.encode, tokenizer.decode = recording("encode"), recording("decode")
    try:
        plain(ascii_gateway, "/v1/chat/completions", chat("Is the oven hot?", 8))
        streamed(ascii_gateway, "/v1/completions", {**chat("", 8), "prompt": "the oven"})
    finally:
        del tokenizer.encode, tokenizer.decode
    assert threads and ascii_gateway.loop_thread_name not in threads
