"""INT8 quantization of ONNX artifacts with ONNX Runtime's tools, and the report that goes into
the artifact manifest: sizes, CPU latency of both models, agreement on the calibration set.

Static QDQ per-channel quantization when calibration data is given, dynamic otherwise.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
import structlog
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from pydantic import BaseModel, ConfigDict

log = structlog.get_logger(__name__)

CALIBRATION_BATCH = 16
LATENCY_WARMUP = 3
LATENCY_REPEATS = 15
LATENCY_BATCHES = (1, 8)
# One thread keeps the figures comparable across runs on a busy controller.
LATENCY_THREADS = 1
RANDOM_AGREEMENT_SAMPLES = 64
# Largest calibration set read into memory (in bytes): a controller must not be taken down by it.
MAX_CALIBRATION_BYTES = 1024 * 1024 * 1024
# Where onnxruntime.tools.symbolic_shape_infer saves a model it could not finish (relative: cwd).
SHAPE_DUMP = "sym_shape_infer_temp.onnx"

Method = Literal["static_qdq_per_channel", "dynamic"]


class QuantizationError(Exception):
    """The model or the calibration data cannot be quantized as asked."""


class QuantizationReport(BaseModel):
    """What quantization did and what it cost; stored in the int8 artifact's manifest metadata."""

    model_config = ConfigDict(extra="forbid")

    method: Method
    activation_type: str | None
    weight_type: str
    per_channel: bool
    fp32_bytes: int
    int8_bytes: int
    size_ratio: float  # int8 / fp32
    # Median milliseconds per batch on this machine's CPU, keyed by batch size ("1", "8").
    fp32_latency_ms: dict[str, float]
    int8_latency_ms: dict[str, float]
    latency_threads: int
    # Share of inputs where both models' first output has the same argmax over its last axis;
    # None when that output has a single value per sample (then see mean_abs_diff).
    agreement: float | None
    agreement_inputs: Literal["calibration", "random"]
    agreement_samples: int
    mean_abs_diff: float
    calibration_samples: int
    onnxruntime_version: str


class NpzCalibrationReader(CalibrationDataReader):
    """Feeds calibration batches from arrays keyed by model input name."""

    def __init__(self, arrays: dict[str, np.ndarray], batch: int = CALIBRATION_BATCH):
        self._arrays = arrays
        self._batch = batch
        self._iter: Iterator[dict[str, np.ndarray]] | None = None

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        n = _sample_count(self._arrays)
        for start in range(0, n, self._batch):
            yield {k: v[start : start + self._batch] for k, v in self._arrays.items()}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iter is None:
            self._iter = self._batches()
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = None


def load_calibration(path: Path, input_types: dict[str, str]) -> dict[str, np.ndarray]:
    """Read a calibration .npz: arrays keyed by input name, or one array for a one-input model."""
    if path.stat().st_size > MAX_CALIBRATION_BYTES:
        raise QuantizationError(f"calibration file {path} is larger than {MAX_CALIBRATION_BYTES}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            raw = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise QuantizationError(f"cannot read calibration file {path}: {exc}") from exc
    names = list(input_types)
    if set(raw) >= set(names):
        arrays = {k: raw[k] for k in names}
    elif len(raw) == 1 and len(names) == 1:
        arrays = {names[0]: next(iter(raw.values()))}
    else:
        raise QuantizationError(
            f"calibration file {path} holds {sorted(raw)}; the model needs {names}"
        )
    out = {k: v.astype(_np_dtype(input_types[k]), copy=False) for k, v in arrays.items()}
    _sample_count(out)  # checks the arrays agree on the sample count
    return out


def quantize_onnx(
    src: Path,
    dst: Path,
    calibration: Path | None,
    *,
    latency_threads: int = LATENCY_THREADS,
    activations: Literal["int8", "uint8"] = "int8",
    exclude_nodes: Sequence[str] = (),
) -> QuantizationReport:
    """Quantize `src` to INT8 at `dst` (written atomically) and report on the result.

    With calibration: ORT pre-processing, then static QDQ, per-channel weights (int8),
    int8 activations (or uint8: on x86 ORT's U8S8 kernels are the fast ones, see
    docs/inspection.md), MinMax calibration; `exclude_nodes` stay float (a detector's box
    decode). Without: dynamic quantization (weights int8, activations quantized at run time).
    """
    fp32 = _session(src, latency_threads)
    input_types = {i.name: i.type for i in fp32.get_inputs()}
    arrays = load_calibration(calibration, input_types) if calibration is not None else None
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quantize-") as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        out = Path(tmp) / "int8.onnx"
        _pre_process(src, prepped)
        if arrays is not None:
            method: Method = "static_qdq_per_channel"
            act_type = QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8
            activation: str | None = act_type.name
            quantize_static(
                prepped,
                out,
                NpzCalibrationReader(arrays),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=act_type,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=list(exclude_nodes),
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
        else:
            method, activation = "dynamic", None
            # uint8 weights: the ConvInteger kernels of ORT's CPU provider are built for u8.
            quantize_dynamic(prepped, out, per_channel=False, weight_type=QuantType.QUInt8)
        os.replace(out, dst)
    int8 = _session(dst, latency_threads)
    inputs = arrays if arrays is not None else _random_inputs(fp32, RANDOM_AGREEMENT_SAMPLES)
    agreement, mean_abs_diff, samples = _agreement(fp32, int8, inputs)
    report = QuantizationReport(
        method=method,
        activation_type=activation,
        weight_type=QuantType.QInt8.name if arrays is not None else QuantType.QUInt8.name,
        per_channel=arrays is not None,
        fp32_bytes=src.stat().st_size,
        int8_bytes=dst.stat().st_size,
        size_ratio=dst.stat().st_size / src.stat().st_size,
        fp32_latency_ms=_latencies(fp32, inputs),
        int8_latency_ms=_latencies(int8, inputs),
        latency_threads=latency_threads,
        agreement=agreement,
        agreement_inputs="calibration" if arrays is not None else "random",
        agreement_samples=samples,
        mean_abs_diff=mean_abs_diff,
        calibration_samples=_sample_count(arrays) if arrays is not None else 0,
        onnxruntime_version=ort.__version__,
    )
    log.info("quantized onnx model", src=str(src), dst=str(dst), **report.model_dump())
    return report


def _pre_process(src: Path, dst: Path) -> None:
    """ORT's pre-processing (shape inference, graph optimisation) before quantization.

    Symbolic shape inference gives up on some exports (YOLO's Resize on a dynamic batch axis:
    "Incomplete symbolic shape inference"); ONNX's own shape inference is enough for static
    quantization, so that case is retried without it.
    """
    started = time.time()
    try:
        quant_pre_process(src, dst, skip_symbolic_shape=False)
        return
    except Exception as exc:  # ORT raises bare Exceptions from its shape inference
        if "symbolic shape inference" not in str(exc):
            raise QuantizationError(f"ORT pre-processing failed for {src}: {exc}") from exc
        log.warning("symbolic shape inference incomplete; using onnx shapes", src=str(src))
        _remove_shape_dump(started)
    try:
        quant_pre_process(src, dst, skip_symbolic_shape=True)
    except Exception as exc:
        raise QuantizationError(f"ORT pre-processing failed for {src}: {exc}") from exc


def _remove_shape_dump(since: float) -> None:
    """ORT's symbolic shape inference, when it gives up, saves its partial model and the model's
    weights (as uuid-named files) in the working directory; remove the ones it just wrote."""
    dump = Path(SHAPE_DUMP)
    try:
        if dump.stat().st_mtime < since:
            return
        model = onnx.load(str(dump), load_external_data=False)
    except FileNotFoundError:
        return
    except Exception:  # a dump we cannot read: leave it, say so
        log.warning("cannot read onnxruntime's shape dump", path=str(dump.resolve()))
        return
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                Path(entry.value).unlink(missing_ok=True)
    dump.unlink(missing_ok=True)


def _session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own untyped errors for bad models
        raise QuantizationError(f"ONNX Runtime cannot load {path}: {exc}") from exc


def _np_dtype(ort_type: str) -> type[np.generic]:
    types: dict[str, type[np.generic]] = {
        "tensor(float)": np.float32,
        "tensor(float16)": np.float16,
        "tensor(double)": np.float64,
        "tensor(int64)": np.int64,
        "tensor(int32)": np.int32,
        "tensor(uint8)": np.uint8,
    }
    if ort_type not in types:
        raise QuantizationError(f"unsupported model input type {ort_type}")
    return types[ort_type]


def _sample_count(arrays: dict[str, np.ndarray]) -> int:
    counts = {a.shape[0] if a.ndim else 0 for a in arrays.values()}
    if len(counts) != 1 or 0 in counts:
        raise QuantizationError(f"calibration arrays disagree on the sample count: {counts}")
    return counts.pop()


def _random_inputs(sess: ort.InferenceSession, n: int) -> dict[str, np.ndarray]:
    """Seeded normal inputs: the batch axis becomes n, any other symbolic axis is an error."""
    rng = np.random.default_rng(0)
    out = {}
    for inp in sess.get_inputs():
        dims = list(inp.shape)
        rest = dims[1:]
        if any(not isinstance(d, int) for d in rest):
            raise QuantizationError(
                f"input {inp.name} has symbolic dims {dims}: give calibration data"
            )
        out[inp.name] = rng.standard_normal((n, *rest)).astype(_np_dtype(inp.type))
    return out


def _batch(inputs: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """The first `size` samples, repeated when the set is smaller."""
    out = {}
    for k, v in inputs.items():
        reps = -(-size // v.shape[0])
        out[k] = np.concatenate([v] * reps)[:size] if reps > 1 else v[:size]
    return out


def _latencies(sess: ort.InferenceSession, inputs: dict[str, np.ndarray]) -> dict[str, float]:
    result = {}
    for size in LATENCY_BATCHES:
        feed = _batch(inputs, size)
        for _ in range(LATENCY_WARMUP):
            sess.run(None, feed)
        times = []
        for _ in range(LATENCY_REPEATS):
            start = time.perf_counter()
            sess.run(None, feed)
            times.append((time.perf_counter() - start) * 1e3)
        result[str(size)] = round(statistics.median(times), 4)
    return result


def _agreement(
    fp32: ort.InferenceSession, int8: ort.InferenceSession, inputs: dict[str, np.ndarray]
) -> tuple[float | None, float, int]:
    n = _sample_count(inputs)
    same = 0
    abs_diff = 0.0
    argmax_ok = True
    for start in range(0, n, 64):
        feed = {k: v[start : start + 64] for k, v in inputs.items()}
        a = np.asarray(fp32.run(None, feed)[0], dtype=np.float64)
        b = np.asarray(int8.run(None, feed)[0], dtype=np.float64)
        abs_diff += float(np.abs(a - b).sum()) / max(a[0].size, 1)
        if a.ndim < 2 or a.shape[-1] < 2:
            argmax_ok = False
            continue
        a2, b2 = a.reshape(a.shape[0], -1, a.shape[-1]), b.reshape(b.shape[0], -1, b.shape[-1])
        same += int(np.all(a2.argmax(-1) == b2.argmax(-1), axis=1).sum())
    return (same / n if argmax_ok else None), abs_diff / n, n
