"""Fixed-weight models that find coloured defects: a YOLOv8-layout detector and a semantic
segmenter, plus frames with defects painted at known places. No training, so their boxes and
masks are known exactly; tests, the bench and the demo export them to ONNX.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from fieldline.cli.harness.classifier import export_onnx

LABELS = ["scratch", "dent"]  # painted red and blue
COLOURS = {"scratch": (220, 30, 30), "dent": (30, 30, 220)}
BACKGROUND = (128, 128, 128)
INPUT_SIZE = 320
WINDOW = 48  # each detector anchor's window, input pixels (defects up to ~40 fit)
CONTEXT = 40  # the wider window a score compares against, on each side (>= a defect)
STRIDE = 8
MIN_MASS = 16.0  # pixels of colour below which an anchor's score fades to 0


@dataclass(frozen=True)
class PaintedDefect:
    label: str
    x1: int
    y1: int
    x2: int
    y2: int


def paint_frame(
    width: int, height: int, defects: list[PaintedDefect], *, ellipse: bool = False
) -> bytes:
    """A grey PNG frame with each defect painted as a filled rectangle (or ellipse) of its colour."""
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for d in defects:
        shape = draw.ellipse if ellipse else draw.rectangle
        shape((d.x1, d.y1, d.x2 - 1, d.y2 - 1), fill=COLOURS[d.label])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _colour_maps(x):  # x: [N, 3, H, W] RGB in 0..1 -> [N, 2, H, W], ~1 where the colour is
    import torch

    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    red = torch.clamp((r - (g + b) / 2 - 0.2) * 4, 0, 1)
    blue = torch.clamp((b - (r + g) / 2 - 0.2) * 4, 0, 1)
    return torch.cat([red, blue], 1)


def build_detector(size: int = INPUT_SIZE):
    """[N, 3, size, size] -> [N, 4 + 2, anchors] (YOLOv8 layout), one anchor per STRIDE cell.

    Each anchor looks at a WINDOW-pixel window: its box is the mean and spread (uniform width
    = sqrt(12 var + 1)) of the colour's pixels there, its score the share of the colour in a
    window CONTEXT pixels wider that falls inside, so only windows holding most of a defect fire
    and their boxes agree (the duplicates NMS must remove).
    """
    import torch
    from torch.nn.functional import avg_pool2d

    centres = torch.arange(size, dtype=torch.float32) + 0.5  # pixel centres
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")

    class Detector(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("xs", xs[None, None])
            self.register_buffer("ys", ys[None, None])

        def _sum(self, m):  # m: [N, 2, H, W] -> window sums [N, 2, cells, cells]
            return avg_pool2d(m, WINDOW, STRIDE) * WINDOW * WINDOW

        def forward(self, x):
            m = _colour_maps(x)  # [N, 2, H, W]
            mass = self._sum(m)
            wide = WINDOW + 2 * CONTEXT
            outer = avg_pool2d(m, wide, STRIDE, padding=CONTEXT) * wide * wide
            score = mass / (outer + 1e-3) * torch.clamp(mass / MIN_MASS, 0, 1)
            safe = mass + 1e-3
            mx, my = self._sum(m * self.xs) / safe, self._sum(m * self.ys) / safe
            vx = self._sum(m * self.xs * self.xs) / safe - mx * mx
            vy = self._sum(m * self.ys * self.ys) / safe - my * my
            w = torch.sqrt(torch.clamp(12 * vx + 1, min=1))
            h = torch.sqrt(torch.clamp(12 * vy + 1, min=1))
            # one box per anchor: the class with more pixels in the window
            pick = (mass[:, :1] >= mass[:, 1:]).float()
            boxes = [pick * v[:, :1] + (1 - pick) * v[:, 1:] for v in (mx, my, w, h)]
            out = torch.cat([*boxes, score], 1)  # [N, 4 + 2, cells, cells]
            return out.flatten(2)

    return Detector()


def build_segmenter():
    """[N, 3, H, W] -> [N, 3, H, W] logits of background, scratch, dent."""
    import torch

    class Segmenter(torch.nn.Module):
        def forward(self, x):
            maps = _colour_maps(x) * 20 - 10  # logit +10 on the colour, -10 off it
            return torch.cat([torch.zeros_like(maps[:, :1]), maps], 1)

    return Segmenter()


def export_detector(path: Path, size: int = INPUT_SIZE) -> Path:
    export_onnx(build_detector(size), path, (size, size), channels=3)
    return path


def export_segmenter(path: Path, size: int = INPUT_SIZE) -> Path:
    export_onnx(build_segmenter(), path, (size, size), channels=3)
    return path
