"""The health gate, node by node: has the node applied the rollout's version, and does what it
reports about its models hold the gate? Pure functions over what the nodes reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from fieldline.cloud.rollouts.spec import HealthGate, RolloutSpec
from fieldline.cloud.store.nodes import NodeRow
from fieldline.shared.health import LocalRollback, ModelHealth, NodeHealth
from fieldline.shared.schemas import ArtifactState, ObservedState

# Kinds whose artifacts are models the edge loads; "file" artifacts have no model health.
MODEL_KINDS = frozenset({"onnx", "llm"})


class Outcome(StrEnum):
    applying = "applying"  # not on the new version yet
    applied = "applied"  # on it, but its health does not yet show the gate holds
    healthy = "healthy"  # on it, and the gate holds now
    failed = "failed"


@dataclass(frozen=True)
class NodeCheck:
    outcome: Outcome
    reason: str = ""


@dataclass(frozen=True)
class Target:
    """What the rollout puts on a node."""

    artifact_name: str | None
    artifact_version: str | None
    artifact_kind: str | None
    policy_name: str | None

    @classmethod
    def of(cls, spec: RolloutSpec, artifact_kind: str | None) -> Target:
        return cls(spec.artifact_name, spec.artifact_version, artifact_kind, spec.policy_name)


def _rolled_back_from(rollbacks: list[LocalRollback], name: str, version: str) -> str | None:
    for r in rollbacks:
        if r.name == name and r.from_version == version:
            return f"rolled back on the node to {r.to_version}: {r.reason}"
    return None


def check_node(
    target: Target, gate: HealthGate, node: NodeRow, target_generation: int
) -> NodeCheck:
    """Where one node of a running wave stands."""
    observed = node.observed
    health = node.health
    name, version = target.artifact_name, target.artifact_version
    if name and version:
        for rollbacks in (
            health.local_rollbacks if health else [],
            observed.local_rollbacks if observed else [],
        ):
            why = _rolled_back_from(rollbacks, name, version)
            if why:
                return NodeCheck(Outcome.failed, why)
        for a in observed.artifacts if observed else []:
            if a.name == name and a.version == version and a.state == ArtifactState.failed:
                return NodeCheck(Outcome.failed, f"{name}@{version} failed: {a.error}")
    if observed is None or node.applied_generation < target_generation:
        errors = "; ".join(observed.errors[:2]) if observed and observed.errors else ""
        return NodeCheck(Outcome.applying, errors[:500])
    if name and observed.active.get(name) != version:
        return NodeCheck(
            Outcome.failed,
            f"applied generation {node.applied_generation} but runs "
            f"{name}@{observed.active.get(name, 'nothing')}",
        )
    return _gate(target, gate, health, observed)


def _gate(
    target: Target, gate: HealthGate, health: NodeHealth | None, observed: ObservedState
) -> NodeCheck:
    """Hold the gate against the freshest model health (the heartbeat's, else the observed)."""
    models = dict(observed.models)
    if health is not None:
        models.update(health.models)
    if target.artifact_name:
        mh = models.get(target.artifact_name)
        if mh is None or mh.version != target.artifact_version:
            if target.artifact_kind == "onnx" or (
                mh is not None and target.artifact_kind in MODEL_KINDS
            ):
                return NodeCheck(Outcome.applied, "waiting for the model's health report")
            return NodeCheck(Outcome.healthy)  # a file, or a model kind this edge does not report
        checked = [mh]
    else:  # a policy-only rollout: every model the node runs must hold the gate
        checked = list(models.values())
    for mh in checked:
        failed = _model_fails(gate, mh)
        if failed:
            return NodeCheck(Outcome.failed, failed)
    for mh in checked:
        if gate.min_requests and mh.window_requests < gate.min_requests:
            return NodeCheck(
                Outcome.applied,
                f"{mh.name}: {mh.window_requests} of {gate.min_requests} requests served",
            )
    return NodeCheck(Outcome.healthy)


def _model_fails(gate: HealthGate, mh: ModelHealth) -> str | None:
    label = f"{mh.name}@{mh.version}"
    if gate.require_loaded and not mh.loaded:
        return f"{label} did not load: {mh.error or 'not loaded'}"[:1000]
    enough = mh.window_requests > 0 and mh.window_requests >= gate.min_requests
    if gate.max_error_rate is not None and enough and mh.error_rate > gate.max_error_rate:
        return (
            f"{label} error rate {mh.error_rate:.1%} over {mh.window_requests} requests "
            f"(last {mh.window_s:.0f} s) exceeds {gate.max_error_rate:.1%}"
        )
    if (
        gate.max_p95_ms is not None
        and mh.p95_latency_ms is not None
        and enough
        and mh.p95_latency_ms > gate.max_p95_ms
    ):
        return f"{label} p95 latency {mh.p95_latency_ms:.1f} ms exceeds {gate.max_p95_ms:g} ms"
    return None
