"""The demo's defect classifier: synthetic camera frames of parts, a small CNN trained on them
in seconds, exported to ONNX with a dynamic batch axis, plus the calibration set for INT8.

`make_frame` is what the line simulator publishes; `train_classifier` is run at demo start.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
from PIL import Image, ImageDraw

from fieldline.edge.inspection.preprocess import normalize
from fieldline.shared.policy import InspectionRule, Postprocess, Preprocess

log = structlog.get_logger(__name__)

FRAME_SIZE = 64
INPUT_NAME = "frames"
OUTPUT_NAME = "logits"
LABELS = ["good", "defect"]
CALIBRATION_FRAMES = 256
HELDOUT_FRAMES = 400
TRAIN_BATCH = 64
TORCH_THREADS = 2
ONNX_OPSET = 17


@dataclass(frozen=True)
class TrainedClassifier:
    """What `train_classifier` leaves behind, and how a policy rule must feed the model."""

    onnx_path: Path
    calibration_path: Path
    preprocess: Preprocess
    postprocess: Postprocess
    heldout_accuracy: float
    train_seconds: float
    steps: int

    def rule(
        self, *, name: str, topic: str, model: str, result_topic: str, **extra: object
    ) -> InspectionRule:
        """A policy inspection rule that feeds frames to this model as it was trained."""
        return InspectionRule.model_validate(
            {
                "name": name,
                "topic": topic,
                "model": model,
                "result_topic": result_topic,
                "preprocess": self.preprocess,
                "postprocess": self.postprocess,
                **extra,
            }
        )


def demo_preprocess() -> Preprocess:
    """The pre-processing the demo model was trained with."""
    return Preprocess(
        decoder="image",
        resize=(FRAME_SIZE, FRAME_SIZE),
        grayscale=True,
        scale=1.0 / 255.0,
        mean=[0.5],
        std=[0.25],
        layout="NCHW",
    )


def demo_postprocess() -> Postprocess:
    """The post-processing matching the demo model's two logits."""
    return Postprocess(
        mode="classify", softmax=True, labels=LABELS, defect_labels=["defect"], threshold=0.5
    )


def render_frame(defective: bool, rng: np.random.Generator) -> np.ndarray:
    """One synthetic grayscale frame [FRAME_SIZE, FRAME_SIZE] uint8: a disc or square part on a
    dark belt, random position, size and brightness; a defective part carries a scratch or a hole.
    """
    s = FRAME_SIZE
    background = int(rng.integers(10, 60))
    part = int(rng.integers(140, 236))
    img = Image.new("L", (s, s), background)
    draw = ImageDraw.Draw(img)
    r = int(rng.integers(14, 22))
    cx, cy = (int(v) for v in rng.integers(r + 2, s - r - 2, size=2))
    box = (cx - r, cy - r, cx + r, cy + r)
    if rng.random() < 0.5:
        draw.ellipse(box, fill=part)
    else:
        draw.rectangle(box, fill=part)
    if defective:
        dark = int(rng.integers(background, background + 50))
        if rng.random() < 0.5:
            # A scratch: a thin dark stroke across the part.
            angle = rng.uniform(0, np.pi)
            half = rng.uniform(0.5, 0.9) * r
            dx, dy = half * np.cos(angle), half * np.sin(angle)
            ox, oy = rng.uniform(-0.3, 0.3, size=2) * r
            draw.line(
                (cx + ox - dx, cy + oy - dy, cx + ox + dx, cy + oy + dy),
                fill=dark,
                width=int(rng.integers(1, 3)),
            )
        else:
            # A hole: a small dark disc well inside the part.
            hr = int(rng.integers(2, 5))
            hx, hy = (cx, cy) + rng.uniform(-0.4, 0.4, size=2) * r
            draw.ellipse((hx - hr, hy - hr, hx + hr, hy + hr), fill=dark)
    frame = np.asarray(img, dtype=np.float32)
    frame += rng.normal(0.0, rng.uniform(2.0, 8.0), size=frame.shape)
    return np.clip(frame, 0, 255).astype(np.uint8)


def make_frame(defective: bool, rng: np.random.Generator) -> bytes:
    """One synthetic camera frame as PNG bytes (what the line simulator publishes)."""
    buf = io.BytesIO()
    Image.fromarray(render_frame(defective, rng), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def make_dataset(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n preprocessed frames [n, 1, H, W] float32 (half defective, shuffled) and labels [n]."""
    pre = demo_preprocess()
    labels = rng.permutation(np.arange(n) % 2).astype(np.int64)
    frames = np.stack(
        [normalize(render_frame(bool(y), rng)[:, :, None], pre, channels_last=True) for y in labels]
    )
    return frames, labels


def _build_model():  # -> torch.nn.Module (torch is imported lazily: the simulator needs no torch)
    from torch import nn

    # frames: [N, 1, 64, 64] -> logits: [N, 2]. Global max pooling keeps a small local defect
    # (a 2-px scratch, a 3-px hole) from being averaged away by the rest of the part.
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, stride=2, padding=2),  # [N, 16, 32, 32]
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),  # [N, 32, 32, 32]
        nn.ReLU(),
        nn.MaxPool2d(2),  # [N, 32, 16, 16]
        nn.Conv2d(32, 32, 3, padding=1),  # [N, 32, 16, 16]
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),  # [N, 32, 1, 1]
        nn.Flatten(),
        nn.Linear(32, 2),
    )


def export_onnx(
    model, path: Path, sample_hw: tuple[int, int] = (FRAME_SIZE, FRAME_SIZE), channels: int = 1
) -> None:
    """Export a [N, channels, H, W] -> [N, ...] torch model to ONNX with a dynamic batch axis.

    Uses the TorchScript-based exporter (dynamo=False): with torch 2.13 it writes one
    self-contained file with `dynamic_axes` in well under a second. The dynamo exporter works
    too but takes ~3 s here and writes the weights to a side file unless told otherwise.
    """
    import warnings

    import torch

    model.eval()
    dummy = torch.zeros(1, channels, *sample_hw)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # torch announces the legacy exporter's retirement on every call; we chose it knowingly.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )


def train_classifier(
    out_dir: Path, seconds_budget: float = 8.0, *, seed: int = 0, min_steps: int = 60
) -> TrainedClassifier:
    """Train the demo CNN for about `seconds_budget` seconds, export it and its calibration set.

    Writes out_dir/defect_classifier.onnx and out_dir/calibration.npz (key INPUT_NAME).
    """
    import torch

    torch.set_num_threads(TORCH_THREADS)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)

    model = _build_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    start = time.monotonic()
    steps = 0
    model.train()
    # Fresh frames every step: the generator is cheap and the model never sees a frame twice.
    while steps < min_steps or time.monotonic() - start < seconds_budget:
        x, y = make_dataset(TRAIN_BATCH, rng)
        loss = loss_fn(model(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    train_seconds = time.monotonic() - start

    model.eval()
    x_test, y_test = make_dataset(HELDOUT_FRAMES, np.random.default_rng(seed + 1))
    with torch.no_grad():
        pred = model(torch.from_numpy(x_test)).argmax(dim=1).numpy()
    accuracy = float(np.mean(pred == y_test))

    onnx_path = out_dir / "defect_classifier.onnx"
    export_onnx(model, onnx_path)
    calib, _ = make_dataset(CALIBRATION_FRAMES, np.random.default_rng(seed + 2))
    calibration_path = out_dir / "calibration.npz"
    np.savez(calibration_path, **{INPUT_NAME: calib})  # type: ignore[arg-type]
    log.info(
        "demo classifier trained",
        steps=steps,
        seconds=round(train_seconds, 2),
        heldout_accuracy=accuracy,
        onnx=str(onnx_path),
    )
    return TrainedClassifier(
        onnx_path=onnx_path,
        calibration_path=calibration_path,
        preprocess=demo_preprocess(),
        postprocess=demo_postprocess(),
        heldout_accuracy=accuracy,
        train_seconds=train_seconds,
        steps=steps,
    )
