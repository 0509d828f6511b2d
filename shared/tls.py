"""What cloud and edge agree on for TLS: CA fingerprints and the enrollment token's format.

A token is `flt_<secret>` on a plain cloud. With TLS it is `flt_<secret>.<pin>.<port>`: the
pin is the SHA-256 of the cloud CA certificate (DER, unpadded base64url), which the edge
checks on first contact, and port is the cloud's enrollment listener. The cloud stores and
checks only the secret part, so both forms are the same token to it.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

TOKEN_PREFIX = "flt_"
_SECRET_RE = re.compile(r"^flt_[A-Za-z0-9_-]{16,128}$")
_PIN_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")
MAX_TOKEN_CHARS = 256


class TokenFormatError(ValueError):
    """A string that is not an enrollment token; the message says what is wrong."""


@dataclass(frozen=True)
class EnrollmentToken:
    secret: str  # what the cloud checks ("flt_...")
    ca_pin: str | None = None  # base64url SHA-256 of the CA certificate's DER
    enroll_port: int | None = None

    def __str__(self) -> str:
        if self.ca_pin is None:
            return self.secret
        return f"{self.secret}.{self.ca_pin}.{self.enroll_port}"


def parse_token(text: str) -> EnrollmentToken:
    """Split a token into its secret, CA pin and enrollment port (the last two optional)."""
    text = text.strip()
    if len(text) > MAX_TOKEN_CHARS:
        raise TokenFormatError("enrollment token is too long")
    parts = text.split(".")
    if not _SECRET_RE.match(parts[0]):
        raise TokenFormatError("not an enrollment token (expected flt_...)")
    if len(parts) == 1:
        return EnrollmentToken(parts[0])
    if len(parts) != 3 or not _PIN_RE.match(parts[1]) or not parts[2].isdigit():
        raise TokenFormatError("malformed enrollment token: expected flt_SECRET.PIN.PORT")
    port = int(parts[2])
    if not 0 < port < 65536:
        raise TokenFormatError(f"enrollment token names port {port}, outside 1..65535")
    return EnrollmentToken(parts[0], parts[1], port)


def cert_pin(cert: x509.Certificate) -> str:
    """The pin of a certificate: unpadded base64url of SHA-256 over its DER encoding."""
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def cert_sha256_hex(cert: x509.Certificate) -> str:
    """The same digest as hex, the form `openssl x509 -fingerprint -sha256` prints (sans colons)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def load_pem_certs(data: bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle, in order."""
    return x509.load_pem_x509_certificates(data)
