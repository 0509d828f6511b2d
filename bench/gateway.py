"""Gateway benchmark: the response cache and template prefix warming, over real HTTP on loopback.

Builds the LLM services and the gateway server as edge/agent.py does. Prints one JSON object
per line on stdout (bench, metric, unit, value, baseline, speedup = baseline / value, and the
conditions), progress on stderr:
- cached_latency_p50 / _p95: latency of a repeated deterministic chat request answered from the
  response cache, against the same requests computed by the engine (uncached) in this run;
- warm_ttft_p50 / _p95: time to first streamed token of requests built on a prompt template whose
  prefix the prefetch job warmed, against requests on templates of the same length never seen
  (cold, full prefill).
Bars: cached p50 <= uncached p50 / 50; warm-template TTFT p50 <= cold p50 / 3.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import torch

from fieldline.cli.harness.tiny_llm import write_demo_llm
from fieldline.edge.gateway.app import GatewayServer
from fieldline.edge.gateway.deps import GatewayState
from fieldline.edge.llm.services import LLMChoice, LlmServices
from fieldline.shared.config import GatewaySettings, LLMSettings
from fieldline.shared.logs import configure_logging
from fieldline.shared.policy import Policy

T = TypeVar("T")
MODEL = "assistant"
WORDS = [
    "press",
    "line",
    "oven",
    "conveyor",
    "belt",
    "camera",
    "weld",
    "seam",
    "station",
    "alarm",
    "temperature",
    "pressure",
    "motor",
    "sensor",
    "valve",
    "pump",
    "operator",
    "shift",
    "part",
    "defect",
    "scratch",
    "lens",
    "light",
    "restart",
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def text(n_words: int, seed: int) -> str:
    return " ".join(WORDS[(seed * 13 + i * 7 + i * i) % len(WORDS)] for i in range(n_words))


def percentile(xs: list[float], q: float) -> float:
    ordered = sorted(xs)
    return ordered[max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))]


class LoopThread:
    """An event loop on its own thread, for the LLM services and gateway (as in the daemon)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(600)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def ttft_ms(client: httpx.Client, url: str, prompt: str) -> float:
    """Time until the first streamed text piece arrives."""
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": 4,
        "temperature": 0.7,  # sampled: never from the response cache
        "stream": True,
        "ignore_eos": True,
    }
    t0 = time.perf_counter()
    first = None
    with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter()
    assert first is not None
    return (first - t0) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--requests", type=int, default=24, help="distinct uncached requests")
    ap.add_argument("--repeats", type=int, default=5, help="cached rounds over them")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--template-words", type=int, default=300)
    ap.add_argument("--ttft-requests", type=int, default=16)
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    args = ap.parse_args()
    configure_logging("warning")  # logs to stderr: stdout carries only the JSON lines
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        model_dir = write_demo_llm(
            Path(tmp) / "model", hidden=args.hidden, layers=args.layers, heads=args.hidden // 64
        )
        template = (
            "Maintenance log of plant one. " + text(args.template_words, 0) + " Alarm: {alarm}"
        )
        policy = Policy(prompt_templates=[template])
        gateway = GatewaySettings(port=0, hot_top_n=0, prefetch_interval_s=3600)
        llm = LLMSettings(device="cpu", autotune=False, kv_cache_bytes=256 * 1024 * 1024)
        runner = LoopThread()

        async def start() -> tuple[LlmServices, GatewayServer]:
            services = LlmServices(gateway, llm, lambda: policy)
            await services.start()
            server = GatewayServer(GatewayState(settings=gateway, services=services))
            await server.start()
            await services.apply(LLMChoice(MODEL, "1", model_dir))
            return services, server

        async def stop(services: LlmServices, server: GatewayServer) -> None:
            await server.stop()
            await services.stop()

        services, server = runner.call(start())
        url = f"http://127.0.0.1:{server.port}"
        served = services.llm.current
        assert served is not None
        try:
            with httpx.Client(timeout=120) as client:
                # warm-up: first-call costs (threads, allocator) out of the figures
                for i in range(3):
                    client.post(
                        f"{url}/v1/completions",
                        json={"model": MODEL, "prompt": text(8, 900 + i), "max_tokens": 8},
                    )
                bodies = [
                    {
                        "model": MODEL,
                        "messages": [{"role": "user", "content": text(12, i)}],
                        "max_tokens": args.max_tokens,
                        "temperature": 0,
                        "ignore_eos": True,
                    }
                    for i in range(args.requests)
                ]
                log(f"uncached: {len(bodies)} requests of {args.max_tokens} tokens")
                uncached = []
                for body in bodies:
                    t0 = time.perf_counter()
                    client.post(f"{url}/v1/chat/completions", json=body).raise_for_status()
                    uncached.append((time.perf_counter() - t0) * 1000)
                log(f"cached: {args.repeats} rounds")
                hits_before = services.cache.stats().hits
                cached = []
                for _ in range(args.repeats):
                    for body in bodies:
                        t0 = time.perf_counter()
                        client.post(f"{url}/v1/chat/completions", json=body).raise_for_status()
                        cached.append((time.perf_counter() - t0) * 1000)
                assert services.cache.stats().hits - hits_before == len(cached)

                # template TTFT: cold = templates of the same length never seen; warm = the
                # policy's template after one prefetch run
                prefix_tokens = len(served.encode(template.split("{", 1)[0]))
                log(f"cold TTFT: {args.ttft_requests} unseen templates of ~{prefix_tokens} tokens")
                cold = []
                for i in range(args.ttft_requests):
                    unseen = f"Shift report {i} of plant one. " + text(args.template_words, 0)
                    cold.append(ttft_ms(client, url, f"{unseen} Alarm: E{i} {text(4, i)}"))
                # the prefetch job (it runs after every model load, then on its interval)
                report = runner.call(services.prefetcher.run_once())
                assert report is not None and report.prefixes_warmed + report.prefixes_fresh >= 1
                probe = served.encode(template.format(alarm="E0"))
                warm_tokens = runner.call(served.engine.cached_prefix_tokens(probe))
                assert warm_tokens >= prefix_tokens - 32, (warm_tokens, prefix_tokens)
                log(f"warm TTFT: {warm_tokens} template tokens in the prefix cache")
                warm = [
                    ttft_ms(client, url, template.format(alarm=f"E{i} {text(4, i)}"))
                    for i in range(args.ttft_requests)
                ]
        finally:
            runner.call(stop(services, server))
            runner.close()

    conditions = {
        "model": f"llama random h{args.hidden} l{args.layers}",
        "device": "cpu",
        "threads": args.threads,
        "transport": "http loopback, httpx keep-alive",
    }
    lines = [
        ("cached_latency_p50", percentile(cached, 0.5), percentile(uncached, 0.5), 50.0),
        ("cached_latency_p95", percentile(cached, 0.95), percentile(uncached, 0.95), None),
        ("warm_ttft_p50", percentile(warm, 0.5), percentile(cold, 0.5), 3.0),
        ("warm_ttft_p95", percentile(warm, 0.95), percentile(cold, 0.95), None),
    ]
    for metric, value, baseline, bar in lines:
        row: dict[str, Any] = {
            "bench": "gateway",
            "metric": metric,
            "unit": "ms",
            "value": round(value, 3),
            "baseline": round(baseline, 3),
            "speedup": round(baseline / value, 2),
        }
        if bar is not None:
            row["bar_speedup"] = bar
            row["bar_met"] = baseline / value >= bar
        if metric.startswith("cached"):
            row |= {
                "requests": len(uncached),
                "cached_samples": len(cached),
                "max_tokens": args.max_tokens,
                "mean_uncached_ms": round(statistics.mean(uncached), 2),
            }
        else:
            row |= {"requests": len(warm), "template_prefix_tokens": prefix_tokens}
        print(json.dumps(row | conditions), flush=True)


if __name__ == "__main__":
    main()
