"""Who is calling the tunnel: the node id from the caller's credential, never from a payload.

With TLS it comes from the client certificate (checked against the one the store recorded at
enrollment), without TLS from the bearer credential in the call metadata.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from fieldline.cloud.store import nodes as node_store
from fieldline.cloud.store.db import Database


@dataclass(frozen=True)
class Refusal:
    """Why a call is refused: the status and details it ends with."""

    code: grpc.StatusCode
    details: str


def bearer_identity(context: grpc.aio.ServicerContext) -> tuple[str, str] | None:
    """(node id, secret) from the call's "authorization: Bearer NODE.SECRET", if well-formed."""
    md = dict(context.invocation_metadata() or ())
    value = md.get("authorization", "")
    if not isinstance(value, str) or not value.startswith("Bearer "):
        return None
    node_id, _, secret = value[7:].partition(".")
    return (node_id, secret) if node_id and secret else None


def certificate_identity(context: grpc.aio.ServicerContext) -> tuple[str, str] | None:
    """(node id, certificate sha256) of the verified client certificate, if one was presented."""
    pem = context.auth_context().get("x509_pem_cert")
    if not pem:
        return None
    cert = x509.load_pem_x509_certificate(pem[0])
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return None
    der_sha = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
    return str(names[0].value), der_sha


def _identify_tls(
    db: Database, context: grpc.aio.ServicerContext, bearer: tuple[str, str] | None
) -> str | Refusal:
    # The TLS layer has verified the chain to our CA; the store decides whether this
    # certificate is the node's current one.
    found = certificate_identity(context)
    if found is None:
        return Refusal(
            grpc.StatusCode.UNAUTHENTICATED, "the tunnel requires the node's client certificate"
        )
    node_id, cert_sha = found
    if node_store.is_revoked(db, node_id=node_id):
        return Refusal(grpc.StatusCode.PERMISSION_DENIED, f"node {node_id} is revoked")
    if not node_store.certificate_matches(db, node_id=node_id, cert_sha256=cert_sha):
        return Refusal(
            grpc.StatusCode.UNAUTHENTICATED,
            "client certificate is not the one issued to this node",
        )
    if bearer is not None and (
        bearer[0] != node_id
        or not node_store.authenticate_node(db, node_id=bearer[0], secret=bearer[1])
    ):
        return Refusal(
            grpc.StatusCode.UNAUTHENTICATED,
            "the node credential does not match the client certificate",
        )
    return node_id


def identify(
    db: Database, context: grpc.aio.ServicerContext, *, tls: bool = False
) -> str | Refusal:
    """The calling node's id, or why it is refused (UNAUTHENTICATED, or PERMISSION_DENIED for
    a revoked node)."""
    bearer = bearer_identity(context)
    if tls:
        return _identify_tls(db, context, bearer)
    if bearer is None:
        return Refusal(grpc.StatusCode.UNAUTHENTICATED, "unknown or wrong node credential")
    # The secret is checked first, so only the node itself learns that it was revoked.
    verdict = node_store.check_secret(db, node_id=bearer[0], secret=bearer[1])
    if verdict == "revoked":
        return Refusal(grpc.StatusCode.PERMISSION_DENIED, f"node {bearer[0]} is revoked")
    if verdict != "ok":
        return Refusal(grpc.StatusCode.UNAUTHENTICATED, "unknown or wrong node credential")
    return bearer[0]


async def authenticate(
    db: Database, context: grpc.aio.ServicerContext, *, tls: bool = False
) -> str:
    """Return the calling node's id or abort the call with identify()'s refusal."""
    found = identify(db, context, tls=tls)
    if isinstance(found, Refusal):
        await context.abort(found.code, found.details)
    assert isinstance(found, str)
    return found
