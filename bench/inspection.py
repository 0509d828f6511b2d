"""Inspection benchmark: fp32 vs int8 and batch 1 vs micro-batched (8) on the demo classifier.

Trains the demo classifier (a few seconds), quantizes it (static QDQ, per-channel), then measures
(1) raw ONNX Runtime sessions at batch 1 and 8, fp32 and int8, interleaved in rounds so both
see the same machine load, and (2) the InspectionRuntime end to end (PNG decode, pre-processing,
micro-batching, post-processing) with concurrent clients, max_batch 1 vs 8.
Prints one JSON object per line on stdout (DESIGN.md, Benchmark output); logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from prometheus_client import CollectorRegistry

from fieldline.cli.harness.classifier import INPUT_NAME, make_frame, train_classifier
from fieldline.cloud.artifacts.quantize import quantize_onnx
from fieldline.edge.inspection.runtime import InspectionRuntime
from fieldline.shared.config import InspectionSettings
from fieldline.shared.logs import configure_logging
from fieldline.shared.policy import InspectionRule, Policy

BAR_INT8_B8 = 1.3


def emit(**obj: object) -> None:
    print(json.dumps(obj), flush=True)


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_for(sess: ort.InferenceSession, x: np.ndarray, seconds: float) -> list[float]:
    """Call the session on x for about `seconds`; per-call milliseconds."""
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        sess.run(None, {INPUT_NAME: x})
        times.append((time.perf_counter() - t) * 1e3)
    return times


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 4)


def bench_sessions(
    paths: dict[str, Path], calib: np.ndarray, threads: int, seconds: float, rounds: int
) -> dict[tuple[str, int], dict[str, float]]:
    """Throughput (frames/s, median over rounds) and per-call p50/p95 for each precision x batch."""
    sessions = {p: session(path, threads) for p, path in paths.items()}
    out: dict[tuple[str, int], dict[str, float]] = {}
    for batch in (1, 8):
        x = calib[:batch]
        per_round: dict[str, list[float]] = {p: [] for p in sessions}
        calls: dict[str, list[float]] = {p: [] for p in sessions}
        for sess in sessions.values():
            run_for(sess, x, 0.2)  # warm-up
        for _ in range(rounds):  # interleaved, so both precisions share the machine's noise
            for p, sess in sessions.items():
                times = run_for(sess, x, seconds / rounds)
                per_round[p].append(batch * len(times) / (sum(times) / 1e3))
                calls[p].extend(times)
        for p in sessions:
            out[(p, batch)] = {
                "throughput": round(statistics.median(per_round[p]), 1),
                "p50_ms": pct(calls[p], 50),
                "p95_ms": pct(calls[p], 95),
                "calls": len(calls[p]),
            }
    return out


def bench_runtime(
    model: Path, trained_rule: InspectionRule, max_batch: int, clients: int, seconds: float
) -> dict[str, float]:
    """Closed loop: `clients` threads each submit a frame and wait for its verdict."""
    rng = np.random.default_rng(11)
    frames = [make_frame(i % 4 == 0, rng) for i in range(64)]
    rule = trained_rule.model_copy(update={"max_batch": max_batch})
    latencies: list[float] = []
    lock = threading.Lock()
    stop = threading.Event()
    rt = InspectionRuntime(
        lambda t, b: None,
        lambda v: None,
        settings=InspectionSettings(intra_op_threads=1),
        registry=CollectorRegistry(),
    )
    with rt:
        rt.apply_policy(Policy(inspections=[rule]), {rule.model: ("bench", model)})

        def client(k: int) -> None:
            i = k
            while not stop.is_set():
                v = rt.submit(rule.name, frames[i % len(frames)]).result(timeout=30)
                with lock:
                    latencies.append(v.latency_ms)
                i += clients

        for f in frames[:16]:  # warm-up
            rt.submit(rule.name, f).result(timeout=30)
        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        inferences = rt.health()[rule.model]["inferences"]
    return {
        "throughput": round(len(latencies) / elapsed, 1),
        "p50_ms": pct(latencies, 50),
        "p95_ms": pct(latencies, 95),
        "requests": len(latencies),
        "mean_batch": round((len(latencies) + 16) / max(inferences, 1), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=4.0, help="per session measurement")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--train-seconds", type=float, default=4.0)
    args = ap.parse_args()
    configure_logging("warning")

    with tempfile.TemporaryDirectory(prefix="bench-inspection-") as tmp:
        trained = train_classifier(Path(tmp), args.train_seconds)
        int8_path = Path(tmp) / "defect_classifier.int8.onnx"
        report = quantize_onnx(trained.onnx_path, int8_path, trained.calibration_path)
        print(f"quantized: {report.model_dump_json()}", file=sys.stderr)
        calib = np.load(trained.calibration_path)[INPUT_NAME]
        paths = {"fp32": trained.onnx_path, "int8": int8_path}
        common = {
            "bench": "inspection",
            "model": "demo defect classifier (CNN 1x64x64 -> 2, 3 conv)",
            "heldout_accuracy": trained.heldout_accuracy,
            "int8_agreement": report.agreement,
            "quantization": report.method,
            "threads": args.threads,
            "device": f"cpu {platform.processor() or platform.machine()} x{os.cpu_count()}",
            "onnxruntime": ort.__version__,
        }
        raw = bench_sessions(paths, calib, args.threads, args.seconds, args.rounds)
        unit = "frames/s"
        for (prec, batch), r in raw.items():
            metric = f"{prec}_throughput_b{batch}"
            base = raw[("fp32", batch)] if prec == "int8" else raw[("fp32", 1)]
            if metric == "fp32_throughput_b1":
                base = r
            extra = {
                "bar": BAR_INT8_B8,
                "pass": r["throughput"] / base["throughput"] >= BAR_INT8_B8,
            }
            emit(
                **common,
                metric=metric,
                unit=unit,
                value=r["throughput"],
                baseline=base["throughput"],
                speedup=round(r["throughput"] / base["throughput"], 3),
                precision=prec,
                batch=batch,
                p50_ms=r["p50_ms"],
                p95_ms=r["p95_ms"],
                calls=r["calls"],
                **(extra if metric == "int8_throughput_b8" else {}),
            )
        rule = InspectionRule(
            name="bench",
            topic="bench/frames",
            model="defects",
            preprocess=trained.preprocess,
            postprocess=trained.postprocess,
            result_topic="bench/verdicts",
            max_wait_ms=2.0,
        )
        for prec, path in paths.items():
            single = bench_runtime(path, rule, 1, args.clients, args.seconds)
            batched = bench_runtime(path, rule, 8, args.clients, args.seconds)
            for name, r, base in (("b1", single, single), ("microbatched", batched, single)):
                emit(
                    **common,
                    metric=f"runtime_{prec}_throughput_{name}",
                    unit=unit,
                    value=r["throughput"],
                    baseline=base["throughput"],
                    speedup=round(r["throughput"] / base["throughput"], 3),
                    precision=prec,
                    max_batch=1 if name == "b1" else 8,
                    max_wait_ms=rule.max_wait_ms,
                    clients=args.clients,
                    p50_ms=r["p50_ms"],
                    p95_ms=r["p95_ms"],
                    requests=r["requests"],
                    mean_batch=r["mean_batch"],
                )


if __name__ == "__main__":
    main()
