"""One sample's model output -> Decision, by the rule's mode (classify, anomaly, detect, segment)."""

from __future__ import annotations

import numpy as np

from fieldline.edge.inspection.detect import decide_detect
from fieldline.edge.inspection.preprocess import Decision, Geometry, postprocess_output
from fieldline.edge.inspection.segment import decide_segment
from fieldline.shared.policy import Postprocess


def decide(output: np.ndarray, post: Postprocess, geometry: Geometry | None) -> Decision:
    """Dispatch on post.mode; `geometry` maps input pixels back to the original image."""
    if post.mode == "detect":
        return decide_detect(output, post, geometry)
    if post.mode == "segment":
        return decide_segment(output, post, geometry)
    return postprocess_output(output, post)
