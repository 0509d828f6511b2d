"""Identifiers and secrets: prefixed random ids, secret tokens and their stored hashes."""

from __future__ import annotations

import hashlib
import hmac
import secrets


def new_id(prefix: str) -> str:
    """A short random id with a readable prefix, e.g. "node_3f9c2a1b7d4e"."""
    return f"{prefix}_{secrets.token_hex(6)}"


def new_secret(nbytes: int = 32) -> str:
    """A URL-safe random secret for keys, tokens and node credentials."""
    return secrets.token_urlsafe(nbytes)


def hash_secret(secret: str) -> str:
    """The form a secret is stored in: sha256 hex (secrets are 256-bit random, so no salt)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    """Constant-time check of a presented secret against its stored hash."""
    return hmac.compare_digest(hash_secret(secret), stored_hash)
