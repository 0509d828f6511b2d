"""/v1/tokens: single-use, expiring enrollment tokens that carry a node's labels; create, list,
revoke."""

from fastapi import APIRouter, HTTPException

from fieldline.cloud.api.deps import ContextDep, OperatorKey
from fieldline.cloud.api.models import TokenCreate, TokenCreated, TokenPublic
from fieldline.cloud.store import auth as auth_store
from fieldline.shared.clock import utcnow
from fieldline.shared.tls import EnrollmentToken

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])


def _public(tok: auth_store.EnrollmentToken) -> TokenPublic:
    return TokenPublic(
        id=tok.id,
        labels=tok.labels,
        created=tok.created,
        expires_at=tok.expires_at,
        used_at=tok.used_at,
        node_id=tok.node_id,
        revoked_at=tok.revoked_at,
        state=tok.state(utcnow()),
    )


@router.post("", status_code=201)
def create_token(body: TokenCreate, ctx: ContextDep, _: OperatorKey) -> TokenCreated:
    ttl = body.ttl_s or ctx.settings.default_token_ttl_s
    tok, secret = auth_store.create_token(ctx.db, labels=body.labels, ttl_s=ttl)
    # With TLS the token also carries the CA pin and the enrollment port (shared/tls.py).
    token = EnrollmentToken(secret, ctx.tls_pin, ctx.enroll_port if ctx.tls_pin else None)
    return TokenCreated(id=tok.id, token=str(token), labels=tok.labels, expires_at=tok.expires_at)


@router.get("")
def list_tokens(ctx: ContextDep, _: OperatorKey) -> list[TokenPublic]:
    return [_public(t) for t in auth_store.list_tokens(ctx.db)]


@router.delete("/{token_id}")
def revoke_token(token_id: str, ctx: ContextDep, _: OperatorKey) -> TokenPublic:
    """Revoked at once: the token can no longer enroll a node."""
    try:
        return _public(auth_store.revoke_token(ctx.db, token_id=token_id))
    except auth_store.NotFound as exc:
        raise HTTPException(404, str(exc)) from None
