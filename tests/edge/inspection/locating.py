"""What the detect and segment tests share: the fixed-weight models exported once, and a runtime
that runs rules on them and hands back the verdicts as published (JSON round trip)."""

from __future__ import annotations

from pathlib import Path

from fieldline.edge.inspection.runtime import InspectionRuntime, Verdict
from fieldline.shared.policy import InspectionRule, Policy, Postprocess, Preprocess

RESULT_TOPIC = "line1/verdicts"
TIMEOUT_S = 30


def locating_rule(name: str, model: str, post: Postprocess, size: int = 320) -> InspectionRule:
    """A rule that letterboxes frames to size x size and post-processes them as `post` says."""
    return InspectionRule(
        name=name,
        topic="line1/camera/+",
        model=model,
        result_topic=RESULT_TOPIC,
        preprocess=Preprocess(resize=(size, size), resize_mode="letterbox"),
        postprocess=post,
    )


def inspect(models: dict[str, Path], rules: list[InspectionRule], frames: list[bytes]) -> list:
    """Run each frame under rules[0] (others only load) -> verdicts as a subscriber reads them."""
    published: list[bytes] = []
    runtime = InspectionRuntime(lambda _t, p: published.append(p), lambda _v: None)
    with runtime:
        runtime.apply_policy(Policy(inspections=rules), {n: ("1", p) for n, p in models.items()})
        futures = [runtime.submit(rules[0].name, f, publish=True) for f in frames]
        for future in futures:
            future.result(timeout=TIMEOUT_S)
    return [Verdict.from_json(p) for p in published]
