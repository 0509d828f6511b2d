"""/v1/assignments: put an artifact on every node whose labels match a selector."""

from fastapi import APIRouter, HTTPException

from fieldline.cloud.api.deps import ContextDep, OperatorKey, ViewerKey
from fieldline.cloud.api.models import AssignmentCreate, AssignmentPublic
from fieldline.cloud.store import artifacts as artifact_store

router = APIRouter(prefix="/v1/assignments", tags=["assignments"])


@router.post("", status_code=201)
def create_assignment(body: AssignmentCreate, ctx: ContextDep, _: OperatorKey) -> AssignmentPublic:
    name, _sep, version = body.artifact.partition("@")
    try:
        artifact_store.get_artifact(ctx.db, name=name, version=version)
    except artifact_store.ArtifactNotFound:
        raise HTTPException(404, f"artifact {body.artifact} not found") from None
    assignment_id = artifact_store.add_assignment(
        ctx.db, name=name, version=version, selector=body.selector
    )
    nodes = ctx.desired.refresh_matching(body.selector)
    return AssignmentPublic(
        id=assignment_id, artifact=body.artifact, selector=body.selector, nodes=nodes
    )


@router.get("")
def list_assignments(ctx: ContextDep, _: ViewerKey) -> list[AssignmentPublic]:
    return [
        AssignmentPublic(
            id=a.id,
            artifact=f"{a.artifact_name}@{a.artifact_version}",
            selector=a.selector,
            nodes=[],
        )
        for a in artifact_store.list_assignments(ctx.db)
    ]
