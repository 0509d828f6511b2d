"""Post-processing `detect` on a real ONNX detector (fixed weights, exported in the test) and on
hand-made YOLOv5 / end-to-end outputs: boxes back in original pixels, NMS, the rule's decision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fieldline.cli.harness.locators import LABELS, PaintedDefect, export_detector, paint_frame
from fieldline.edge.inspection.detect import detect_boxes, iou, nms
from fieldline.shared.policy import Postprocess
from tests.edge.inspection.locating import inspect, locating_rule

# 480x240 letterboxed into 320x320: scale 2/3, 80 rows of padding above and below, so these
# 48x48 defects are 32x32 input pixels off the detector's 8-pixel grid.
WIDTH, HEIGHT = 480, 240
SCRATCH = PaintedDefect("scratch", 101, 61, 149, 109)
DENT = PaintedDefect("dent", 331, 149, 379, 197)


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {"det": export_detector(tmp_path_factory.mktemp("det") / "detector.onnx")}


def detect_post(**kw: object) -> Postprocess:
    fields: dict[str, object] = {"mode": "detect", "labels": LABELS, "defect_labels": LABELS}
    return Postprocess.model_validate({**fields, **kw})


def box_iou(box: object, painted: PaintedDefect) -> float:
    a = np.array([[box.x1, box.y1, box.x2, box.y2]])  # type: ignore[attr-defined]
    b = np.array([[painted.x1, painted.y1, painted.x2, painted.y2]], dtype=np.float64)
    return float(iou(a, b)[0, 0])


def test_boxes_match_the_painted_defects_after_letterboxing(detector: dict[str, Path]) -> None:
    frame = paint_frame(WIDTH, HEIGHT, [SCRATCH, DENT])
    (verdict,) = inspect(detector, [locating_rule("boxes", "det", detect_post())], [frame])
    assert verdict.defect
    assert sorted(b.label for b in verdict.boxes) == ["dent", "scratch"]
    for box in verdict.boxes:
        painted = SCRATCH if box.label == "scratch" else DENT
        assert box_iou(box, painted) >= 0.5, (box, painted)
        assert 0 <= box.x1 < box.x2 <= WIDTH and 0 <= box.y1 < box.y2 <= HEIGHT
    assert verdict.label == verdict.boxes[0].label and verdict.score == verdict.boxes[0].score


def test_nms_removes_the_duplicates(detector: dict[str, Path]) -> None:
    frame = paint_frame(WIDTH, HEIGHT, [SCRATCH])
    rules = [
        locating_rule("raw", "det", detect_post(iou_threshold=1.0)),  # suppresses nothing
        locating_rule("nms", "det", detect_post()),
    ]
    (raw,) = inspect(detector, rules, [frame])
    (kept,) = inspect(detector, rules[::-1], [frame])
    assert len(raw.boxes) > 3  # every window mostly covering the scratch fires
    assert [b.label for b in kept.boxes] == ["scratch"]
    assert kept.boxes[0] == max(raw.boxes, key=lambda b: b.score)


def test_a_clean_frame_gives_a_clean_verdict(detector: dict[str, Path]) -> None:
    (verdict,) = inspect(
        detector, [locating_rule("boxes", "det", detect_post())], [paint_frame(WIDTH, HEIGHT, [])]
    )
    assert (verdict.defect, verdict.label, verdict.boxes) == (False, "ok", ())
    assert b'"boxes":' not in verdict.to_json()  # absent when there are none


@pytest.mark.parametrize(
    "extra",
    [
        {"min_box_area": 48 * 48 * 2},  # the box is smaller
        {"allowed_count": {"scratch": 1}},  # one scratch is tolerated
        # a scratch wider than the detector's window scores ~0.6: reported, not a defect
        {"label_thresholds": {"scratch": 0.9}},
        {"defect_labels": ["dent"]},  # scratches are not defects under this rule
    ],
)
def test_the_rule_decides_which_boxes_make_a_defect(
    detector: dict[str, Path], extra: dict[str, object]
) -> None:
    wide = PaintedDefect("scratch", 100, 60, 190, 150)
    frames = [paint_frame(WIDTH, HEIGHT, [wide if "label_thresholds" in extra else SCRATCH])]
    (verdict,) = inspect(detector, [locating_rule("r", "det", detect_post(**extra))], frames)
    assert not verdict.defect
    assert verdict.boxes and {b.label for b in verdict.boxes} == {"scratch"}  # still reported


def test_two_scratches_exceed_an_allowed_count_of_one(detector: dict[str, Path]) -> None:
    other = PaintedDefect("scratch", 300, 30, 348, 78)
    post = detect_post(allowed_count={"scratch": 1})
    frames = [paint_frame(WIDTH, HEIGHT, [SCRATCH, other])]
    (verdict,) = inspect(detector, [locating_rule("r", "det", post)], frames)
    assert verdict.defect and len(verdict.boxes) == 2


def test_yolov5_layout_multiplies_objectness_and_maps_stretched_boxes() -> None:
    # rows: cx cy w h objectness scratch dent, in a 100x100 input stretched from 200x50
    rows = np.array(
        [
            [50, 50, 20, 20, 0.9, 0.9, 0.1],  # 0.81 scratch
            [52, 50, 20, 20, 0.9, 0.8, 0.1],  # duplicate, suppressed
            [50, 50, 20, 20, 0.9, 0.1, 0.7],  # 0.63 dent, same place: another class, kept
            [10, 10, 10, 10, 0.3, 0.9, 0.0],  # 0.27: below the threshold
        ],
        np.float32,
    )
    from fieldline.edge.inspection.preprocess import Geometry

    geo = Geometry(50, 200, 100, 100, scale_x=0.5, scale_y=2.0)
    boxes = detect_boxes(rows, detect_post(detect_layout="yolov5"), geo)
    assert [(b.label, b.score) for b in boxes] == [("scratch", 0.81), ("dent", 0.63)]
    assert (boxes[0].x1, boxes[0].y1, boxes[0].x2, boxes[0].y2) == (80.0, 20.0, 120.0, 30.0)


def test_end2end_layout_keeps_the_models_boxes_best_first() -> None:
    out = np.array([[1, 2, 3, 4, 0.6, 1], [5, 6, 7, 8, 0.9, 0], [0, 0, 0, 0, 0.1, 0]], np.float32)
    boxes = detect_boxes(out, detect_post(detect_layout="end2end", max_detections=5), None)
    assert [(b.label, b.x1) for b in boxes] == [("scratch", 5.0), ("dent", 1.0)]


def test_nms_bounds_the_detections_and_stays_per_class() -> None:
    xyxy = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]], float)
    score = np.array([0.9, 0.8, 0.7, 0.6])
    cls = np.array([0, 0, 1, 0])
    assert nms(xyxy, score, cls, 0.5, 10).tolist() == [0, 2, 3]
    assert nms(xyxy, score, cls, 0.5, 2).tolist() == [0, 2]
