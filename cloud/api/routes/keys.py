"""/v1/keys: API keys (admin only): create (the secret is shown once), list, revoke."""

from datetime import timedelta

from fastapi import APIRouter, HTTPException

from fieldline.cloud.api.deps import AdminKey, ContextDep
from fieldline.cloud.api.models import KeyCreate, KeyCreated, KeyPublic
from fieldline.cloud.store import auth as auth_store
from fieldline.shared.clock import utcnow

router = APIRouter(prefix="/v1/keys", tags=["keys"])


def _public(key: auth_store.ApiKey) -> KeyPublic:
    now = utcnow()
    state = "revoked" if key.revoked_at else ("active" if key.usable(now) else "expired")
    return KeyPublic(
        id=key.id,
        name=key.name,
        role=key.role,
        created=key.created,
        expires_at=key.expires_at,
        revoked_at=key.revoked_at,
        state=state,
    )


@router.post("", status_code=201)
def create_key(body: KeyCreate, ctx: ContextDep, _: AdminKey) -> KeyCreated:
    expires = utcnow() + timedelta(seconds=body.expires_in_s) if body.expires_in_s else None
    key, secret = auth_store.create_api_key(
        ctx.db, name=body.name, role=body.role, expires_at=expires
    )
    return KeyCreated(id=key.id, name=key.name, role=key.role, key=secret, expires_at=expires)


@router.get("")
def list_keys(ctx: ContextDep, _: AdminKey) -> list[KeyPublic]:
    return [_public(k) for k in auth_store.list_api_keys(ctx.db)]


@router.delete("/{key_id}")
def revoke_key(key_id: str, ctx: ContextDep, _: AdminKey) -> KeyPublic:
    """Revoked at once: the next request with the key gets 401."""
    try:
        return _public(auth_store.revoke_api_key(ctx.db, key_id=key_id))
    except auth_store.NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except auth_store.LastAdminKey as exc:
        raise HTTPException(409, str(exc)) from None
