"""API keys and enrollment tokens: both stored only as hashes; listed, expired and revoked here."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from fieldline.cloud.store.db import Database
from fieldline.shared.clock import utcnow
from fieldline.shared.ids import hash_secret, new_id, new_secret


class Role(StrEnum):
    viewer = "viewer"
    operator = "operator"
    admin = "admin"

    @property
    def rank(self) -> int:
        return {"viewer": 0, "operator": 1, "admin": 2}[self.value]


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    role: Role
    created: datetime | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None

    def usable(self, now: datetime) -> bool:
        """Neither revoked nor past its expiry."""
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


class TokenRefused(Exception):
    """An enrollment token that is unknown, used, revoked or expired; the message says which."""

    def __init__(self, message: str, token_id: str | None = None):
        super().__init__(message)
        self.token_id = token_id  # None when the token is unknown


class NotFound(Exception):
    """No key or token with that id."""


class LastAdminKey(Exception):
    """Revoking this key would leave no usable admin key (nobody could make a new one)."""


def _when(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _key(r: dict[str, object]) -> ApiKey:
    return ApiKey(
        id=str(r["id"]),
        name=str(r["name"]),
        role=Role(str(r["role"])),
        created=_when(r["created"]),  # type: ignore[arg-type]
        expires_at=_when(r.get("expires_at")),  # type: ignore[arg-type]
        revoked_at=_when(r.get("revoked_at")),  # type: ignore[arg-type]
    )


def create_api_key(
    db: Database,
    *,
    name: str,
    role: Role,
    secret: str | None = None,
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """Create a key (random unless a secret is given); returns it and its secret (shown once,
    stored hashed)."""
    secret = secret or f"flk_{new_secret()}"
    now = utcnow()
    key = ApiKey(id=new_id("key"), name=name, role=role, created=now, expires_at=expires_at)
    with db.write() as d:
        d["api_keys"].insert(
            {
                "id": key.id,
                "name": name,
                "role": role.value,
                "key_hash": hash_secret(secret),
                "created": now.isoformat(),
                "expires_at": expires_at.isoformat() if expires_at else None,
                "revoked_at": None,
            }
        )
    return key, secret


def lookup_api_key(db: Database, *, secret: str) -> ApiKey | None:
    """The key with this secret, usable or not (the caller says why one is refused)."""
    with db.read() as d:
        rows = list(d["api_keys"].rows_where("key_hash = ?", [hash_secret(secret)]))
    return _key(rows[0]) if rows else None


def find_api_key(db: Database, *, secret: str) -> ApiKey | None:
    """The usable key with this secret; None when unknown, revoked or expired."""
    key = lookup_api_key(db, secret=secret)
    return key if key is not None and key.usable(utcnow()) else None


def count_api_keys(db: Database) -> int:
    with db.read() as d:
        return d["api_keys"].count


def list_api_keys(db: Database) -> list[ApiKey]:
    """Every key, oldest first (revoked and expired ones too); never a secret or its hash."""
    with db.read() as d:
        return [_key(r) for r in d["api_keys"].rows_where(order_by="created, id")]


def revoke_api_key(db: Database, *, key_id: str) -> ApiKey:
    """Revoke at once (the next request with it gets 401); refuses the last usable admin key."""
    now = utcnow()
    with db.write() as d:
        rows = list(d["api_keys"].rows_where("id = ?", [key_id]))
        if not rows:
            raise NotFound(f"no API key {key_id}")
        key = _key(rows[0])
        if key.revoked_at is not None:
            return key
        if key.role is Role.admin and key.usable(now):
            admins = [
                k
                for k in map(_key, d["api_keys"].rows_where("role = ?", [Role.admin.value]))
                if k.usable(now) and k.id != key_id
            ]
            if not admins:
                raise LastAdminKey(
                    f"{key_id} is the last usable admin key: create another admin key first"
                )
        d["api_keys"].update(key_id, {"revoked_at": now.isoformat()})
    return _key({**rows[0], "revoked_at": now.isoformat()})


class TokenState(StrEnum):
    active = "active"
    used = "used"
    expired = "expired"
    revoked = "revoked"


@dataclass(frozen=True)
class EnrollmentToken:
    id: str
    labels: dict[str, str]
    expires_at: datetime
    created: datetime | None = None
    used_at: datetime | None = None
    node_id: str | None = None
    revoked_at: datetime | None = None

    def state(self, now: datetime) -> TokenState:
        if self.revoked_at is not None:
            return TokenState.revoked
        if self.used_at is not None:
            return TokenState.used
        return TokenState.expired if self.expires_at <= now else TokenState.active


def _token(r: dict[str, object]) -> EnrollmentToken:
    return EnrollmentToken(
        id=str(r["id"]),
        labels=json.loads(str(r["labels"])),
        expires_at=datetime.fromisoformat(str(r["expires_at"])),
        created=_when(r["created"]),  # type: ignore[arg-type]
        used_at=_when(r["used_at"]),  # type: ignore[arg-type]
        node_id=r["node_id"],  # type: ignore[arg-type]
        revoked_at=_when(r.get("revoked_at")),  # type: ignore[arg-type]
    )


def create_token(
    db: Database, *, labels: dict[str, str], ttl_s: int
) -> tuple[EnrollmentToken, str]:
    secret = f"flt_{new_secret()}"
    now = utcnow()
    tok = EnrollmentToken(
        id=new_id("tok"), labels=labels, expires_at=now + timedelta(seconds=ttl_s), created=now
    )
    with db.write() as d:
        d["enrollment_tokens"].insert(
            {
                "id": tok.id,
                "token_hash": hash_secret(secret),
                "labels": json.dumps(labels),
                "created": now.isoformat(),
                "expires_at": tok.expires_at.isoformat(),
                "used_at": None,
                "node_id": None,
                "revoked_at": None,
            }
        )
    return tok, secret


def list_tokens(db: Database) -> list[EnrollmentToken]:
    """Every enrollment token, oldest first; never a secret or its hash."""
    with db.read() as d:
        return [_token(r) for r in d["enrollment_tokens"].rows_where(order_by="created, id")]


def revoke_token(db: Database, *, token_id: str) -> EnrollmentToken:
    """Cancel a token so it can no longer enroll (a used one stays used: its node is revoked
    through /v1/nodes)."""
    now = utcnow()
    with db.write() as d:
        rows = list(d["enrollment_tokens"].rows_where("id = ?", [token_id]))
        if not rows:
            raise NotFound(f"no enrollment token {token_id}")
        if rows[0].get("revoked_at") is None:
            d["enrollment_tokens"].update(token_id, {"revoked_at": now.isoformat()})
            rows[0]["revoked_at"] = now.isoformat()
    return _token(rows[0])


def consume_token(db: Database, *, secret: str, node_id: str) -> dict[str, str]:
    """Mark the token used by node_id and return its labels; atomic, so one use wins."""
    now = utcnow()
    with db.write() as d:
        rows = list(d["enrollment_tokens"].rows_where("token_hash = ?", [hash_secret(secret)]))
        if not rows:
            raise TokenRefused("unknown enrollment token")
        tok = _token(rows[0])
        state = tok.state(now)
        if state is not TokenState.active:
            already = "already " if state is TokenState.used else ""
            raise TokenRefused(f"enrollment token {already}{state.value}", tok.id)
        d["enrollment_tokens"].update(tok.id, {"used_at": now.isoformat(), "node_id": node_id})
    return tok.labels
