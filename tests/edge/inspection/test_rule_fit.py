"""A rule whose mode cannot read its model's output is refused when the model loads, with both
shapes named: not at the first message, and not by a silently wrong verdict."""

from __future__ import annotations

from pathlib import Path

import pytest

from fieldline.cli.harness.locators import LABELS, export_detector, export_segmenter
from fieldline.edge.inspection.runtime import InspectionRejected, InspectionRuntime
from fieldline.shared.policy import Policy, Postprocess
from tests.edge.inspection.locating import TIMEOUT_S, locating_rule
from tests.support.onnx_models import tiny_classifier


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("fit")
    return {
        "det": export_detector(out / "det.onnx", size=64),
        "seg": export_segmenter(out / "seg.onnx", size=64),
        "cls": tiny_classifier(out / "cls.onnx", side=64),
    }


DETECT = Postprocess(mode="detect", labels=LABELS, defect_labels=LABELS)
SEGMENT = Postprocess(mode="segment", labels=["background", *LABELS], defect_labels=LABELS)
CLASSIFY = Postprocess(labels=["ok", "defect"], defect_labels=["defect"])


@pytest.mark.parametrize(
    ("model", "post", "wanted", "got"),
    [
        ("seg", DETECT, "[6, anchors]", "[3, 64, 64]"),
        ("det", DETECT.model_copy(update={"detect_layout": "yolov5"}), "[anchors, 7]", "[6, 9]"),
        ("det", DETECT.model_copy(update={"labels": [*LABELS, "crack"]}), "[7, anchors]", "[6, 9]"),
        ("det", SEGMENT, "[3, H, W]", "[6, 9]"),
        ("det", CLASSIFY, "a vector of scores", "[6, 9]"),
        ("cls", SEGMENT, "[3, H, W]", "[2]"),
    ],
)
def test_a_rule_that_does_not_fit_the_output_is_refused_at_load(
    models: dict[str, Path], model: str, post: Postprocess, wanted: str, got: str
) -> None:
    rule = locating_rule("misfit", model, post, size=64)
    with InspectionRuntime(lambda _t, _p: None, lambda _v: None) as runtime:
        runtime.apply_policy(Policy(inspections=[rule]), {model: ("1", models[model])})
        health = runtime.health()[model]
        assert not health.loaded
        assert health.error is not None
        assert f"reads {wanted} per sample" in health.error and f"outputs {got}" in health.error
        with pytest.raises(InspectionRejected) as err:
            runtime.submit("misfit", b"\x89PNG").result(timeout=TIMEOUT_S)
        assert err.value.reason == "no_model" and got in err.value.detail


def test_fitting_rules_load_and_a_misfit_swap_keeps_the_old_version(
    models: dict[str, Path],
) -> None:
    rules = [locating_rule("boxes", "det", DETECT, size=64)]
    with InspectionRuntime(lambda _t, _p: None, lambda _v: None) as runtime:
        runtime.apply_policy(Policy(inspections=rules), {"det": ("1", models["det"])})
        assert runtime.health()["det"].loaded and runtime.health()["det"].error is None
        with pytest.raises(Exception, match=r"outputs \[3, 64, 64\]"):
            runtime.swap_model("det", "2", models["seg"])
        runtime.apply_policy(Policy(inspections=rules), {"det": ("2", models["seg"])})
        health = runtime.health()["det"]
        assert (health.loaded, health.version) == (True, "1")
        assert health.error is not None and "outputs [3, 64, 64]" in health.error
