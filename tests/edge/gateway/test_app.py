"""The gateway over a real engine and a tiny random Llama written by transformers: the official
openai client, 32 concurrent streams against offline generate, the response cache and its
invalidation, prefetch, client disconnects, drained version swaps, errors."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from fieldline.edge.engine.config import EngineConfig
from fieldline.edge.engine.engine import LLMEngine
from fieldline.edge.engine.sequence import SamplingParams
from fieldline.edge.llm.chat_template import ChatMessage
from fieldline.shared.config import GatewaySettings, LLMSettings
from fieldline.shared.policy import Policy
from tests.support.polling import holds_within
from tests.support.tiny_llm import ThreadedGateway, write_tiny_llama

MODEL = "assistant"
LLM = LLMSettings(device="cpu", autotune=False, kv_cache_bytes=16 * 1024 * 1024)
WORDS = [
    "the",
    "press",
    "line",
    "stopped",
    "at",
    "station",
    "four",
    "temperature",
    "of",
    "the",
    "oven",
    "conveyor",
    "belt",
]
TEMPLATE = (
    "You are the maintenance assistant of plant one. The press line, the oven and the "
    "conveyor belt report alarms. Explain the alarm in one short sentence and name the "
    "station to inspect first. Alarm: {alarm}"
)
LISTED = "inspect the weld seam and report defects"


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def prompt(i: int) -> str:
    return " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 9))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(2)
    return write_tiny_llama(tmp_path_factory.mktemp("gateway") / "tiny")


@pytest.fixture(scope="module")
def gateway(checkpoint: Path) -> Iterator[ThreadedGateway]:
    g = ThreadedGateway(llm=LLM).start()
    g.load(checkpoint, MODEL, "1")
    yield g
    g.stop()


@pytest.fixture
def warmed(checkpoint: Path) -> Iterator[ThreadedGateway]:
    """A fresh gateway whose policy lists a prompt and a template; load() waits for prefetch."""
    policy = Policy(prefetch_prompts=[LISTED], prompt_templates=[TEMPLATE])
    g = ThreadedGateway(llm=LLM, policy=policy).start()
    g.load(checkpoint, MODEL, "1")
    yield g
    g.stop()


def test_openai_client_models_completions_chat_streaming_and_usage(
    gateway: ThreadedGateway,
) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{gateway.url}/v1", api_key="not-needed", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]

    c = client.completions.create(
        model=MODEL,
        prompt="the press line",
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert c.object == "text_completion" and c.choices[0].finish_reason == "length"
    assert c.usage is not None and c.usage.completion_tokens == 6
    assert c.usage.total_tokens == c.usage.prompt_tokens + 6 and c.usage.prompt_tokens > 3

    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Why did the conveyor belt stop?"},
    ]
    chat = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=8,
        temperature=0,
        seed=None,  # type: ignore[arg-type]
    )
    msg = chat.choices[0].message
    assert chat.object == "chat.completion" and msg.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage is not None and chat.usage.completion_tokens <= 8

    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [ch for ch in chunks if ch.choices]
    assert with_choices[-1].choices[0].finish_reason == chat.choices[0].finish_reason
    assert all(ch.choices[0].finish_reason is None for ch in with_choices[:-1])
    text = "".join(ch.choices[0].delta.content or "" for ch in with_choices)
    assert text == msg.content
    assert not chunks[-1].choices and chunks[-1].usage == chat.usage

    sampled = client.completions.create(
        model=MODEL, prompt="the oven", max_tokens=5, temperature=0.8, stream=True
    )
    parts = list(sampled)
    assert parts[-1].choices[0].finish_reason in ("stop", "length")


def test_32_concurrent_greedy_streams_equal_offline_generate(
    gateway: ThreadedGateway, checkpoint: Path
) -> None:
    from openai import AsyncOpenAI

    prompts = [prompt(i) for i in range(32)]
    max_tokens = 12

    async def one(client: AsyncOpenAI, p: str) -> tuple[str, str | None]:
        stream = await client.completions.create(
            model=MODEL, prompt=p, max_tokens=max_tokens, temperature=0, stream=True
        )
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def run_all() -> list[tuple[str, str | None]]:
        client = AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
        async with client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    finished_before = metric(gateway.url, "fieldline_engine_requests_finished_total")
    results = asyncio.run(run_all())
    assert metric(gateway.url, "fieldline_engine_requests_finished_total") == finished_before + 32

    offline = LLMEngine(EngineConfig(model=str(checkpoint), num_blocks=512)).generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens)
    )
    for (text, finish), out in zip(results, offline, strict=True):
        assert text == out.text
        assert finish == out.finish_reason


def test_a_repeated_deterministic_request_is_answered_from_the_cache(
    gateway: ThreadedGateway,
) -> None:
    body = {"model": MODEL, "prompt": "the oven stopped", "max_tokens": 10, "temperature": 0}
    first = httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=60).json()
    hits = metric(gateway.url, "fieldline_gateway_cache_hits_total")
    finished = metric(gateway.url, "fieldline_engine_requests_finished_total")
    tokens = metric(gateway.url, "fieldline_engine_generated_tokens_total")
    again = httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=60).json()
    streamed = httpx.post(
        f"{gateway.url}/v1/completions", json={**body, "stream": True}, timeout=60
    ).text
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    assert again["usage"] == first["usage"]
    text = "".join(
        json.loads(line[6:])["choices"][0]["text"]
        for line in streamed.splitlines()
        if line.startswith("data: {")
    )
    assert text == first["choices"][0]["text"]
    assert metric(gateway.url, "fieldline_gateway_cache_hits_total") == hits + 2
    # the engine was not asked
    assert metric(gateway.url, "fieldline_engine_requests_finished_total") == finished
    assert metric(gateway.url, "fieldline_engine_generated_tokens_total") == tokens

    # sampling without a seed is never cached; with a seed it is
    misses = metric(gateway.url, "fieldline_gateway_cache_misses_total")
    for _ in range(2):
        httpx.post(f"{gateway.url}/v1/completions", json={**body, "temperature": 0.9}, timeout=60)
    assert metric(gateway.url, "fieldline_gateway_cache_misses_total") == misses
    assert metric(gateway.url, "fieldline_engine_requests_finished_total") == finished + 2
    seeded = {**body, "temperature": 0.9, "seed": 7}
    a = httpx.post(f"{gateway.url}/v1/completions", json=seeded, timeout=60).json()
    b = httpx.post(f"{gateway.url}/v1/completions", json=seeded, timeout=60).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert metric(gateway.url, "fieldline_gateway_cache_hits_total") == hits + 3


def test_listed_prompts_and_template_prefixes_are_warm_before_the_first_request(
    warmed: ThreadedGateway,
) -> None:
    gateway = warmed
    url, services = gateway.url, gateway.services
    assert services is not None and services.prefetcher.last is not None
    last = services.prefetcher.last
    assert last.prompts_warmed >= 2 and last.prefixes_warmed >= 1
    assert metric(url, "fieldline_gateway_cache_prefetches_total") >= 2

    hits = metric(url, "fieldline_gateway_cache_hits_total")
    finished = metric(url, "fieldline_engine_requests_finished_total")
    chat = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": LISTED}], "temperature": 0},
        timeout=60,
    )
    done = httpx.post(
        f"{url}/v1/completions",
        json={"model": MODEL, "prompt": LISTED, "temperature": 0},
        timeout=60,
    )
    assert chat.status_code == done.status_code == 200
    assert metric(url, "fieldline_gateway_cache_hits_total") == hits + 2
    assert metric(url, "fieldline_engine_requests_finished_total") == finished

    filled = TEMPLATE.format(alarm="E42 oven over temperature")
    served = services.llm.current
    assert served is not None
    ids = served.encode(filled)
    warm = gateway.call(served.engine.cached_prefix_tokens(ids))
    assert warm >= 16 * 4  # several full blocks of the template are in the prefix cache
    hits_before = metric(url, "fieldline_engine_prefix_cache_hits_total")
    r = httpx.post(
        f"{url}/v1/completions",
        json={"model": MODEL, "prompt": filled, "max_tokens": 2, "temperature": 0.5},
        timeout=60,
    )
    assert r.status_code == 200
    assert metric(url, "fieldline_engine_prefix_cache_hits_total") - hits_before >= warm

    # the same holds for a chat turn that starts with the template
    chat_ids = served.chat_ids([ChatMessage("user", TEMPLATE.format(alarm="E7 belt slip"))])
    assert gateway.call(served.engine.cached_prefix_tokens(chat_ids)) >= 16 * 4


def test_hot_requests_are_warmed_again_after_they_leave_the_cache(
    gateway: ThreadedGateway,
) -> None:
    body = {"model": MODEL, "prompt": "the conveyor belt moves", "max_tokens": 6, "temperature": 0}
    for _ in range(3):
        assert httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=60).status_code == 200
    services = gateway.services
    assert services is not None
    services.cache.clear()
    report = gateway.call(services.prefetcher.run_once())
    assert report is not None and report.prompts_warmed >= 1
    hits = metric(gateway.url, "fieldline_gateway_cache_hits_total")
    finished = metric(gateway.url, "fieldline_engine_requests_finished_total")
    httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=60)
    assert metric(gateway.url, "fieldline_gateway_cache_hits_total") == hits + 1
    assert metric(gateway.url, "fieldline_engine_requests_finished_total") == finished


def test_client_disconnect_mid_stream_frees_its_kv_blocks(gateway: ThreadedGateway) -> None:
    url = gateway.url
    usage_before = metric(url, "fieldline_engine_kv_usage_ratio")
    tokens_before = metric(url, "fieldline_engine_generated_tokens_total")
    disconnects = metric(url, "fieldline_gateway_client_disconnects_total")
    body = {
        "model": MODEL,
        "prompt": prompt(3) * 8,
        "max_tokens": 900,
        "temperature": 0.7,
        "stream": True,
        "ignore_eos": True,
    }
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", f"{url}/v1/completions", json=body) as resp,
    ):
        assert resp.status_code == 200
        lines = resp.iter_lines()
        got = [line for line, _ in zip(lines, range(6), strict=False) if line.startswith("data:")]
        assert got
        assert metric(url, "fieldline_engine_running") == 1
        assert metric(url, "fieldline_engine_kv_usage_ratio") > usage_before
    # the connection is closed: the engine aborts the request at its next step
    holds_within(
        lambda: (
            metric(url, "fieldline_engine_running") == 0
            and metric(url, "fieldline_engine_kv_usage_ratio") == usage_before
        ),
        20,
        poll_s=0.05,
    )
    assert metric(url, "fieldline_engine_running") == 0
    assert metric(url, "fieldline_engine_kv_usage_ratio") == usage_before
    assert metric(url, "fieldline_engine_generated_tokens_total") - tokens_before < 900
    assert metric(url, "fieldline_gateway_client_disconnects_total") == disconnects + 1


def test_a_plain_request_whose_client_leaves_is_aborted(gateway: ThreadedGateway) -> None:
    url = gateway.url
    body = {"model": MODEL, "prompt": "the oven", "max_tokens": 900, "ignore_eos": True}
    tokens_before = metric(url, "fieldline_engine_generated_tokens_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=0.3)
    holds_within(lambda: metric(url, "fieldline_engine_running") == 0, 20, poll_s=0.05)
    assert metric(url, "fieldline_engine_running") == 0
    assert metric(url, "fieldline_engine_generated_tokens_total") - tokens_before < 900


def test_stop_strings_cut_the_text_in_answers_and_streams(gateway: ThreadedGateway) -> None:
    body = {
        "model": MODEL,
        "prompt": "the press",
        "max_tokens": 20,
        "temperature": 0,
        "ignore_eos": True,
    }
    full = httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=60).json()
    text = full["choices"][0]["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert len(stop) == 2
    cut = httpx.post(f"{gateway.url}/v1/completions", json={**body, "stop": [stop]}, timeout=60)
    choice = cut.json()["choices"][0]
    assert choice["text"] == text[: text.index(stop)] and choice["finish_reason"] == "stop"
    streamed = httpx.post(
        f"{gateway.url}/v1/completions",
        json={**body, "stop": stop, "stream": True, "max_tokens": 21},
        timeout=60,
    ).text
    chunks = [json.loads(x[6:]) for x in streamed.splitlines() if x.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == text[: text.index(stop)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_bad_requests_get_openai_shaped_errors(gateway: ThreadedGateway) -> None:
    from openai import BadRequestError, NotFoundError, OpenAI

    client = OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(NotFoundError) as nf:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert "assistant" in str(nf.value)
    url = f"{gateway.url}/v1/chat/completions"
    cases = [
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2}, "n must be 1"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 3},
            "temperature",
        ),
        ({"model": MODEL, "messages": [{"role": "pilot", "content": "x"}]}, "role"),
        ({"model": MODEL, "prompt": "x"}, "messages"),
    ]
    for body, words in cases:
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == 400, body
        err = r.json()["error"]
        assert words in err["message"] and err["type"] == "invalid_request_error"
    assert httpx.post(url, content=b"{not json", timeout=30).status_code == 400
    huge = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
    r = httpx.post(url, json=huge, timeout=30)
    assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"]
    too_long = " ".join(WORDS * 200)
    for stream in (False, True):
        with pytest.raises(BadRequestError, match="max_model_len"):
            client.completions.create(model=MODEL, prompt=too_long, max_tokens=4, stream=stream)
        with pytest.raises(NotFoundError):
            client.completions.create(model="gpt-4", prompt="hi", stream=stream)
    # refused requests hold no lease on the model (a version swap would wait for them)
    assert gateway.services is not None and gateway.services.llm.current is not None
    assert gateway.services.llm.current.inflight == 0


def test_a_new_version_drains_streams_in_flight_and_invalidates_the_cache(
    checkpoint: Path,
) -> None:
    # hot_top_n=0: no re-warming of hot requests after the switch, so the miss is visible
    g = ThreadedGateway(GatewaySettings(port=0, hot_top_n=0), llm=LLM).start()
    try:
        g.load(checkpoint, MODEL, "1")
        url = g.url
        body = {"model": MODEL, "prompt": "the oven", "max_tokens": 8, "temperature": 0}
        first = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        assert first["system_fingerprint"] == f"{MODEL}@1"

        long_chunks: list[dict] = []
        started = threading.Event()

        def long_stream() -> None:
            long_body = {**body, "max_tokens": 300, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=long_body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        long_chunks.append(json.loads(line[6:]))
                        started.set()

        t = threading.Thread(target=long_stream)
        t.start()
        assert started.wait(30)
        g.load(checkpoint, MODEL, "2")  # loads, switches, drains v1 in the background
        hits = metric(url, "fieldline_gateway_cache_hits_total")
        misses = metric(url, "fieldline_gateway_cache_misses_total")
        second = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        assert second["system_fingerprint"] == f"{MODEL}@2"
        assert second["choices"][0]["text"] == first["choices"][0]["text"]  # same weights
        assert metric(url, "fieldline_gateway_cache_hits_total") == hits
        assert metric(url, "fieldline_gateway_cache_misses_total") == misses + 1
        assert metric(url, "fieldline_gateway_cache_invalidations_total") == 2  # v1, then v2
        t.join(120)
        assert long_chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert {c["system_fingerprint"] for c in long_chunks} == {f"{MODEL}@1"}
        assert g.services is not None
        services = g.services
        holds_within(lambda: services.llm.health().retiring == 0, 10, poll_s=0.05)
        assert g.services.llm.health().retiring == 0
    finally:
        g.stop()


def test_api_key_health_and_no_model(checkpoint: Path) -> None:
    g = ThreadedGateway(GatewaySettings(port=0, api_key="s3cret"), llm=LLM).start()
    try:
        url = g.url
        assert httpx.get(f"{url}/v1/models").status_code == 401
        wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "API key" in wrong.json()["error"]["message"]
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.get(f"{url}/v1/models", headers=auth).json() == {"object": "list", "data": []}
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["llm"]["state"] == "none"
        assert health.json()["gateway"]["listening"] == g.server.port  # type: ignore[union-attr]
        assert health.json()["gateway"]["cache"]["entries"] == 0
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(f"{url}/v1/chat/completions", json=chat, headers=auth)
        assert r.status_code == 503 and "no LLM" in r.json()["error"]["message"]
        broken = checkpoint.parent / "broken"
        broken.mkdir(exist_ok=True)
        (broken / "config.json").write_text('{"model_type": "gpt2"}')
        g.load(broken, MODEL, "0")
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["llm"]["state"] == "failed"
        assert "gpt2" in health.json()["detail"]
        assert g.services is not None
        # what a rollout's health gate reads: the version that did not load, and why
        failed = g.services.llm.model_health()[MODEL]
        assert (failed.version, failed.kind, failed.loaded) == ("0", "llm", False)
        assert failed.error is not None and "gpt2" in failed.error
        g.load(checkpoint, MODEL, "1")
        assert httpx.get(f"{url}/health").status_code == 200
        r = httpx.post(f"{url}/v1/chat/completions", json={**chat, "max_tokens": 2}, headers=auth)
        assert r.status_code == 200
        served = g.services.llm.model_health()[MODEL]
        assert (served.version, served.loaded, served.serving, served.error) == (
            "1",
            True,
            True,
            None,
        )
        assert served.window_requests == 1 and served.window_errors == 0
        assert served.p95_latency_ms is not None and served.p95_latency_ms > 0
        g.call(g.services.llm.deactivate())
        assert httpx.get(f"{url}/health").status_code == 503
    finally:
        g.stop()


def test_a_port_that_cannot_be_bound_is_reported_in_health() -> None:
    first = ThreadedGateway(llm=LLM).start()
    try:
        assert first.server is not None
        taken = GatewaySettings(port=first.server.port or 0)
        second = ThreadedGateway(taken, llm=LLM).start()
        try:
            health = second.state.health()
            assert health.listening is None
            assert health.error is not None and "cannot listen" in health.error
        finally:
            second.stop()
    finally:
        first.stop()
