"""/v1/nodes: the fleet, each node with its connection, generations, artifacts and health."""

import structlog
from fastapi import APIRouter, HTTPException

from fieldline.cloud.api.deps import AdminKey, ContextDep, OperatorKey, ViewerKey
from fieldline.cloud.api.models import LabelsUpdate, NodePublic
from fieldline.cloud.context import CloudContext
from fieldline.cloud.store import nodes as node_store
from fieldline.shared.clock import utcnow

router = APIRouter(prefix="/v1/nodes", tags=["nodes"])
log = structlog.get_logger(__name__)


def online(ctx: CloudContext, node: node_store.NodeRow) -> bool:
    """A stream is open and the node was heard within offline_after_s: a blackholed link keeps
    its stream open here for minutes, but its heartbeats stop."""
    if not ctx.sessions.connected(node.id) or node.last_seen is None:
        return False
    return (utcnow() - node.last_seen).total_seconds() <= ctx.settings.offline_after_s


def node_public(ctx: CloudContext, node: node_store.NodeRow) -> NodePublic:
    observed = node.observed
    dp = node.health.dataplane if node.health else None
    return NodePublic(
        id=node.id,
        labels=node.labels,
        online=online(ctx, node),
        created=node.created,
        last_seen=node.last_seen,
        desired_generation=node.desired_generation,
        applied_generation=node.applied_generation,
        artifacts=observed.artifacts if observed else [],
        active=observed.active if observed else {},
        errors=observed.errors if observed else [],
        health=node.health,
        health_at=node.health_at,
        node_info=node.node_info,
        synced_seq=node.synced_seq,
        sync_backlog=dp.sync_backlog if dp else 0,
        sync_live_lag_ms=dp.sync_live_lag_ms if dp else None,
        revoked_at=node.revoked_at,
        tls=node.cert_sha256 is not None,
    )


@router.get("")
def list_nodes(ctx: ContextDep, _: ViewerKey) -> list[NodePublic]:
    return [node_public(ctx, n) for n in node_store.list_nodes(ctx.db)]


@router.get("/{node_id}")
def get_node(node_id: str, ctx: ContextDep, _: ViewerKey) -> NodePublic:
    try:
        return node_public(ctx, node_store.get_node(ctx.db, node_id=node_id))
    except node_store.NodeNotFound:
        raise HTTPException(404, f"node {node_id} not found") from None


@router.put("/{node_id}/labels")
def set_labels(node_id: str, body: LabelsUpdate, ctx: ContextDep, _: OperatorKey) -> NodePublic:
    try:
        node_store.set_labels(ctx.db, node_id=node_id, labels=body.labels)
    except node_store.NodeNotFound:
        raise HTTPException(404, f"node {node_id} not found") from None
    ctx.desired.refresh(node_id)
    return node_public(ctx, node_store.get_node(ctx.db, node_id=node_id))


@router.post("/{node_id}/revoke")
def revoke_node(node_id: str, ctx: ContextDep, key: AdminKey) -> NodePublic:
    """Refuse the node from now on (credential and certificate) and close its open tunnel."""
    try:
        node_store.revoke_node(ctx.db, node_id=node_id)
    except node_store.NodeNotFound:
        raise HTTPException(404, f"node {node_id} not found") from None
    ctx.sessions.revoke(node_id)
    log.warning("node revoked", node=node_id, by=key.id)
    return node_public(ctx, node_store.get_node(ctx.db, node_id=node_id))
