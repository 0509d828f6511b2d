"""Desired state per node: derived from the assignments and policies whose selectors match its labels,
overridden by the pins of a running rollout.

A node's generation grows by one whenever what it should run changes; connected nodes get
the new state pushed at once.
"""

from __future__ import annotations

import json
from typing import Any

import structlog

from fieldline.cloud.metrics import CloudMetrics
from fieldline.cloud.store import artifacts as artifact_store
from fieldline.cloud.store import nodes as node_store
from fieldline.cloud.store import policies as policy_store
from fieldline.cloud.store import rollouts as rollout_store
from fieldline.cloud.store.db import Database
from fieldline.cloud.tunnel.sessions import SessionRegistry
from fieldline.shared.proto import tunnel_pb2 as pb
from fieldline.shared.schemas import DesiredState, SignedManifest, selector_matches

log = structlog.get_logger(__name__)


class DesiredStateService:
    def __init__(self, db: Database, sessions: SessionRegistry, metrics: CloudMetrics):
        self.db = db
        self.sessions = sessions
        self.metrics = metrics

    def compute(
        self, labels: dict[str, str], node_id: str | None = None
    ) -> tuple[list[SignedManifest], dict[str, Any] | None]:
        """What a node with these labels should run: later assignments win per artifact name,
        and a running rollout's pins on this node win over both."""
        chosen: dict[str, str] = {}
        for a in artifact_store.list_assignments(self.db):
            if selector_matches(a.selector, labels):
                chosen[a.artifact_name] = a.artifact_version
        pinned_policy = None
        if node_id is not None:
            pinned, pinned_policy = rollout_store.pins_for(self.db, node_id=node_id)
            chosen.update(pinned)
        manifests = [
            artifact_store.get_artifact(self.db, name=name, version=version)
            for name, version in sorted(chosen.items())
        ]
        policy = pinned_policy or policy_store.policy_for(self.db, labels=labels)
        return manifests, policy

    def refresh(self, node_id: str) -> DesiredState:
        """Recompute one node's desired state; bump and push its generation if it changed."""
        node = node_store.get_node(self.db, node_id=node_id)
        manifests, policy = self.compute(node.labels, node_id)
        if node.desired is not None:
            current = DesiredState.model_validate_json(node.desired)
            if current.artifacts == manifests and current.policy == policy:
                return current
        desired = DesiredState(
            node_id=node_id,
            generation=node.desired_generation + 1,
            artifacts=manifests,
            policy=policy,
        )
        text = desired.model_dump_json()
        node_store.set_desired(
            self.db, node_id=node_id, generation=desired.generation, desired_json=text
        )
        log.info("desired state changed", node=node_id, generation=desired.generation)
        self.push(node_id, desired.generation, text)
        return desired

    def refresh_matching(self, selector: dict[str, str]) -> list[str]:
        """Refresh every node whose labels match; returns their ids."""
        matched = [
            n.id for n in node_store.list_nodes(self.db) if selector_matches(selector, n.labels)
        ]
        for node_id in matched:
            self.refresh(node_id)
        return matched

    def push(self, node_id: str, generation: int, desired_json: str) -> None:
        msg = pb.CloudMessage(
            desired=pb.DesiredStatePush(generation=generation, desired_json=desired_json)
        )
        if self.sessions.send(node_id, msg):
            self.metrics.desired_pushes.inc()

    def current_json(self, node_id: str) -> tuple[int, str]:
        """The node's desired state to send on connect (computed if it never had one)."""
        node = node_store.get_node(self.db, node_id=node_id)
        if node.desired is None:
            d = self.refresh(node_id)
            return d.generation, d.model_dump_json()
        return node.desired_generation, node.desired


def desired_json_for_node(db: Database, node_id: str) -> str | None:
    node = node_store.get_node(db, node_id=node_id)
    return node.desired


def assigned_sha256s(desired_json: str | None) -> set[str]:
    """The blobs a node may fetch: those named by its current desired state."""
    if not desired_json:
        return set()
    data = json.loads(desired_json)
    return {SignedManifest.model_validate(m).manifest.sha256 for m in data.get("artifacts", [])}
