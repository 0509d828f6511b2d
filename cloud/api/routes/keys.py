"""/v1/keys: API keys (admin only); the secret is shown once."""

from fastapi import APIRouter

from fieldline.cloud.api.deps import AdminKey, ContextDep
from fieldline.cloud.api.models import KeyCreate, KeyCreated
from fieldline.cloud.store import auth as auth_store

router = APIRouter(prefix="/v1/keys", tags=["keys"])


@router.post("", status_code=201)
def create_key(body: KeyCreate, ctx: ContextDep, _: AdminKey) -> KeyCreated:
    key, secret = auth_store.create_api_key(ctx.db, name=body.name, role=body.role)
    return KeyCreated(id=key.id, name=key.name, role=key.role, key=secret)
