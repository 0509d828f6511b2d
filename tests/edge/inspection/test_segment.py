"""Post-processing `segment` on a real ONNX segmenter (fixed weights, exported in the test): defect
areas in original pixels and as a share, connected regions, and the labelling they rest on."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fieldline.cli.harness.locators import (
    COLOURS,
    PaintedDefect,
    export_segmenter,
    paint_frame,
)
from fieldline.edge.inspection.detect import iou
from fieldline.edge.inspection.segment import connected_regions
from fieldline.shared.policy import Postprocess
from tests.edge.inspection.locating import inspect, locating_rule

WIDTH, HEIGHT = 410, 230  # non-square: letterboxed with padding above and below
LABELS = ["background", "scratch", "dent"]
SCRATCH = PaintedDefect("scratch", 40, 30, 170, 120)
DENT = PaintedDefect("dent", 250, 140, 330, 200)


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {"seg": export_segmenter(tmp_path_factory.mktemp("seg") / "segmenter.onnx")}


def seg_post(**kw: object) -> Postprocess:
    fields = {"mode": "segment", "labels": LABELS, "defect_labels": ["scratch", "dent"]}
    return Postprocess.model_validate({**fields, **kw})


def painted_pixels(frame: bytes, label: str) -> int:
    rgb = np.asarray(Image.open(io.BytesIO(frame)).convert("RGB"))
    return int(np.all(rgb == COLOURS[label], axis=2).sum())


def test_defect_areas_are_within_5_percent_of_the_painted_ones(
    segmenter: dict[str, Path],
) -> None:
    frame = paint_frame(WIDTH, HEIGHT, [SCRATCH, DENT], ellipse=True)
    (verdict,) = inspect(segmenter, [locating_rule("areas", "seg", seg_post())], [frame])
    assert verdict.defect
    areas = {a.label: a for a in verdict.areas}
    for label in ("scratch", "dent"):
        painted = painted_pixels(frame, label)
        assert abs(areas[label].area_px - painted) <= 0.05 * painted, (label, areas, painted)
        assert areas[label].share == pytest.approx(painted / (WIDTH * HEIGHT), rel=0.05)
    assert verdict.label == "scratch" and verdict.score == areas["scratch"].share
    # one region per blob, boxed where it was painted (original pixels)
    assert sorted(r.label for r in verdict.regions) == ["dent", "scratch"]
    for region in verdict.regions:
        d = SCRATCH if region.label == "scratch" else DENT
        got = np.array([[region.x1, region.y1, region.x2, region.y2]])
        assert iou(got, np.array([[d.x1, d.y1, d.x2, d.y2]], float))[0, 0] >= 0.9


def test_a_clean_frame_and_a_too_small_defect_are_clean(segmenter: dict[str, Path]) -> None:
    frames = [paint_frame(WIDTH, HEIGHT, []), paint_frame(WIDTH, HEIGHT, [DENT])]
    rule = locating_rule("areas", "seg", seg_post(min_area_share=0.1))  # the dent is ~5%
    clean, small = inspect(segmenter, [rule], frames)
    assert (clean.defect, clean.label, clean.regions) == (False, "ok", ())
    assert {a.label: a.area_px for a in clean.areas} == {"scratch": 0.0, "dent": 0.0}
    assert not small.defect and small.label == "ok" and small.score > 0.03
    assert [r.label for r in small.regions] == ["dent"]


def test_connected_regions_join_diagonals_and_u_shapes() -> None:
    mask = np.zeros((7, 9), bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: one region
    mask[2:6, 4] = mask[2:6, 7] = True  # the two arms of a U ...
    mask[5, 4:8] = True  # ... joined only at the bottom row
    mask[0, 8] = True
    regions = connected_regions(mask)
    assert regions == [(10, 4, 2, 8, 6), (2, 0, 0, 2, 2), (1, 8, 0, 9, 1)]
    assert connected_regions(np.zeros((3, 3), bool)) == []
