"""API keys and enrollment tokens: both stored only as hashes."""

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


class TokenRefused(Exception):
    """An enrollment token that is unknown, used or expired; the message says which."""


def create_api_key(
    db: Database, *, name: str, role: Role, secret: str | None = None
) -> tuple[ApiKey, str]:
    """Create a key (random unless a secret is given); returns it and its secret (shown once,
    stored hashed)."""
    secret = secret or f"flk_{new_secret()}"
    key = ApiKey(id=new_id("key"), name=name, role=role)
    with db.write() as d:
        d["api_keys"].insert(
            {
                "id": key.id,
                "name": name,
                "role": role.value,
                "key_hash": hash_secret(secret),
                "created": utcnow().isoformat(),
            }
        )
    return key, secret


def find_api_key(db: Database, *, secret: str) -> ApiKey | None:
    with db.read() as d:
        rows = list(d["api_keys"].rows_where("key_hash = ?", [hash_secret(secret)]))
    if not rows:
        return None
    r = rows[0]
    return ApiKey(id=r["id"], name=r["name"], role=Role(r["role"]))


def count_api_keys(db: Database) -> int:
    with db.read() as d:
        return d["api_keys"].count


@dataclass(frozen=True)
class EnrollmentToken:
    id: str
    labels: dict[str, str]
    expires_at: datetime


def create_token(
    db: Database, *, labels: dict[str, str], ttl_s: int
) -> tuple[EnrollmentToken, str]:
    secret = f"flt_{new_secret()}"
    now = utcnow()
    tok = EnrollmentToken(
        id=new_id("tok"), labels=labels, expires_at=now + timedelta(seconds=ttl_s)
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
            }
        )
    return tok, secret


def consume_token(db: Database, *, secret: str, node_id: str) -> dict[str, str]:
    """Mark the token used by node_id and return its labels; atomic, so one use wins."""
    now = utcnow()
    with db.write() as d:
        rows = list(d["enrollment_tokens"].rows_where("token_hash = ?", [hash_secret(secret)]))
        if not rows:
            raise TokenRefused("unknown enrollment token")
        row = rows[0]
        if row["used_at"] is not None:
            raise TokenRefused("enrollment token already used")
        if datetime.fromisoformat(row["expires_at"]) <= now:
            raise TokenRefused("enrollment token expired")
        d["enrollment_tokens"].update(row["id"], {"used_at": now.isoformat(), "node_id": node_id})
    labels: dict[str, str] = json.loads(row["labels"])
    return labels
