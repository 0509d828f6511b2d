"""/v1/audit: the audit trail of state-changing calls, newest first (admin only)."""

from typing import Annotated

from fastapi import APIRouter, Query

from fieldline.cloud.api.deps import AdminKey, ContextDep
from fieldline.cloud.api.models import AuditPublic
from fieldline.cloud.store import audit as audit_store

router = APIRouter(prefix="/v1/audit", tags=["audit"])
MAX_LIMIT = 1000
MAX_INT64 = 2**63 - 1


@router.get("")
def list_audit(
    ctx: ContextDep,
    _: AdminKey,
    key_id: Annotated[str | None, Query(max_length=128)] = None,
    before_id: Annotated[int | None, Query(ge=1, le=MAX_INT64)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> list[AuditPublic]:
    rows = audit_store.query(ctx.db, key_id=key_id, before_id=before_id, limit=limit)
    return [AuditPublic(**vars(r)) for r in rows]
