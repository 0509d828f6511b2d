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
    from fieldline.cli.demo_llm import write_demo_llm
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
    for attempt in ("first", "repeat"):
        t0 = time.perf_counter()
        resp = httpx.post(url, json=body, timeout=CHAT_TIMEOUT_S)
        ms = (time.perf_counter() - t0) * 1000
        resp.raise_for_status()
        data = resp.json()
        text = data["choices"][0]["message"]["content"].replace("\n", " ")[:60]
        usage = data["usage"]
        if attempt == "first":
            lines.append(
                f"chat via {edge_dir.name}'s gateway: POST /v1/chat/completions "
                f"{{user: {QUESTION!r}}} -> {text!r} ({usage['completion_tokens']} tokens, "
                f"{ms:.0f} ms, model {data['system_fingerprint']})"
            )
            lines.append(
                "[yellow]the LLM has random weights (made at demo start): its words are noise; "
                "the point is the path: artifact, int8, autotune, gateway, cache[/yellow]"
            )
        else:
            lines.append(f"the same request again: {ms:.1f} ms (the response cache answered)")
    return lines
