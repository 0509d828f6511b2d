"""The health gate on one node: applied or not, loaded, error rate, p95, local rollbacks."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from fieldline.cloud.rollouts.gate import Outcome, Target, check_node
from fieldline.cloud.rollouts.spec import HealthGate
from fieldline.cloud.store.nodes import NodeRow
from fieldline.shared.health import LocalRollback, ModelHealth, NodeHealth
from fieldline.shared.schemas import ArtifactState, ArtifactStatus, NodeInfo, ObservedState

TARGET = Target("detector", "2.0", "onnx", None)
GATE = HealthGate(soak_s=1, max_error_rate=0.05, max_p95_ms=50, min_requests=10)


def node(
    applied: int = 5,
    active: str | None = "2.0",
    model: ModelHealth | None = None,
    **observed: object,
) -> NodeRow:
    obs = ObservedState(
        applied_generation=applied,
        active={"detector": active} if active else {},
        **observed,  # type: ignore[arg-type]
    )
    health = NodeHealth(models={"detector": model} if model else {})
    return NodeRow(
        id="node_1",
        labels={},
        node_info=NodeInfo(),
        created=datetime.now(UTC),
        last_seen=datetime.now(UTC),
        desired_generation=5,
        desired=None,
        applied_generation=applied,
        observed_json=obs.model_dump_json(),
        health_json=health.model_dump_json(),
        synced_seq=0,
    )


def healthy(**kw: object) -> ModelHealth:
    base: dict[str, object] = {
        "name": "detector",
        "version": "2.0",
        "loaded": True,
        "serving": True,
        "window_requests": 100,
        "window_errors": 1,
        "error_rate": 0.01,
        "p95_latency_ms": 12.0,
    }
    base.update(kw)
    return ModelHealth.model_validate(base)


def test_not_yet_applied_is_applying() -> None:
    assert check_node(TARGET, GATE, node(applied=4), 5).outcome == Outcome.applying


def test_applied_without_the_new_versions_health_waits() -> None:
    check = check_node(TARGET, GATE, node(model=healthy(version="1.0")), 5)
    assert check.outcome == Outcome.applied


def test_healthy_model_holds_the_gate() -> None:
    assert check_node(TARGET, GATE, node(model=healthy()), 5).outcome == Outcome.healthy


def test_each_broken_limit_fails_with_its_reason() -> None:
    cases = {
        "did not load": healthy(loaded=False, error="bad protobuf"),
        "error rate 50.0%": healthy(error_rate=0.5, window_errors=50),
        "p95 latency 80.0 ms": healthy(p95_latency_ms=80.0),
    }
    for says, model in cases.items():
        check = check_node(TARGET, GATE, node(model=model), 5)
        assert check.outcome == Outcome.failed and says in check.reason, (says, check)


def test_too_few_requests_neither_fail_nor_pass() -> None:
    check = check_node(TARGET, GATE, node(model=healthy(window_requests=3, error_rate=1.0)), 5)
    assert check.outcome == Outcome.applied and "3 of 10" in check.reason


def test_local_rollback_and_install_failure_fail_at_once() -> None:
    rb = LocalRollback(
        name="detector",
        from_version="2.0",
        to_version="1.0",
        sha256="a" * 64,
        reason="failed to load: x",
    )
    check = check_node(TARGET, GATE, node(applied=4, active="1.0", local_rollbacks=[rb]), 5)
    assert check.outcome == Outcome.failed and "rolled back on the node to 1.0" in check.reason
    bad = ArtifactStatus(
        name="detector",
        version="2.0",
        sha256="b" * 64,
        state=ArtifactState.failed,
        error="sha256 mismatch",
    )
    check = check_node(TARGET, GATE, node(applied=4, active="1.0", artifacts=[bad]), 5)
    assert check.outcome == Outcome.failed and "sha256 mismatch" in check.reason


def test_applied_generation_with_another_version_fails() -> None:
    check = check_node(TARGET, GATE, node(active="1.0", model=healthy()), 5)
    assert check.outcome == Outcome.failed and "runs detector@1.0" in check.reason


def test_file_artifacts_pass_once_applied() -> None:
    target = Target("config", "2.0", "file", None)
    row = node()
    row_obs = ObservedState(applied_generation=5, active={"config": "2.0"})
    row = dataclasses.replace(row, observed_json=row_obs.model_dump_json())
    assert check_node(target, GATE, row, 5).outcome == Outcome.healthy
