"""/v1/policies: apply a policy document to the nodes matching a selector."""

from fastapi import APIRouter

from fieldline.cloud.api.deps import ContextDep, OperatorKey
from fieldline.cloud.api.models import PolicyApplied, PolicyApply
from fieldline.cloud.store import policies as policy_store

router = APIRouter(prefix="/v1/policies", tags=["policies"])


@router.post("", status_code=201)
def apply_policy(body: PolicyApply, ctx: ContextDep, _: OperatorKey) -> PolicyApplied:
    """The body's policy is validated by its schema (422 with the fields that are wrong)."""
    policy = body.policy
    policy_id = policy_store.add_policy(
        ctx.db, name=policy.name, document=policy.model_dump(mode="json"), selector=body.selector
    )
    nodes = ctx.desired.refresh_matching(body.selector)
    return PolicyApplied(id=policy_id, name=policy.name, selector=body.selector, nodes=nodes)
