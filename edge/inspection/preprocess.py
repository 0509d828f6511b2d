"""Payload -> model input and model output -> verdict fields, exactly as an InspectionRule declares.

Pure functions over numpy (no sessions, no threads) so the demo trainer, the runtime and the tests
share one definition of what a frame means to a model.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from fieldline.shared.limits import (
    MAX_IMAGE_PIXELS,
    MAX_INSPECT_ARRAY_VALUES,
    MAX_INSPECT_PAYLOAD_BYTES,
)
from fieldline.shared.policy import Postprocess, Preprocess

ACCEPTED_IMAGE_FORMATS = frozenset({"PNG", "JPEG"})
ANOMALY_LABELS = ("normal", "anomaly")


class PayloadError(ValueError):
    """A payload that cannot become a model input; `reason` is a short, bounded category."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Decision:
    """What post-processing makes of one sample's model output."""

    label: str
    score: float
    defect: bool


def preprocess_payload(payload: bytes, pre: Preprocess) -> np.ndarray:
    """Decode one payload into one float32 sample (no batch axis) in the rule's layout."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise PayloadError("type", f"payload must be bytes, got {type(payload).__name__}")
    if len(payload) == 0:
        raise PayloadError("empty", "payload is empty")
    if len(payload) > MAX_INSPECT_PAYLOAD_BYTES:
        raise PayloadError("too_large", f"{len(payload)} bytes > {MAX_INSPECT_PAYLOAD_BYTES}")
    if pre.decoder == "image":
        hwc = _decode_image(bytes(payload), pre)
        return normalize(hwc, pre, channels_last=True)
    arr = _decode_array(bytes(payload))
    return normalize(arr, pre, channels_last=pre.layout == "NHWC")


def normalize(sample: np.ndarray, pre: Preprocess, *, channels_last: bool) -> np.ndarray:
    """Scale, subtract mean, divide by std (per channel), then lay out as the rule says.

    `sample` is [H, W, C] when channels_last, else [C, H, W] (or any shape for arrays without
    per-channel statistics). Images always arrive channels-last and leave in `pre.layout`.
    """
    x = sample.astype(np.float32, copy=False) * np.float32(pre.scale)
    if pre.mean is not None or pre.std is not None:
        x = _apply_stats(x, pre, channels_last=channels_last)
    if pre.decoder == "image" and pre.layout == "NCHW":
        x = np.ascontiguousarray(x.transpose(2, 0, 1))  # [H, W, C] -> [C, H, W]
    return x


def _apply_stats(x: np.ndarray, pre: Preprocess, *, channels_last: bool) -> np.ndarray:
    mean = np.asarray(pre.mean if pre.mean is not None else [0.0], dtype=np.float32)
    std = np.asarray(pre.std if pre.std is not None else [1.0], dtype=np.float32)
    if np.any(std == 0):
        raise PayloadError("config", "std must not contain zeros")
    if x.ndim != 3 and (mean.size > 1 or std.size > 1):
        raise PayloadError("shape", f"per-channel mean/std need a 3-D sample, got {x.shape}")
    if x.ndim == 3:
        channels = x.shape[2] if channels_last else x.shape[0]
        for name, stat in (("mean", mean), ("std", std)):
            if stat.size not in (1, channels):
                raise PayloadError(
                    "shape", f"{name} has {stat.size} values for {channels} channels"
                )
        shape = (1, 1, -1) if channels_last else (-1, 1, 1)
        mean, std = mean.reshape(shape), std.reshape(shape)
    return (x - mean) / std


def _decode_image(payload: bytes, pre: Preprocess) -> np.ndarray:
    """PNG/JPEG bytes -> [H, W, C] uint8 (C = 1 when grayscale, else 3)."""
    try:
        opened = Image.open(io.BytesIO(payload))
        if opened.format not in ACCEPTED_IMAGE_FORMATS:
            raise PayloadError("image", f"format {opened.format} is not PNG or JPEG")
        width, height = opened.size
        if width * height > MAX_IMAGE_PIXELS:
            raise PayloadError("too_large", f"image of {width}x{height} pixels")
        img = opened.convert("L" if pre.grayscale else "RGB")
        if pre.resize is not None:
            target_h, target_w = pre.resize
            if (height, width) != (target_h, target_w):
                img = img.resize((target_w, target_h), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    except PayloadError:
        raise
    except Exception as exc:
        # Pillow's decoders report hostile streams through many types (OSError, ValueError,
        # SyntaxError, struct.error, EOFError, DecompressionBombError, ...): all mean "bad image".
        raise PayloadError("image", f"cannot decode image: {exc!r}") from exc
    return arr[:, :, None] if arr.ndim == 2 else arr


def _decode_array(payload: bytes) -> np.ndarray:
    """A JSON array of numbers (or {"values": [...]}) -> float32 array."""
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise PayloadError("json", f"not JSON: {exc}") from exc
    if isinstance(data, dict):
        data = data.get("values")
    if not isinstance(data, list) or not data:
        raise PayloadError("array", "expected a non-empty JSON array or {'values': [...]}")
    try:
        # Numbers beyond float32 become inf (refused below) without a warning per message.
        with np.errstate(over="ignore"):
            arr = np.asarray(data, dtype=np.float32)
    except (ValueError, TypeError, OverflowError) as exc:
        raise PayloadError("array", f"not a rectangular array of numbers: {exc}") from exc
    if arr.size > MAX_INSPECT_ARRAY_VALUES:
        raise PayloadError("too_large", f"{arr.size} elements > {MAX_INSPECT_ARRAY_VALUES}")
    if not np.all(np.isfinite(arr)):
        raise PayloadError("array", "array holds NaN or infinity")
    return arr


def fit_to_input(sample: np.ndarray, sample_shape: tuple[int | None, ...]) -> np.ndarray:
    """Check a sample against the model's per-sample input shape (None = dynamic axis).

    A flat array whose element count matches a fully fixed shape is reshaped to it, so a sensor
    may send its readings as one list.
    """
    if len(sample_shape) == sample.ndim and all(
        want is None or want == got for want, got in zip(sample_shape, sample.shape, strict=True)
    ):
        return sample
    if None not in sample_shape and sample.size == math.prod(sample_shape):  # type: ignore[arg-type]
        return sample.reshape(sample_shape)  # type: ignore[arg-type]
    shown = tuple("?" if d is None else d for d in sample_shape)
    raise PayloadError("shape", f"sample of shape {sample.shape} does not fit model input {shown}")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis."""
    z = logits - np.max(logits, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=-1, keepdims=True)


def postprocess_output(output: np.ndarray, post: Postprocess) -> Decision:
    """One sample's first model output -> label, score and defect flag.

    classify: probabilities (softmax when asked); the sample is a defect when the most likely
    defect label reaches `threshold` (for two classes and threshold >= 0.5 this is "a defect
    label wins"; a lower threshold flags more parts). Otherwise the winning label is reported.
    anomaly: the first value is the score; a defect when score >= threshold.
    """
    values = np.asarray(output, dtype=np.float64).reshape(-1)
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise PayloadError("output", "model produced an empty or non-finite output")
    if post.mode == "anomaly":
        score = float(values[0])
        defect = score >= post.threshold
        names = post.labels if len(post.labels) == 2 else list(ANOMALY_LABELS)
        return Decision(label=names[1] if defect else names[0], score=score, defect=defect)
    probs = softmax(values) if post.softmax else values
    names = [post.labels[i] if i < len(post.labels) else str(i) for i in range(probs.size)]
    defect_idx = [i for i, name in enumerate(names) if name in post.defect_labels]
    if defect_idx:
        best_defect = max(defect_idx, key=lambda i: probs[i])
        if probs[best_defect] >= post.threshold:
            return Decision(label=names[best_defect], score=float(probs[best_defect]), defect=True)
    # Not a defect: report the most likely non-defect label (or the overall winner if none).
    candidates = [i for i in range(probs.size) if i not in defect_idx] or list(range(probs.size))
    best = max(candidates, key=lambda i: probs[i])
    return Decision(label=names[best], score=float(probs[best]), defect=False)
