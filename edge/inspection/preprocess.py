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
    boxes: tuple[Box, ...] = ()  # detect
    areas: tuple[ClassArea, ...] = ()  # segment: one per defect label
    regions: tuple[Region, ...] = ()  # segment


@dataclass(frozen=True, slots=True)
class Box:
    """One detection in the original image's pixels."""

    label: str
    score: float
    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def area(self) -> float:
        return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1)


@dataclass(frozen=True, slots=True)
class ClassArea:
    """How much of the image one segment class covers, in original pixels and as a share."""

    label: str
    area_px: float
    share: float


@dataclass(frozen=True, slots=True)
class Region:
    """One connected region of a segment class: its area and bounding box, original pixels."""

    label: str
    area_px: float
    share: float  # of the image
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True, slots=True)
class Geometry:
    """Where the model's input pixels came from: input = original * scale + pad (per axis)."""

    orig_h: int
    orig_w: int
    input_h: int
    input_w: int
    scale_x: float = 1.0
    scale_y: float = 1.0
    pad_x: float = 0.0
    pad_y: float = 0.0

    @classmethod
    def identity(cls, h: int, w: int) -> Geometry:
        return cls(h, w, h, w)

    def to_original(self, xyxy: np.ndarray) -> np.ndarray:
        """Boxes [N, 4] in input pixels -> original pixels, clipped to the original image."""
        out = np.empty_like(xyxy, dtype=np.float64)
        out[:, [0, 2]] = (xyxy[:, [0, 2]] - self.pad_x) / self.scale_x
        out[:, [1, 3]] = (xyxy[:, [1, 3]] - self.pad_y) / self.scale_y
        out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, self.orig_w)
        out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, self.orig_h)
        return out


def preprocess_payload(payload: bytes, pre: Preprocess) -> np.ndarray:
    """Decode one payload into one float32 sample (no batch axis) in the rule's layout."""
    return preprocess_frame(payload, pre)[0]


def preprocess_frame(payload: bytes, pre: Preprocess) -> tuple[np.ndarray, Geometry | None]:
    """preprocess_payload, also saying how input pixels map to the image's (None for arrays)."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise PayloadError("type", f"payload must be bytes, got {type(payload).__name__}")
    if len(payload) == 0:
        raise PayloadError("empty", "payload is empty")
    if len(payload) > MAX_INSPECT_PAYLOAD_BYTES:
        raise PayloadError("too_large", f"{len(payload)} bytes > {MAX_INSPECT_PAYLOAD_BYTES}")
    if pre.decoder == "image":
        hwc, geometry = _decode_image(bytes(payload), pre)
        return normalize(hwc, pre, channels_last=True), geometry
    arr = _decode_array(bytes(payload))
    return normalize(arr, pre, channels_last=pre.layout == "NHWC"), None


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


def _decode_image(payload: bytes, pre: Preprocess) -> tuple[np.ndarray, Geometry]:
    """PNG/JPEG bytes -> [H, W, C] uint8 (C = 1 when grayscale, else 3) and its geometry."""
    try:
        opened = Image.open(io.BytesIO(payload))
        if opened.format not in ACCEPTED_IMAGE_FORMATS:
            raise PayloadError("image", f"format {opened.format} is not PNG or JPEG")
        width, height = opened.size
        if width * height > MAX_IMAGE_PIXELS:
            raise PayloadError("too_large", f"image of {width}x{height} pixels")
        img = opened.convert("L" if pre.grayscale else "RGB")
        geometry = Geometry.identity(height, width)
        if pre.resize is not None and pre.resize_mode == "letterbox":
            img, geometry = letterbox(img, pre.resize, pre.pad_value)
        elif pre.resize is not None:
            target_h, target_w = pre.resize
            if (height, width) != (target_h, target_w):
                img = img.resize((target_w, target_h), Image.Resampling.BILINEAR)
            geometry = Geometry(
                height, width, target_h, target_w, target_w / width, target_h / height
            )
        arr = np.asarray(img, dtype=np.uint8)
    except PayloadError:
        raise
    except Exception as exc:
        # Pillow's decoders report hostile streams through many types (OSError, ValueError,
        # SyntaxError, struct.error, EOFError, DecompressionBombError, ...): all mean "bad image".
        raise PayloadError("image", f"cannot decode image: {exc!r}") from exc
    if arr.ndim == 2:
        return arr[:, :, None], geometry
    if pre.channel_order == "BGR":
        arr = arr[:, :, ::-1]
    return arr, geometry


def letterbox(
    img: Image.Image, size: tuple[int, int], pad_value: int
) -> tuple[Image.Image, Geometry]:
    """Scale `img` to fit (height, width) keeping its aspect ratio; pad the rest, centred."""
    target_h, target_w = size
    width, height = img.size
    ratio = min(target_h / height, target_w / width)
    new_w, new_h = max(1, round(width * ratio)), max(1, round(height * ratio))
    left, top = (target_w - new_w) // 2, (target_h - new_h) // 2
    fill = pad_value if img.mode == "L" else (pad_value,) * 3
    canvas = Image.new(img.mode, (target_w, target_h), fill)  # type: ignore[arg-type]
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    canvas.paste(img, (left, top))
    # Scale per axis from the rounded size, so boxes map back onto the pixels actually drawn.
    geometry = Geometry(height, width, target_h, target_w, new_w / width, new_h / height, left, top)
    return canvas, geometry


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
