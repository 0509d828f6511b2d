"""The node's TLS identity: its own key and CSR, pinning the cloud CA on first contact, and the
gRPC channel credentials built from what enrollment stored.

First contact: the token carries the SHA-256 pin of the cloud's CA. The edge opens a TLS
connection without trusting anything yet, takes the certificate chain the cloud presents, and
keeps the CA whose digest equals the pin; from then on gRPC verifies the cloud against that CA
alone. A cloud whose chain holds no such CA is refused before any secret is sent.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fieldline.shared.tls import cert_pin, load_pem_certs

PIN_TIMEOUT_S = 10.0


class PinError(Exception):
    """The cloud's certificate chain holds no CA matching the pin, or it cannot be read."""


@dataclass(frozen=True)
class NodeTls:
    """What the tunnel needs for mutual TLS (PEM bytes); kept in the edge store (mode 0600)."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes


def new_key_and_csr(hostname: str) -> tuple[bytes, bytes]:
    """A fresh EC P-256 key (PEM) and a CSR for it; the cloud sets the subject to the node id."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64] or "edge")]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def cert_matches_key(cert_pem: bytes, key_pem: bytes) -> bool:
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    return bool(cert.public_key() == key.public_key())


def _chain_der(sock: ssl.SSLSocket) -> list[bytes]:
    getter = getattr(sock, "get_unverified_chain", None)  # public from Python 3.13
    if getter is not None:
        return [bytes(c) for c in getter()]
    sslobj = getattr(sock, "_sslobj", None)
    chain = sslobj.get_unverified_chain() if sslobj is not None else None  # 3.10-3.12
    if chain is None:
        leaf = sock.getpeercert(binary_form=True)
        return [leaf] if leaf else []
    return [c.public_bytes(ssl._ssl.ENCODING_DER) for c in chain]  # type: ignore[attr-defined]


def presented_chain(
    host: str, port: int, timeout_s: float = PIN_TIMEOUT_S
) -> list[x509.Certificate]:
    """The certificates a TLS server presents, read without verifying them (the pin decides)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            ders = _chain_der(tls)
    except (OSError, ssl.SSLError) as exc:
        raise PinError(f"cannot open TLS to {host}:{port}: {exc}") from exc
    return [x509.load_der_x509_certificate(d) for d in ders]


def pinned_ca(chain: list[x509.Certificate], pin: str) -> x509.Certificate:
    """The CA certificate in the chain whose pin matches, or PinError."""
    for cert in chain:
        if cert_pin(cert) == pin:
            try:
                is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
            except x509.ExtensionNotFound:
                is_ca = False
            if not is_ca:
                raise PinError("the pinned certificate is not a CA certificate")
            return cert
    raise PinError(
        "the cloud presented no certificate matching the token's CA pin: "
        "a different cloud, or someone in between"
    )


def fetch_pinned_ca(host: str, port: int, pin: str) -> bytes:
    """Connect, find the pinned CA in the presented chain, return it as PEM."""
    return pinned_ca(presented_chain(host, port), pin).public_bytes(serialization.Encoding.PEM)


def check_ca_file(pem: bytes, pin: str | None) -> bytes:
    """A CA given as a file: must hold a certificate, and match the pin when there is one."""
    try:
        certs = load_pem_certs(pem)
    except ValueError as exc:
        raise PinError(f"the cloud CA file is not PEM: {exc}") from exc
    if pin is not None:
        pinned_ca(certs, pin)
    return pem


def channel_credentials(ca_pem: bytes, identity: NodeTls | None = None) -> grpc.ChannelCredentials:
    """Verify the cloud against this CA only; present the node certificate when given."""
    if identity is None:
        return grpc.ssl_channel_credentials(root_certificates=ca_pem)
    return grpc.ssl_channel_credentials(
        root_certificates=identity.ca_pem,
        private_key=identity.key_pem,
        certificate_chain=identity.cert_pem,
    )


def channel_options(server_name: str | None) -> list[tuple[str, str]]:
    return [("grpc.ssl_target_name_override", server_name)] if server_name else []
