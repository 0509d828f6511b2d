"""LLM engine benchmark on CPU against transformers' generate, both measured in this run.

Prints JSON lines (DESIGN.md, Benchmark output):
- throughput: output tokens/s of the engine vs transformers `generate` in first-come batches of
  the same maximum batch size, left-padded, each batch running to its longest member;
- kv_utilization: peak share of allocated KV slots that hold live tokens (the baseline's
  padded-cache utilization beside it);
- prefix_ttft_p50: median time to first token of requests sharing a long prefix, with prefix
  caching vs without.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_model(path: Path, *, hidden: int, layers: int, vocab: int) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        initializer_range=0.1,
    )
    Qwen2ForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)
    return path


def workload(n: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        plen = int(torch.randint(16, 257, (1,), generator=g))
        olen = int(torch.randint(16, 129, (1,), generator=g))
        out.append((torch.randint(3, vocab, (plen,), generator=g).tolist(), olen))
    return out


def run_baseline(
    path: Path, work: list[tuple[list[int], int]], batch: int
) -> tuple[float, list[list[int]], float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outputs: list[list[int]] = []
    useful = slots = 0
    t0 = time.perf_counter()
    for i in range(0, len(work), batch):
        chunk = work[i : i + batch]
        plen = max(len(p) for p, _ in chunk)
        olen = max(o for _, o in chunk)
        ids = torch.zeros((len(chunk), plen), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, (p, _) in enumerate(chunk):
            ids[j, plen - len(p) :] = torch.tensor(p)
            mask[j, plen - len(p) :] = 1
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=olen,
                min_new_tokens=olen,
                do_sample=False,
                pad_token_id=0,
            )
        for j, (p, o) in enumerate(chunk):
            outputs.append(out[j, plen : plen + o].tolist())
            useful += len(p) + o
        slots += len(chunk) * (plen + olen)
        log(f"  baseline batch {i // batch + 1}: {len(chunk)} x ({plen} + {olen})")
    elapsed = time.perf_counter() - t0
    tokens = sum(o for _, o in work)
    return tokens / elapsed, outputs, useful / slots


def run_engine(
    path: Path, work: list[tuple[list[int], int]], batch: int
) -> tuple[float, list[list[int]], float]:
    from fieldline.edge.engine.config import EngineConfig
    from fieldline.edge.engine.engine import LLMEngine
    from fieldline.edge.engine.sequence import SamplingParams

    engine = LLMEngine(
        EngineConfig(model=str(path), max_num_seqs=batch, max_num_batched_tokens=2048)
    )
    for p, o in work:
        engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True))
    bm = engine.scheduler.block_manager
    peak = 0.0
    outputs: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.output_token_ids
        used = bm.num_blocks - bm.num_free_blocks
        if used:
            live = sum(s.num_tokens for s in engine.scheduler.running)
            peak = max(peak, live / (used * bm.block_size))
    elapsed = time.perf_counter() - t0
    ordered = [
        outputs[k]
        for k in sorted(
            outputs,
            key=lambda r: int(r.rsplit("-", 1)[-1]) if r.rsplit("-", 1)[-1].isdigit() else r,
        )
    ]
    assert all(len(o) == w[1] for o, w in zip(ordered, work, strict=True)), "output lengths"
    return sum(o for _, o in work) / elapsed, ordered, peak


def prefix_ttft(path: Path, n: int, prefix_len: int, vocab: int, caching: bool) -> float:
    from fieldline.edge.engine.config import EngineConfig
    from fieldline.edge.engine.engine import LLMEngine
    from fieldline.edge.engine.sequence import SamplingParams

    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, vocab, (prefix_len,), generator=g).tolist()
    engine = LLMEngine(EngineConfig(model=str(path), enable_prefix_caching=caching, max_num_seqs=8))
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    engine.generate([[*prefix, 5]], params)  # warm: the shared prefix enters the cache
    ttfts = []
    for _ in range(n):
        t0 = time.perf_counter()
        engine.generate([prefix + torch.randint(3, vocab, (8,), generator=g).tolist()], params)
        ttfts.append(time.perf_counter() - t0)
    return statistics.median(ttfts) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a small model and 16 requests")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    from fieldline.shared.logs import configure_logging

    configure_logging("warning")
    torch.set_num_threads(2)
    hidden, layers, vocab = (256, 4, 4096) if args.quick else (512, 11, 32000)
    n = 16 if args.quick else 64
    root = (
        args.model_dir or Path(tempfile.gettempdir()) / f"fieldline-bench-qwen2-{hidden}x{layers}"
    )
    path = write_model(root, hidden=hidden, layers=layers, vocab=vocab)
    params = sum(
        t.numel()
        for t in __import__("safetensors.torch")
        .torch.load_file(str(path / "model.safetensors"))
        .values()
    )
    work = workload(n, vocab, seed=0)
    log(f"model: qwen2 {hidden}x{layers}, {params / 1e6:.1f}M params; {n} requests")
    log("baseline: transformers generate, first-come padded batches")
    base_tps, base_out, base_util = run_baseline(path, work, args.batch)
    log("engine: continuous batching")
    eng_tps, eng_out, eng_util = run_engine(path, work, args.batch)
    agree = sum(a == b for a, b in zip(eng_out, base_out, strict=True)) / n
    common = {
        "model": f"qwen2-random-{params / 1e6:.0f}M",
        "requests": n,
        "seed": 0,
        "device": "cpu",
        "dtype": "float32",
        "threads": 2,
        "max_batch": args.batch,
    }
    print(
        json.dumps(
            {
                "bench": "engine",
                "metric": "throughput",
                "unit": "tok/s",
                "value": round(eng_tps, 1),
                "baseline": round(base_tps, 1),
                "speedup": round(eng_tps / base_tps, 2),
                "greedy_agreement": round(agree, 3),
                **common,
            }
        ),
        flush=True,
    )
    print(
        json.dumps(
            {
                "bench": "engine",
                "metric": "kv_utilization",
                "unit": "fraction",
                "value": round(eng_util, 3),
                "baseline": round(base_util, 3),
                "speedup": round(eng_util / base_util, 2),
                **common,
            }
        ),
        flush=True,
    )
    prefix_len = 128 if args.quick else 512
    log(f"prefix: TTFT with a shared {prefix_len}-token prefix, caching on and off")
    on = prefix_ttft(path, 16 if args.quick else 64, prefix_len, vocab, True)
    off = prefix_ttft(path, 16 if args.quick else 64, prefix_len, vocab, False)
    print(
        json.dumps(
            {
                "bench": "engine",
                "metric": "prefix_ttft_p50",
                "unit": "ms",
                "value": round(on, 2),
                "baseline": round(off, 2),
                "speedup": round(off / on, 2),
                "prefix_tokens": prefix_len,
                **common,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
