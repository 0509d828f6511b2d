"""The demo's LLM part: push the random-weight checkpoint as an int8 LLM artifact, and once an
edge serves it, show one chat call through that edge's gateway (and its repeat from the cache)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from fieldline.cli.admin_client import AdminClient

LLM_NAME = "assistant"
LLM_VERSION = "1"
QUESTION = "why did the press line stop"
TEMPLATE = (
    "You are the maintenance assistant of plant one. Alarms come from the press line, the oven "
    "and the conveyor belt. Explain this alarm in one sentence: {alarm}"
)
EXPLAIN = (
    "The camera on {topic} saw a {label} part (score {score}). What should the operator check?"
)
CHAT_TIMEOUT_S = 30.0


def push_demo_llm(admin: AdminClient, root: Path) -> dict[str, Any]:
    """Write the tiny random checkpoint, make it int8 and push it; returns the manifest."""
    from fieldline.cli.harness.tiny_llm import write_demo_llm
    from fieldline.cli.llm_pack import pack_llm

    checkpoint = write_demo_llm(root / "llm")
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        packed = pack_llm(checkpoint, Path(tmp), quantize="int8")
        return admin.push_artifact(
            packed.tar,
            name=LLM_NAME,
            version=LLM_VERSION,
            kind="llm",
            metadata=packed.metadata,
            quantization=packed.quantization,
        )


def llm_policy_fields() -> dict[str, Any]:
    """What a line's policy adds for its LLM: the model, a prompt to warm, a template."""
    return {"llm_model": LLM_NAME, "prefetch_prompts": [QUESTION], "prompt_templates": [TEMPLATE]}


def chat_once(edge_dir: Path) -> list[str]:
    """POST one chat request to the edge's gateway, then the same again; lines for the log."""
    port = json.loads((edge_dir / "gateway.json").read_text())["port"]
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    body = {
        "model": LLM_NAME,
        "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0,
        "max_tokens": 16,
    }
    lines = []
    # one client for both calls, so the timings are the gateway's, not a new TLS context's
    with httpx.Client(timeout=CHAT_TIMEOUT_S) as client:
        for attempt in ("first", "repeat"):
            hits = _cache_hits(client, port)
            t0 = time.perf_counter()
            resp = client.post(url, json=body)
            ms = (time.perf_counter() - t0) * 1000
            resp.raise_for_status()
            cached = _cache_hits(client, port) > hits
            lines.extend(_describe(attempt, resp.json(), ms, cached, edge_dir.name))
    return lines


def _cache_hits(client: httpx.Client, port: int) -> float:
    """fieldline_gateway_cache_hits_total from the gateway's /metrics."""
    text = client.get(f"http://127.0.0.1:{port}/metrics").text
    for line in text.splitlines():
        if line.startswith("fieldline_gateway_cache_hits_total "):
            return float(line.split()[1])
    return 0.0


def _describe(attempt: str, data: dict[str, Any], ms: float, cached: bool, edge: str) -> list[str]:
    """Log lines for one chat answer."""
    if attempt != "first":
        answered = "the response cache answered" if cached else "the engine answered again"
        return [f"the same request again: {ms:.1f} ms ({answered})"]
    text = data["choices"][0]["message"]["content"].replace("\n", " ")[:60]
    return [
        f"chat via {edge}'s gateway: POST /v1/chat/completions "
        f"{{user: {QUESTION!r}}} -> {text!r} ({data['usage']['completion_tokens']} tokens, "
        f"{ms:.0f} ms, model {data['system_fingerprint']})",
        "[yellow]the LLM has random weights (made at demo start): its words are noise; "
        "the point is the path: artifact, int8, autotune, gateway, cache[/yellow]",
    ]
