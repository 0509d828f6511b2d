"""The cloud's certificate authority and TLS material (`fieldline cloud serve --tls`).

On first start the cloud mints a CA (EC P-256) and a server certificate for its hostnames in
DATA/tls/; later starts load them and renew the server certificate when it nears expiry or a
hostname was added. Given certificate files replace the minted server certificate; node client
certificates are always issued by the cloud's own CA from the CSR an edge sends at enrollment.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fieldline.shared.config import CloudSettings
from fieldline.shared.private_file import write_private
from fieldline.shared.tls import cert_pin, cert_sha256_hex, load_pem_certs

log = structlog.get_logger(__name__)

CA_DAYS = 3650
SERVER_DAYS = 825
RENEW_BEFORE_DAYS = 30
CLOCK_SKEW = dt.timedelta(minutes=10)  # gateways' clocks drift; accept certs a bit early
MAX_CSR_BYTES = 16 * 1024
MIN_RSA_BITS = 2048
NODE_URI_PREFIX = "urn:fieldline:node:"

CA_KEY, CA_CERT = "ca.key", "ca.crt"
SERVER_KEY, SERVER_CERT = "server.key", "server.crt"


class PkiError(Exception):
    """Certificate files that do not load or match, or a CSR the CA will not sign."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def default_hostnames() -> list[str]:
    """Names every minted server certificate carries: loopback and this host's names."""
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname()]
    fqdn = socket.getfqdn()
    if fqdn not in names:
        names.append(fqdn)
    return names


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _san_names(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    names = {str(v) for v in san.get_values_for_type(x509.DNSName)}
    names |= {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    return names


class CertificateAuthority:
    """The CA that signs the cloud's server certificate and every node's client certificate."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate):
        self.key = key
        self.cert = cert

    @property
    def cert_pem(self) -> bytes:
        return _cert_pem(self.cert)

    @classmethod
    def load_or_create(
        cls, tls_dir: Path, *, common_name: str = "fieldline cloud CA"
    ) -> CertificateAuthority:
        tls_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(tls_dir, 0o700)
        key_path, cert_path = tls_dir / CA_KEY, tls_dir / CA_CERT
        if key_path.exists() and cert_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise PkiError(f"{key_path} is not an EC private key")
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if cert.public_key() != key.public_key():
                raise PkiError(f"{cert_path} does not belong to {key_path}")
            return cls(key, cert)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        write_private(key_path, _key_pem(key))
        cert_path.write_bytes(_cert_pem(cert))
        log.info("minted a CA", path=str(cert_path), sha256=cert_sha256_hex(cert))
        return cls(key, cert)

    def _leaf(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
        days: int,
        usage: x509.ObjectIdentifier,
        san: x509.SubjectAlternativeName,
    ) -> x509.Certificate:
        now = _now()
        not_after = min(now + dt.timedelta(days=days), self.cert.not_valid_after_utc)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(san, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue_server(self, hostnames: list[str]) -> tuple[bytes, x509.Certificate]:
        """A fresh server key and certificate for these names (DNS names or IP addresses)."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
        cert = self._leaf(
            subject, key.public_key(), SERVER_DAYS, ExtendedKeyUsageOID.SERVER_AUTH, _san(hostnames)
        )
        return _key_pem(key), cert

    def issue_node(self, csr_pem: bytes, node_id: str, *, days: int) -> x509.Certificate:
        """Sign a node's CSR: the subject is set to the node id, whatever the CSR asked for."""
        if len(csr_pem) > MAX_CSR_BYTES:
            raise PkiError("certificate signing request too large")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise PkiError("certificate signing request is not PEM") from exc
        if not csr.is_signature_valid:
            raise PkiError("certificate signing request has a bad signature")
        public_key = csr.public_key()
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            if public_key.curve.name not in ("secp256r1", "secp384r1"):
                raise PkiError(f"EC curve {public_key.curve.name} is not accepted (P-256, P-384)")
        elif isinstance(public_key, rsa.RSAPublicKey):
            if public_key.key_size < MIN_RSA_BITS:
                raise PkiError(f"RSA keys need {MIN_RSA_BITS} bits or more")
        else:
            raise PkiError("node keys must be EC P-256/P-384 or RSA")
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)])
        san = x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(f"{NODE_URI_PREFIX}{node_id}")]
        )
        return self._leaf(subject, public_key, days, ExtendedKeyUsageOID.CLIENT_AUTH, san)

    def issued(self, cert: x509.Certificate) -> bool:
        """Whether this CA signed the certificate."""
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True


@dataclass(frozen=True)
class TlsMaterial:
    """What the servers load: the server key and chain, the CA edges pin, the CA nodes chain to."""

    server_key_pem: bytes
    server_chain_pem: bytes  # leaf first, then the pinned CA, so an edge sees it on first contact
    pinned_ca: x509.Certificate
    node_ca_pem: bytes
    ca: CertificateAuthority

    @property
    def pin(self) -> str:
        return cert_pin(self.pinned_ca)

    @property
    def fingerprint(self) -> str:
        return cert_sha256_hex(self.pinned_ca)


def _load_given(settings: CloudSettings) -> tuple[bytes, list[x509.Certificate], x509.Certificate]:
    cert_file, key_file, ca_file = (
        settings.tls_cert_file,
        settings.tls_key_file,
        settings.tls_ca_file,
    )
    if not (cert_file and key_file and ca_file):
        raise PkiError(
            "give --tls-cert, --tls-key and --tls-ca together (or none: the cloud mints them)"
        )
    try:
        key_pem = key_file.read_bytes()
        chain = load_pem_certs(cert_file.read_bytes())
        cas = load_pem_certs(ca_file.read_bytes())
    except OSError as exc:
        raise PkiError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    except ValueError as exc:
        raise PkiError(f"a TLS file is not PEM: {exc}") from exc
    key = serialization.load_pem_private_key(key_pem, password=None)
    if chain[0].public_key() != key.public_key():
        raise PkiError(f"{cert_file} does not belong to {key_file}")
    return key_pem, chain, cas[0]


def load_tls(settings: CloudSettings) -> TlsMaterial:
    """The TLS material for this start: given files, or the minted CA and server certificate."""
    tls_dir = settings.data_dir / "tls"
    ca = CertificateAuthority.load_or_create(tls_dir)
    if settings.tls_cert_file or settings.tls_key_file or settings.tls_ca_file:
        key_pem, chain, pinned = _load_given(settings)
        if all(c != pinned for c in chain):
            chain = [*chain, pinned]  # edges find the pinned CA in the handshake
        return TlsMaterial(key_pem, b"".join(_cert_pem(c) for c in chain), pinned, ca.cert_pem, ca)
    names = [*settings.tls_hostnames, *default_hostnames()]
    key_path, cert_path = tls_dir / SERVER_KEY, tls_dir / SERVER_CERT
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes()) if cert_path.exists() else None
    renew = (
        cert is None
        or not key_path.exists()
        or not ca.issued(cert)
        or cert.not_valid_after_utc - _now() < dt.timedelta(days=RENEW_BEFORE_DAYS)
        or not set(settings.tls_hostnames) <= _san_names(cert)
    )
    if renew:
        key_pem, cert = ca.issue_server(names)
        write_private(key_path, key_pem)
        cert_path.write_bytes(_cert_pem(cert))
        log.info(
            "issued the server certificate", names=names, not_after=str(cert.not_valid_after_utc)
        )
    assert cert is not None
    return TlsMaterial(
        key_path.read_bytes(), _cert_pem(cert) + ca.cert_pem, ca.cert, ca.cert_pem, ca
    )
