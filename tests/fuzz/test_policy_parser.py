"""Fuzzing the policy parser (shared/policy.py): any YAML/JSON text or document either becomes
a Policy or is refused with PolicyError / ValidationError, and a Policy always round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from fieldline.shared.policy import Policy, PolicyError, load_policy, topic_matches
from tests.fuzz.conftest import LONG, QUICK, budget
from tests.fuzz.strategies import json_values

VALID = {
    "name": "line-a",
    "subscriptions": [{"topic": "plant1/line-a/sensor/#", "kind": "telemetry"}],
    "inspections": [
        {
            "name": "parts",
            "topic": "plant1/line-a/camera/+",
            "model": "classifier",
            "result_topic": "plant1/line-a/verdicts",
            "preprocess": {"decoder": "image", "resize": [32, 32]},
            "postprocess": {"labels": ["ok", "defect"], "defect_labels": ["defect"]},
        }
    ],
    "retention": {"max_rows": 1000, "max_bytes": 1048576},
    "sync_interval_s": 1.0,
}
topics = st.text(alphabet="ab/+#\x00 ", max_size=12)


@st.composite
def mutated_policy(draw: st.DrawFn) -> object:
    """The valid policy with one value somewhere replaced by a hostile one."""
    doc = yaml.safe_load(yaml.safe_dump(VALID))
    node: object = doc
    parent: object = None
    key: object = None
    for _ in range(draw(st.integers(1, 4))):
        if isinstance(node, dict) and node:
            k: object = draw(st.sampled_from(sorted(node)))
        elif isinstance(node, list) and node:
            k = draw(st.integers(0, len(node) - 1))
        else:
            break
        parent, key = node, k
        node = node[k]  # type: ignore[index]
        if not isinstance(node, dict | list):
            break
    if parent is not None:
        parent[key] = draw(json_values | topics)  # type: ignore[index]
    return doc


texts = st.text(max_size=300) | st.sampled_from(["a: &x [*x]", "!!python/object:os.system x", "{"])


def policy_target(counter: list[int], tmp: Path):  # type: ignore[no-untyped-def]
    @given(doc=mutated_policy() | json_values, text=texts, use_text=st.booleans())
    def run(doc: object, text: str, use_text: bool) -> None:
        counter[0] += 1
        try:
            if use_text:
                path = tmp / "policy.yaml"
                path.write_text(text)
                policy = load_policy(path)
            else:
                policy = Policy.model_validate(doc)
        except (PolicyError, ValidationError):
            return
        again = Policy.model_validate(policy.model_dump(mode="json"))
        assert again == policy
        for rule in policy.inspections:  # a validated filter never breaks matching
            topic_matches(rule.topic, "plant1/line-a/camera/x")

    return run


def test_policy_parser_quick(tmp_path: Path) -> None:
    counter = [0]
    budget(QUICK)(policy_target(counter, tmp_path))()
    assert counter[0] >= QUICK


@pytest.mark.slow
def test_policy_parser_10k(tmp_path: Path) -> None:
    counter = [0]
    budget(LONG)(policy_target(counter, tmp_path))()
    assert counter[0] >= LONG
