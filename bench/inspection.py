"""Inspection benchmark: fp32 vs int8 and batch 1 vs micro-batched (8) on the demo classifier,
then fp32 vs int8 on real-sized models: a YOLOv8n-shaped detector at 640x640 and a ResNet-18 at
224x224 (bench/_reference_models.py, built in torch from their definitions, nothing downloaded).

Trains the demo classifier (a few seconds), quantizes it (static QDQ, per-channel), then measures
(1) raw ONNX Runtime sessions at batch 1 and 8, fp32 and int8, interleaved in rounds so both
see the same machine load, and (2) the InspectionRuntime end to end (PNG decode, pre-processing,
micro-batching, post-processing) with concurrent clients, max_batch 1 vs 8.
(3) The detector (head fitted for seconds to painted defects) and ResNet-18 are exported to ONNX,
quantized the same way with calibration frames, and timed like (1); pre-processing (PNG decode,
letterbox, normalize) and post-processing (box decode, NMS; softmax) are timed apart, and the
detector's boxes of fp32 and int8 are compared on frames neither saw (IoU >= 0.5, same label).
Prints one JSON object per line on stdout (DESIGN.md, Benchmark output); logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
import onnxruntime as ort
from _reference_models import ResNet18, YoloV8n, calibrate_batchnorm, fit_head
from prometheus_client import CollectorRegistry

from fieldline.cli.harness.classifier import (
    INPUT_NAME,
    export_onnx,
    make_frame,
    train_classifier,
)
from fieldline.cli.harness.locators import LABELS as LOCATOR_LABELS
from fieldline.cli.harness.locators import PaintedDefect, paint_frame
from fieldline.cloud.artifacts.quantize import quantize_onnx
from fieldline.edge.inspection.detect import detect_boxes, iou
from fieldline.edge.inspection.preprocess import Box, postprocess_output, preprocess_frame
from fieldline.edge.inspection.runtime import InspectionRuntime
from fieldline.shared.config import InspectionSettings
from fieldline.shared.logs import configure_logging
from fieldline.shared.policy import InspectionRule, Policy, Postprocess, Preprocess

T = TypeVar("T")
BAR_INT8_B8 = 1.3
BAR_INT8_B8_DETECTOR = 1.5
BAR_BOX_AGREEMENT = 0.95
DETECTOR_SIZE = 640
FRAME_W, FRAME_H = 640, 480  # camera frames, letterboxed to DETECTOR_SIZE
RESNET_SIZE = 224
CALIBRATION_FRAMES = 16
AGREEMENT_FRAMES = 16
FIT_FRAMES = 16
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


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
        inferences = rt.health()[rule.model].inferences
    return {
        "throughput": round(len(latencies) / elapsed, 1),
        "p50_ms": pct(latencies, 50),
        "p95_ms": pct(latencies, 95),
        "requests": len(latencies),
        "mean_batch": round((len(latencies) + 16) / max(inferences, 1), 2),
    }


def emit_session_lines(
    raw: dict[tuple[str, int], dict[str, float]],
    common: dict[str, object],
    *,
    suffix: str,
    bar: float,
    int8_b8_extra: dict[str, object] | None = None,
) -> None:
    """One line per precision x batch: fp32 against fp32 batch 1, int8 against fp32 same batch."""
    for (prec, batch), r in raw.items():
        metric = f"{prec}_throughput_b{batch}{suffix}"
        base = raw[("fp32", batch)] if prec == "int8" else raw[("fp32", 1)]
        extra: dict[str, object] = {}
        if prec == "int8" and batch == 8:
            extra = {"bar": bar, "pass": r["throughput"] / base["throughput"] >= bar}
            extra.update(int8_b8_extra or {})
        emit(
            **common,
            metric=metric,
            unit="frames/s",
            value=r["throughput"],
            baseline=base["throughput"],
            speedup=round(r["throughput"] / base["throughput"], 3),
            precision=prec,
            batch=batch,
            p50_ms=r["p50_ms"],
            p95_ms=r["p95_ms"],
            calls=r["calls"],
            **extra,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=4.0, help="per session measurement")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--train-seconds", type=float, default=4.0)
    ap.add_argument("--fit-steps", type=int, default=200, help="detector head fitting steps")
    ap.add_argument("--skip-demo", action="store_true", help="only the real-sized models")
    args = ap.parse_args()
    configure_logging("warning")

    common = {
        "bench": "inspection",
        "threads": args.threads,
        "device": f"cpu {platform.processor() or platform.machine()} x{os.cpu_count()}",
        "cpu": cpu_name(),
        "onnxruntime": ort.__version__,
    }
    with tempfile.TemporaryDirectory(prefix="bench-inspection-") as tmp:
        if not args.skip_demo:
            bench_demo(args, Path(tmp), common)
        bench_detector(args, Path(tmp), common)
        bench_resnet(args, Path(tmp), common)


def cpu_name() -> str:
    """The CPU model and its int8 dot-product extensions, from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), "")
    flags = next(
        (ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []
    )
    vnni = [f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{name or platform.machine()} ({', '.join(vnni) or 'no vnni'})"


def bench_demo(args: argparse.Namespace, tmp: Path, common: dict[str, object]) -> None:
    trained = train_classifier(tmp, args.train_seconds)
    int8_path = tmp / "defect_classifier.int8.onnx"
    report = quantize_onnx(trained.onnx_path, int8_path, trained.calibration_path)
    print(f"quantized: {report.model_dump_json()}", file=sys.stderr)
    calib = np.load(trained.calibration_path)[INPUT_NAME]
    paths = {"fp32": trained.onnx_path, "int8": int8_path}
    common = {
        **common,
        "model": "demo defect classifier (CNN 1x64x64 -> 2, 3 conv)",
        "heldout_accuracy": trained.heldout_accuracy,
        "int8_agreement": report.agreement,
        "quantization": report.method,
    }
    raw = bench_sessions(paths, calib, args.threads, args.seconds, args.rounds)
    emit_session_lines(raw, common, suffix="", bar=BAR_INT8_B8)
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
                unit="frames/s",
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


def painted_frames(
    n: int, rng: np.random.Generator
) -> tuple[list[bytes], list[list[PaintedDefect]]]:
    """Camera frames (PNG, FRAME_W x FRAME_H) with 1-3 defects of 24-120 px at random places."""
    frames, truths = [], []
    for _ in range(n):
        defects = []
        for _ in range(int(rng.integers(1, 4))):
            w, h = (int(v) for v in rng.integers(24, 120, 2))
            x1, y1 = int(rng.integers(0, FRAME_W - w)), int(rng.integers(0, FRAME_H - h))
            label = LOCATOR_LABELS[int(rng.integers(0, 2))]
            defects.append(PaintedDefect(label, x1, y1, x1 + w, y1 + h))
        frames.append(paint_frame(FRAME_W, FRAME_H, defects))
        truths.append(defects)
    return frames, truths


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    t = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t) * 1e3


def box_agreement(a: list[list[Box]], b: list[list[Box]]) -> tuple[float, int]:
    """Share of the boxes in `a` that `b` has too (same label, IoU >= 0.5), and how many."""
    matched = total = 0
    for boxes_a, boxes_b in zip(a, b, strict=True):
        for box in boxes_a:
            total += 1
            same = [o for o in boxes_b if o.label == box.label]
            if same:
                ious = iou(
                    np.array([[box.x1, box.y1, box.x2, box.y2]]),
                    np.array([[o.x1, o.y1, o.x2, o.y2] for o in same]),
                )
                matched += bool(ious.max() >= 0.5)
    return (matched / total if total else 1.0), total


def agreement_fields(boxes: dict[str, list[list[Box]]], conf: float) -> dict[str, object]:
    """fp32 vs int8 boxes at or above `conf`: the share each finds of the other's, the lower."""
    kept = {p: [[b for b in frame if b.score >= conf] for frame in v] for p, v in boxes.items()}
    fp32_found, n_fp32 = box_agreement(kept["fp32"], kept["int8"])
    int8_found, n_int8 = box_agreement(kept["int8"], kept["fp32"])
    return {
        "box_agreement": round(min(fp32_found, int8_found), 4),
        "box_agreement_conf": conf,
        "fp32_boxes_found_by_int8": round(fp32_found, 4),
        "int8_boxes_found_by_fp32": round(int8_found, 4),
        "fp32_boxes": n_fp32,
        "int8_boxes": n_int8,
    }


def float_head(path: Path) -> list[str]:
    """Names of the head's last convolutions and every node after them (DFL, box decode,
    sigmoid, concat), which stay float.

    The output concatenates pixel coordinates (0-640) with probabilities (0-1): one int8 scale
    for both rounds every probability to 0. The last convolutions make the class logits that
    decide which boxes pass the threshold, and cost ~1% of the model's time.
    """
    graph = onnx.load(str(path), load_external_data=False).graph
    heads = {
        out
        for node in graph.node
        if node.op_type == "Conv" and re.search(r"/detect/cv[23]\.\d/cv[23]\.\d\.2/", node.name)
        for out in node.output
    }
    tainted, names = set(heads), []
    for node in graph.node:  # ONNX graphs are stored in topological order
        if tainted.intersection(node.output):
            names.append(node.name)  # one of the last convolutions
        elif tainted.intersection(node.input):
            tainted.update(node.output)
            names.append(node.name)
    return names


def bench_detector(args: argparse.Namespace, tmp: Path, common: dict[str, object]) -> None:
    """YOLOv8n-shaped detector at 640x640: fp32 vs int8 throughput, pre/post apart, box agreement."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(5)
    pre = Preprocess(resize=(DETECTOR_SIZE, DETECTOR_SIZE), resize_mode="letterbox")
    labels = [*LOCATOR_LABELS, *(f"class{i}" for i in range(2, 80))]
    post = Postprocess(mode="detect", labels=labels, defect_labels=LOCATOR_LABELS, threshold=0.25)
    model = YoloV8n(nc=80)
    fit_png, fit_truth = painted_frames(FIT_FRAMES, rng)
    fit_x = np.stack([preprocess_frame(f, pre)[0] for f in fit_png])
    fit_boxes = []
    for png, truth in zip(fit_png, fit_truth, strict=True):
        geo = preprocess_frame(png, pre)[1]
        assert geo is not None
        fit_boxes.append(
            np.array(
                [
                    [
                        LOCATOR_LABELS.index(d.label),
                        d.x1 * geo.scale_x + geo.pad_x,
                        d.y1 * geo.scale_y + geo.pad_y,
                        d.x2 * geo.scale_x + geo.pad_x,
                        d.y2 * geo.scale_y + geo.pad_y,
                    ]
                    for d in truth
                ],
                np.float32,
            )
        )
    steps = fit_head(model, fit_x, fit_boxes, args.fit_steps)
    fp32_path = tmp / "yolov8n.onnx"
    export_onnx(model, fp32_path, (DETECTOR_SIZE, DETECTOR_SIZE), channels=3)
    calib_png, _ = painted_frames(CALIBRATION_FRAMES, rng)
    calib = np.stack([preprocess_frame(f, pre)[0] for f in calib_png])
    calib_path = tmp / "yolov8n.calibration.npz"
    np.savez(calib_path, **{INPUT_NAME: calib})
    int8_path = tmp / "yolov8n.int8.onnx"
    report = quantize_onnx(
        fp32_path, int8_path, calib_path, activations="uint8", exclude_nodes=float_head(fp32_path)
    )
    print(f"quantized detector: {report.model_dump_json()}", file=sys.stderr)
    paths = {"fp32": fp32_path, "int8": int8_path}

    # frames neither fitting nor calibration saw
    eval_png, eval_truth = painted_frames(AGREEMENT_FRAMES, rng)
    inputs, pre_ms = [], []
    for png in eval_png:
        (sample, geo), ms = timed(lambda png=png: preprocess_frame(png, pre))
        inputs.append((sample, geo))
        pre_ms.append(ms)
    boxes: dict[str, list[list[Box]]] = {}
    post_ms: list[float] = []
    for prec, path in paths.items():
        sess = session(path, args.threads)
        boxes[prec] = []
        for sample, geo in inputs:
            out = sess.run(None, {INPUT_NAME: sample[None]})[0][0]
            found, ms = timed(lambda out=out, geo=geo: detect_boxes(out, post, geo))
            boxes[prec].append(found)
            post_ms.append(ms)
    truth_boxes = [
        [Box(d.label, 1.0, d.x1, d.y1, d.x2, d.y2) for d in truth] for truth in eval_truth
    ]
    recall, n_truth = box_agreement(truth_boxes, boxes["fp32"])
    # the fp32 boxes that are a painted defect: does int8 find those?
    true_fp32 = [
        [b for b in frame if box_agreement([[b]], [truth])[0] == 1.0]
        for frame, truth in zip(boxes["fp32"], truth_boxes, strict=True)
    ]
    true_found, n_true = box_agreement(true_fp32, boxes["int8"])
    agreement = agreement_fields(boxes, post.threshold)
    # a stricter confidence (greedy NMS over the boxes above it keeps the same ones)
    agreement_50 = agreement_fields(boxes, 0.5)
    detector_common = {
        **common,
        "model": "YOLOv8n-shaped detector (yolov8.yaml scale n, 80 classes, 3.16M params), "
        f"3x{DETECTOR_SIZE}x{DETECTOR_SIZE} -> [84, 8400]",
        "weights": f"random backbone and neck, BatchNorm statistics and head's last convs fitted "
        f"to painted defects ({steps} Adam steps on {FIT_FRAMES} frames)",
        "quantization": f"{report.method}, {report.activation_type} activations",
        "calibration_frames": CALIBRATION_FRAMES,
        "preprocess_ms_per_frame": pct(pre_ms, 50),
        "preprocess": f"PNG {FRAME_W}x{FRAME_H} decode, letterbox, normalize",
        "postprocess_ms_per_frame": pct(post_ms, 50),
        "postprocess": f"decode, conf {post.threshold}, class-aware NMS iou {post.iou_threshold}",
    }
    raw = bench_sessions(paths, calib, args.threads, args.seconds, args.rounds)
    emit_session_lines(
        raw,
        detector_common,
        suffix="_detector",
        bar=BAR_INT8_B8_DETECTOR,
        int8_b8_extra={
            **agreement,
            "box_agreement_bar": BAR_BOX_AGREEMENT,
            "box_agreement_pass": agreement["box_agreement"] >= BAR_BOX_AGREEMENT,
            **{f"{k}_conf50": v for k, v in agreement_50.items()},
            "agreement_frames": AGREEMENT_FRAMES,
            "fp32_recall_of_painted": round(recall, 4),
            "fp32_true_boxes": n_true,
            "fp32_true_boxes_found_by_int8": round(true_found, 4),
            "painted_boxes": n_truth,
        },
    )


def bench_resnet(args: argparse.Namespace, tmp: Path, common: dict[str, object]) -> None:
    """ResNet-18 at 224x224: fp32 vs int8 throughput, pre/post apart, top-1 agreement."""
    rng = np.random.default_rng(6)
    pre = Preprocess(resize=(RESNET_SIZE, RESNET_SIZE), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    post = Postprocess(labels=[f"class{i}" for i in range(1000)], defect_labels=["class1"])
    pngs, _ = painted_frames(CALIBRATION_FRAMES + AGREEMENT_FRAMES, rng)
    x = [timed(lambda png=png: preprocess_frame(png, pre)[0]) for png in pngs]
    calib = np.stack([s for s, _ in x])
    import torch

    torch.manual_seed(0)
    model = ResNet18()
    calibrate_batchnorm(model, torch.from_numpy(calib))
    fp32_path = tmp / "resnet18.onnx"
    export_onnx(model, fp32_path, (RESNET_SIZE, RESNET_SIZE), channels=3)
    calib_path = tmp / "resnet18.calibration.npz"
    np.savez(calib_path, **{INPUT_NAME: calib[:CALIBRATION_FRAMES]})
    int8_path = tmp / "resnet18.int8.onnx"
    report = quantize_onnx(fp32_path, int8_path, calib_path, activations="uint8")
    print(f"quantized resnet18: {report.model_dump_json()}", file=sys.stderr)
    sess = session(fp32_path, args.threads)
    outs = sess.run(None, {INPUT_NAME: calib[:1]})[0]
    _, post_ms = timed(lambda: postprocess_output(outs[0], post))
    resnet_common = {
        **common,
        "model": f"ResNet-18 (11.7M params, random weights, BatchNorm statistics of the frames), "
        f"3x{RESNET_SIZE}x{RESNET_SIZE} -> 1000",
        "quantization": f"{report.method}, {report.activation_type} activations",
        "int8_top1_agreement": report.agreement,
        "calibration_frames": CALIBRATION_FRAMES,
        "preprocess_ms_per_frame": pct([ms for _, ms in x], 50),
        "preprocess": f"PNG {FRAME_W}x{FRAME_H} decode, resize, ImageNet normalize",
        "postprocess_ms_per_frame": round(post_ms, 4),
        "postprocess": "softmax over 1000, label",
    }
    raw = bench_sessions(
        {"fp32": fp32_path, "int8": int8_path}, calib, args.threads, args.seconds, args.rounds
    )
    emit_session_lines(raw, resnet_common, suffix="_resnet18", bar=BAR_INT8_B8)


if __name__ == "__main__":
    main()
