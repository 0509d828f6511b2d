"""Ed25519 signing of artifact manifests: key files, sign, verify."""

from __future__ import annotations

import base64
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fieldline.shared.private_file import write_private
from fieldline.shared.schemas import ArtifactManifest, SignedManifest


class SignatureError(Exception):
    """A signature that does not verify, or a key that does not load."""


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def save_private_key(key: Ed25519PrivateKey, path: Path) -> None:
    """Write the key as PEM with mode 0600 from the first byte on."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(path, pem)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key")
    return key


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The cloud's signing key: created on first start, loaded afterwards."""
    if path.exists():
        return load_private_key(path)
    key = generate_key()
    save_private_key(key, path)
    return key


def public_key_bytes(key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key that edges pin."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign_manifest(key: Ed25519PrivateKey, manifest: ArtifactManifest) -> SignedManifest:
    payload = manifest.canonical_json()
    signature = key.sign(payload.encode())
    return SignedManifest(payload=payload, signature=base64.b64encode(signature).decode())


def verify_manifest(public_key: bytes, signed: SignedManifest) -> ArtifactManifest:
    """Return the manifest if the signature verifies under the pinned key, else raise."""
    try:
        pub = Ed25519PublicKey.from_public_bytes(public_key)
        pub.verify(base64.b64decode(signed.signature, validate=True), signed.payload.encode())
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError(
            "manifest signature does not verify under the pinned cloud key"
        ) from exc
    return signed.manifest
