"""Dependencies of the admin API routes: the cloud context and the caller's key and role."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fieldline.cloud.api.guard import SCOPE_KEY
from fieldline.cloud.context import CloudContext
from fieldline.cloud.store import auth as auth_store
from fieldline.cloud.store.auth import ApiKey, Role

_bearer = HTTPBearer(auto_error=False)


def get_context(request: Request) -> CloudContext:
    ctx: CloudContext = request.app.state.ctx
    return ctx


ContextDep = Annotated[CloudContext, Depends(get_context)]


def current_key(
    request: Request,
    ctx: ContextDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiKey:
    checked: ApiKey | None = request.scope.get(SCOPE_KEY)  # RequestGuard checked it already
    if checked is not None:
        return checked
    if creds is None or creds.scheme.lower() != "bearer":
        raise HTTPException(
            401,
            "missing API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    key = auth_store.find_api_key(ctx.db, secret=creds.credentials)
    if key is None:
        raise HTTPException(401, "unknown API key", headers={"WWW-Authenticate": "Bearer"})
    return key


def require(role: Role):  # type: ignore[no-untyped-def]
    """A dependency that lets keys of at least `role` through, 403 otherwise."""

    def check(key: Annotated[ApiKey, Depends(current_key)]) -> ApiKey:
        if key.role.rank < role.rank:
            raise HTTPException(
                403, f"this needs the {role.value} role; your key is {key.role.value}"
            )
        return key

    check.required_role = role  # type: ignore[attr-defined]  # read by the role-matrix tests
    return check


ViewerKey = Annotated[ApiKey, Depends(require(Role.viewer))]
OperatorKey = Annotated[ApiKey, Depends(require(Role.operator))]
AdminKey = Annotated[ApiKey, Depends(require(Role.admin))]
