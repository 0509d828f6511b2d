"""/v1/tokens: single-use, expiring enrollment tokens that carry a node's labels."""

from fastapi import APIRouter

from fieldline.cloud.api.deps import ContextDep, OperatorKey
from fieldline.cloud.api.models import TokenCreate, TokenCreated
from fieldline.cloud.store import auth as auth_store
from fieldline.shared.tls import EnrollmentToken

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])


@router.post("", status_code=201)
def create_token(body: TokenCreate, ctx: ContextDep, _: OperatorKey) -> TokenCreated:
    ttl = body.ttl_s or ctx.settings.default_token_ttl_s
    tok, secret = auth_store.create_token(ctx.db, labels=body.labels, ttl_s=ttl)
    # With TLS the token also carries the CA pin and the enrollment port (shared/tls.py).
    token = EnrollmentToken(secret, ctx.tls_pin, ctx.enroll_port if ctx.tls_pin else None)
    return TokenCreated(id=tok.id, token=str(token), labels=tok.labels, expires_at=tok.expires_at)
