"""The cloud CA: minted once and kept, server certificates renewed for new names, given files,
and the CSRs it refuses to sign; the token format both sides share."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.x509.oid import NameOID

from fieldline.cloud.pki import CertificateAuthority, PkiError, load_tls
from fieldline.edge.control.identity import PinError, new_key_and_csr, pinned_ca
from fieldline.shared.config import CloudSettings
from fieldline.shared.tls import EnrollmentToken, TokenFormatError, cert_pin, parse_token


def _csr(key) -> bytes:  # type: ignore[no-untyped-def]
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    algo = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, algo)
    return csr.public_bytes(serialization.Encoding.PEM)


def test_ca_is_minted_once_and_server_cert_follows_hostnames(tmp_path: Path) -> None:
    s = CloudSettings(data_dir=tmp_path, tls=True)
    first = load_tls(s)
    again = load_tls(s)
    assert again.pin == first.pin and again.server_chain_pem == first.server_chain_pem
    assert (tmp_path / "tls" / "ca.key").stat().st_mode & 0o777 == 0o600
    more = load_tls(CloudSettings(data_dir=tmp_path, tls=True, tls_hostnames=["cloud.example"]))
    assert more.pin == first.pin  # same CA: enrolled edges keep working
    leaf = x509.load_pem_x509_certificates(more.server_chain_pem)[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "cloud.example" in san.get_values_for_type(x509.DNSName)
    chain = x509.load_pem_x509_certificates(more.server_chain_pem)
    assert pinned_ca(chain, more.pin) == more.pinned_ca


def test_given_certificate_files(tmp_path: Path) -> None:
    corp = CertificateAuthority.load_or_create(tmp_path / "corp")
    key_pem, cert = corp.issue_server(["cloud.example"])
    (tmp_path / "s.key").write_bytes(key_pem)
    (tmp_path / "s.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    s = CloudSettings(
        data_dir=tmp_path / "data",
        tls=True,
        tls_cert_file=tmp_path / "s.crt",
        tls_key_file=tmp_path / "s.key",
        tls_ca_file=tmp_path / "corp" / "ca.crt",
    )
    tls = load_tls(s)
    assert tls.pin == cert_pin(corp.cert)
    chain = x509.load_pem_x509_certificates(tls.server_chain_pem)
    assert chain[-1] == corp.cert  # appended so edges can pin it on first contact
    assert tls.ca.cert != corp.cert  # node certificates still come from the cloud's own CA
    with pytest.raises(PkiError, match="together"):
        load_tls(
            CloudSettings(data_dir=tmp_path / "d2", tls=True, tls_cert_file=tmp_path / "s.crt")
        )


@pytest.mark.parametrize(
    ("csr", "says"),
    [
        (b"not a csr", "not PEM"),
        (_csr(ed25519.Ed25519PrivateKey.generate()), "EC P-256/P-384 or RSA"),
        (_csr(rsa.generate_private_key(public_exponent=65537, key_size=1024)), "2048"),
        (b"x" * 20_000, "too large"),
    ],
)
def test_ca_refuses_bad_csrs(tmp_path: Path, csr: bytes, says: str) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path)
    with pytest.raises(PkiError, match=says):
        ca.issue_node(csr, "node_x", days=1)


def test_node_certificate_names_the_node_whatever_the_csr_says(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path)
    _, csr = new_key_and_csr("admin")
    cert = ca.issue_node(csr, "node_1", days=1)
    assert cert.subject.rfc4514_string() == "CN=node_1"
    assert ca.issued(cert)


def test_token_format_round_trips_and_refuses_garbage() -> None:
    plain = parse_token("flt_" + "a" * 43)
    assert plain == EnrollmentToken("flt_" + "a" * 43)
    pinned = EnrollmentToken("flt_" + "b" * 43, "c" * 43, 7444)
    assert parse_token(str(pinned)) == pinned
    for bad in ["", "flk_" + "a" * 43, "flt_" + "a" * 43 + ".x.1", str(pinned) + ".9", "flt_a.b"]:
        with pytest.raises(TokenFormatError):
            parse_token(bad)
    with pytest.raises(TokenFormatError, match="outside"):
        parse_token(f"flt_{'a' * 43}.{'c' * 43}.70000")


def test_pin_must_name_a_ca(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path)
    _, leaf = ca.issue_server(["x"])
    with pytest.raises(PinError, match="not a CA"):
        pinned_ca([leaf, ca.cert], cert_pin(leaf))
    with pytest.raises(PinError, match="no certificate matching"):
        pinned_ca([leaf], cert_pin(ca.cert))
