"""Real-sized models for bench/inspection.py, written in torch from their published definitions
(nothing downloaded, no ultralytics or torchvision): a YOLOv8n-shaped detector (yolov8.yaml at
scale n: width 0.25, depth 0.33, 80 classes, DFL head, output [N, 84, 8400] at 640x640) and a
ResNet-18 (BasicBlock [2, 2, 2, 2], 1000 classes). Plus a brief trainer that teaches the detector
to find painted rectangles (its last convolutions only), so its boxes mean something when FP32
and INT8 are compared.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

# -- YOLOv8n -------------------------------------------------------------------------------------


class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm + SiLU, "same" padding."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool):
        super().__init__()
        self.cv1, self.cv2 = Conv(c, c, 3), Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP bottleneck with 2 convolutions, every bottleneck's output concatenated (YOLOv8)."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        c = c1 // 2
        self.cv1, self.cv2 = Conv(c1, c, 1), Conv(c * 4, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class Detect(nn.Module):
    """Anchor-free decoupled head with Distribution Focal Loss bins (reg_max 16)."""

    reg_max = 16
    strides = (8, 16, 32)

    def __init__(self, nc: int, ch: tuple[int, ...], imgsz: int):
        super().__init__()
        self.nc = nc
        # Anchors of a fixed input size are constants in the graph (as ultralytics exports them):
        # computed from the feature shapes they become Range ops ORT's shape inference rejects.
        anchors, strides = anchor_points([imgsz // s for s in self.strides])
        self.register_buffer("anchors", anchors.T[None])  # [1, 2, A]
        self.register_buffer("stride_per_anchor", strides.T[None])  # [1, 1, A]
        c2, c3 = max(16, ch[0] // 4, self.reg_max * 4), max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(
            nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * self.reg_max, 1))
            for x in ch
        )
        self.cv3 = nn.ModuleList(
            nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for x in ch
        )
        self.register_buffer("bins", torch.arange(self.reg_max, dtype=torch.float32))
        for seq, s in zip(self.cv3, self.strides, strict=True):  # ultralytics' bias prior
            seq[-1].bias.data[:] = math.log(5 / nc / (640 / s) ** 2)

    def raw(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per level [N, 4 * reg_max + nc, H, W] (what the training loss reads)."""
        return [
            torch.cat([b(x), c(x)], 1) for x, b, c in zip(feats, self.cv2, self.cv3, strict=True)
        ]

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        levels = self.raw(feats)
        x = torch.cat([lv.flatten(2) for lv in levels], 2)  # [N, 4 * reg_max + nc, A]
        box, cls = x[:, : 4 * self.reg_max], x[:, 4 * self.reg_max :]
        ltrb = dfl(box, self.bins)  # [N, 4, A]
        lt, rb = ltrb[:, :2], ltrb[:, 2:]
        xy = (self.anchors + (rb - lt) / 2) * self.stride_per_anchor
        wh = (lt + rb) * self.stride_per_anchor
        return torch.cat([xy, wh, cls.sigmoid()], 1)  # [N, 4 + nc, A]


def dfl(box: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """[N, 4 * reg_max, A] bin logits -> [N, 4, A] expected distances (in strides)."""
    prob = box.reshape(box.shape[0], 4, -1, box.shape[2]).softmax(2)
    return (prob * bins.view(1, 1, -1, 1)).sum(2)


def anchor_points(sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres [A, 2] (x, y in strides) and each anchor's stride [A, 1], square levels."""
    points, strides = [], []
    for size, s in zip(sizes, Detect.strides, strict=True):
        h = w = size
        sy, sx = torch.meshgrid(
            torch.arange(h, dtype=torch.float32) + 0.5,
            torch.arange(w, dtype=torch.float32) + 0.5,
            indexing="ij",
        )
        points.append(torch.stack([sx, sy], -1).view(-1, 2))
        strides.append(torch.full((h * w, 1), float(s)))
    return torch.cat(points), torch.cat(strides)


class YoloV8n(nn.Module):
    """yolov8.yaml at scale n (channels 16-256, C2f repeats 1-2-2-1), 80 classes by default."""

    def __init__(self, nc: int = 80, imgsz: int = 640):
        super().__init__()
        self.b0, self.b1, self.b2 = Conv(3, 16, 3, 2), Conv(16, 32, 3, 2), C2f(32, 32, 1, True)
        self.b3, self.b4 = Conv(32, 64, 3, 2), C2f(64, 64, 2, True)
        self.b5, self.b6 = Conv(64, 128, 3, 2), C2f(128, 128, 2, True)
        self.b7, self.b8, self.b9 = Conv(128, 256, 3, 2), C2f(256, 256, 1, True), SPPF(256, 256)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.h12, self.h15 = C2f(384, 128), C2f(192, 64)
        self.h16, self.h18 = Conv(64, 64, 3, 2), C2f(192, 128)
        self.h19, self.h21 = Conv(128, 128, 3, 2), C2f(384, 256)
        self.detect = Detect(nc, (64, 128, 256), imgsz)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        p3 = self.b4(self.b3(self.b2(self.b1(self.b0(x)))))
        p4 = self.b6(self.b5(p3))
        p5 = self.b9(self.b8(self.b7(p4)))
        h12 = self.h12(torch.cat([self.up(p5), p4], 1))
        h15 = self.h15(torch.cat([self.up(h12), p3], 1))
        h18 = self.h18(torch.cat([self.h16(h15), h12], 1))
        h21 = self.h21(torch.cat([self.h19(h18), p5], 1))
        return [h15, h18, h21]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.detect(self.features(x))


# -- ResNet-18 -----------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, c1: int, c2: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c1, c2, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c2)
        self.conv2 = nn.Conv2d(c2, c2, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.down = (
            nn.Sequential(nn.Conv2d(c1, c2, 1, stride, bias=False), nn.BatchNorm2d(c2))
            if stride != 1 or c1 != c2
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


class ResNet18(nn.Module):
    """He et al. 2015, 18 layers: [N, 3, 224, 224] -> [N, classes] logits."""

    def __init__(self, classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks, c = [], 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(c, width, stride), BasicBlock(width, width, 1)]
            c = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


FIT_CLASSES = 2  # the painted defects are classes 0 and 1

# -- a brief detector training -------------------------------------------------------------------


def calibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch: int = 8) -> None:
    """Take every BatchNorm's statistics from `x`, so random layers stay well scaled 20 deep
    (with the default mean 0, var 1 a random network's outputs are nearly constant)."""
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average
        model.train()
        for start in range(0, len(x), batch):
            model(x[start : start + batch])
        model.eval()


def fit_head(
    model: YoloV8n,
    frames: np.ndarray,
    boxes: list[np.ndarray],
    steps: int,
    *,
    max_seconds: float = 300.0,
    lr: float = 0.05,
) -> int:
    """Fit the detector's last 1x1 convolutions (class and DFL box outputs) to painted boxes for
    `steps` Adam steps (fewer if `max_seconds` runs out); backbone, neck and the rest of the
    head keep their random weights.

    frames [N, 3, S, S] in 0..1; boxes per frame [K, 5]: class x1 y1 x2 y2 in input pixels.
    The inputs of those convolutions are computed once (no backbone backward: a full training
    takes minutes per dozen steps on a CPU). Centre assignment: the cell holding a box's centre,
    on the level its size suits, is positive; BCE on classes, L1 on DFL distances.
    Returns the optimiser steps taken.
    """
    head = model.detect
    x = torch.from_numpy(frames)
    calibrate_batchnorm(model, x)
    with torch.no_grad():
        feats = model.features(x)
        box_in = [seq[:-1](f) for seq, f in zip(head.cv2, feats, strict=True)]
        cls_in = [seq[:-1](f) for seq, f in zip(head.cv3, feats, strict=True)]
    last = [*(seq[-1] for seq in head.cv2), *(seq[-1] for seq in head.cv3)]
    opt = torch.optim.Adam([p for conv in last for p in conv.parameters()], lr=lr)
    done, deadline = 0, time.monotonic() + max_seconds
    while done < steps and time.monotonic() < deadline:
        levels = [
            torch.cat([b[-1](bi), c[-1](ci)], 1)
            for b, c, bi, ci in zip(head.cv2, head.cv3, box_in, cls_in, strict=True)
        ]
        loss = _centre_loss(head, levels, boxes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        done += 1
    return done


def _centre_loss(head: Detect, levels: list[torch.Tensor], boxes: list[np.ndarray]) -> torch.Tensor:
    """Balanced BCE (positives and negatives weigh alike: positives are a handful of cells in
    thousands) plus L1 on the positive cells' DFL distances."""
    reg = head.reg_max
    zero = levels[0].new_zeros(())
    pos_sum, neg_sum, box_sum, n_pos, n_neg = zero, zero, zero, 0, 0
    for lv, stride in zip(levels, head.strides, strict=True):
        n, _, h, w = lv.shape
        target = torch.zeros(n, head.nc, h, w, dtype=torch.bool)
        for i, frame_boxes in enumerate(boxes):
            for c, x1, y1, x2, y2 in frame_boxes:
                size = max(x2 - x1, y2 - y1)
                # the level whose stride suits the box: 8 up to 64 px, 16 up to 128, else 32
                if stride != (8 if size <= 64 else 16 if size <= 128 else 32):
                    continue
                gx = min(int((x1 + x2) / 2 / stride), w - 1)
                gy = min(int((y1 + y2) / 2 / stride), h - 1)
                target[i, int(c), gy, gx] = True
                cx, cy = gx + 0.5, gy + 0.5
                want = torch.tensor(
                    [cx - x1 / stride, cy - y1 / stride, x2 / stride - cx, y2 / stride - cy]
                ).clamp(0, reg - 1.01)
                got = dfl(lv[i : i + 1, : 4 * reg, gy, gx].reshape(1, 4 * reg, 1), head.bins)
                box_sum = box_sum + (got.view(4) - want).abs().sum()
        # only the classes painted: the others keep the prior's near-zero scores
        target = target[:, :FIT_CLASSES]
        bce = nn.functional.binary_cross_entropy_with_logits(
            lv[:, 4 * reg : 4 * reg + FIT_CLASSES], target.float(), reduction="none"
        )
        pos_sum, neg_sum = pos_sum + bce[target].sum(), neg_sum + bce[~target].sum()
        n_pos, n_neg = n_pos + int(target.sum()), n_neg + int((~target).sum())
    n_pos = max(n_pos, 1)
    return pos_sum / n_pos + neg_sum / max(n_neg, 1) + 0.1 * box_sum / n_pos
