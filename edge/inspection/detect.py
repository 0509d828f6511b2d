"""Post-processing `detect`: YOLO-family outputs -> boxes (confidence, class-aware NMS, boxes mapped
back through the letterbox) -> a defect decision as the rule says. Pure numpy.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from fieldline.edge.inspection.preprocess import Box, Decision, Geometry, PayloadError
from fieldline.shared.policy import Postprocess

CLEAN_LABEL = "ok"
# Candidates above the confidence threshold that NMS looks at, best first (bounds its cost on a
# frame where thousands of anchors fire).
MAX_NMS_CANDIDATES = 4096


def decode(output: np.ndarray, post: Postprocess) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sample's output -> (xyxy [N, 4] input pixels, score [N], class [N]) above threshold.

    yolov8: [4 + classes, anchors], rows cx cy w h then class scores (YOLOv8, YOLO11).
    yolov5: [anchors, 5 + classes], columns cx cy w h objectness then class scores.
    end2end: [detections, 6], columns x1 y1 x2 y2 score class (NMS already in the model).
    """
    out = np.asarray(output, dtype=np.float32)
    if out.ndim != 2:
        raise PayloadError("output", f"detect output must be 2-D per sample, got {out.shape}")
    if post.detect_layout == "end2end":
        if out.shape[1] != 6:
            raise PayloadError("output", f"end2end output must be [N, 6], got {out.shape}")
        xyxy, score, cls = out[:, :4], out[:, 4], out[:, 5].astype(np.int64)
    else:
        # rows: [anchors, 4 + (objectness) + classes]
        rows = out.T if post.detect_layout == "yolov8" else out
        first = 4 if post.detect_layout == "yolov8" else 5
        if rows.shape[1] <= first:
            raise PayloadError("output", f"{post.detect_layout} output {out.shape} has no classes")
        scores = rows[:, first:]
        if post.detect_layout == "yolov5":
            scores = scores * rows[:, 4:5]
        cls = np.argmax(scores, axis=1)
        score = scores[np.arange(rows.shape[0]), cls]
        keep = score >= post.threshold
        rows, score, cls = rows[keep], score[keep], cls[keep]
        xyxy = np.concatenate([rows[:, :2] - rows[:, 2:4] / 2, rows[:, :2] + rows[:, 2:4] / 2], 1)
    keep = (score >= post.threshold) & np.all(np.isfinite(xyxy), axis=1) & np.isfinite(score)
    return xyxy[keep], score[keep], cls[keep]


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes a [N, 4] and b [M, 4] (xyxy) -> [N, M]."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(
    xyxy: np.ndarray, score: np.ndarray, cls: np.ndarray, iou_threshold: float, max_keep: int
) -> np.ndarray:
    """Greedy class-aware NMS: indices kept, best first; a box suppresses only its own class."""
    order = np.argsort(-score, kind="stable")[:MAX_NMS_CANDIDATES]
    # Shift each class to its own region of the plane so boxes of different classes never overlap.
    span = float(np.max(np.abs(xyxy))) * 2 + 1 if xyxy.size else 1.0
    shifted = xyxy[order] + (cls[order] * span)[:, None]
    keep: list[int] = []
    alive = np.ones(order.size, dtype=bool)
    for i in range(order.size):
        if not alive[i]:
            continue
        keep.append(int(order[i]))
        if len(keep) >= max_keep:
            break
        rest = np.nonzero(alive[i + 1 :])[0] + i + 1
        if rest.size:
            overlaps = iou(shifted[i : i + 1], shifted[rest])[0]
            alive[rest[overlaps > iou_threshold]] = False
    return np.asarray(keep, dtype=np.int64)


def detect_boxes(output: np.ndarray, post: Postprocess, geometry: Geometry | None) -> list[Box]:
    """Decoded, NMS-filtered boxes in the original image's pixels, best first."""
    xyxy, score, cls = decode(output, post)
    if post.detect_layout != "end2end":
        kept = nms(xyxy, score, cls, post.iou_threshold, post.max_detections)
    else:
        kept = np.argsort(-score, kind="stable")[: post.max_detections]
    xyxy, score, cls = xyxy[kept], score[kept], cls[kept]
    if geometry is not None:
        xyxy = geometry.to_original(xyxy)
    names = post.labels
    return [
        Box(
            label=names[c] if 0 <= c < len(names) else str(c),
            score=round(float(s), 6),
            x1=round(float(b[0]), 2),
            y1=round(float(b[1]), 2),
            x2=round(float(b[2]), 2),
            y2=round(float(b[3]), 2),
        )
        for b, s, c in zip(xyxy, score, cls, strict=True)
    ]


def decide_detect(output: np.ndarray, post: Postprocess, geometry: Geometry | None) -> Decision:
    """Boxes -> verdict: a defect when some defect label has more qualifying boxes than allowed.

    A box qualifies when its label is a defect label, its score reaches the label's threshold
    and its area (original pixels) reaches min_box_area. The verdict carries every kept box.
    """
    boxes = detect_boxes(output, post, geometry)
    qualifying = [
        b
        for b in boxes
        if b.label in post.defect_labels
        and b.score >= post.label_thresholds.get(b.label, post.threshold)
        and b.area >= post.min_box_area
    ]
    counts = Counter(b.label for b in qualifying)
    over = [b for b in qualifying if counts[b.label] > post.allowed_count.get(b.label, 0)]
    if over:
        return Decision(label=over[0].label, score=over[0].score, defect=True, boxes=tuple(boxes))
    best = max((b.score for b in qualifying), default=0.0)
    return Decision(label=CLEAN_LABEL, score=best, defect=False, boxes=tuple(boxes))
