"""X.509: the CA, server and client certificates, certificate requests and fingerprints.

Decisions:
- Every certificate is valid from five minutes ago (clock skew between coordinator and nodes)
  for ``days`` days, has a random serial and is signed with SHA-256.
- The CA may sign end-entity certificates only (``path_length=0``, key usage cert + CRL sign).
- A certificate request is accepted only with a valid self-signature and an ECDSA key of 256
  bits or more, or an RSA key of 2048 bits or more.
- Certificates and requests cross this package's boundary as PEM bytes; a checked request is
  handed back as ``CertificateRequest`` so it is parsed and checked once.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from offsite.crypto.errors import CryptoError
from offsite.crypto.keys import EcPrivateKey, PrivateKey

CertificateRequest: TypeAlias = x509.CertificateSigningRequest
"""A parsed certificate request whose signature and key strength were checked."""

_SKEW = dt.timedelta(minutes=5)


def fingerprint(cert_pem: bytes) -> str:
    """sha256 of a PEM certificate's DER encoding (what ``--ca-fingerprint`` pins)."""
    return x509.load_pem_x509_certificate(cert_pem).fingerprint(hashes.SHA256()).hex()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: CertificatePublicKeyTypes, days: int
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
    )


def self_signed_ca(key: EcPrivateKey, common_name: str, days: int) -> bytes:
    """A self-signed CA certificate (PEM) for ``key`` that may sign end-entity certificates."""
    name = _name(common_name)
    certificate = (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def issue_server_certificate(
    ca_key: PrivateKey,
    ca_pem: bytes,
    key: EcPrivateKey,
    common_name: str,
    hosts: Sequence[str],
    days: int,
) -> bytes:
    """A TLS server certificate (PEM) for ``key``'s public half, naming ``hosts`` (IP addresses
    as IP names, anything else as DNS names), signed by the CA."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    ca = x509.load_pem_x509_certificate(ca_pem)
    certificate = (
        _builder(_name(common_name), ca.subject, key.public_key(), days)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def load_certificate_request(csr_pem: bytes) -> CertificateRequest:
    """A PEM certificate request whose self-signature verifies and whose key is strong enough;
    ``CryptoError`` saying which check failed otherwise."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as err:
        raise CryptoError(f"the certificate request is not a PEM CSR: {err}") from err
    if not csr.is_signature_valid:
        raise CryptoError("the certificate request's signature does not verify")
    key = csr.public_key()
    strong = (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size >= 256) or (
        isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048
    )
    if not strong:
        raise CryptoError(
            "the certificate request's key must be ECDSA (P-256 or larger) or RSA-2048+"
        )
    return csr


def certificate_request(key: EcPrivateKey, common_name: str) -> bytes:
    """A PEM certificate request for ``key`` with subject ``CN=common_name``."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(common_name))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def issue_client_certificate(
    ca_key: PrivateKey, ca_pem: bytes, csr: CertificateRequest, common_name: str, days: int
) -> bytes:
    """A TLS client certificate (PEM, ``CN=common_name``, not a CA) for the checked request's
    key, signed by the CA."""
    ca = x509.load_pem_x509_certificate(ca_pem)
    certificate = (
        _builder(_name(common_name), ca.subject, csr.public_key(), days)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def is_ca(cert_pem: bytes) -> bool:
    """Whether the certificate carries BasicConstraints with ``ca=True``."""
    certificate = x509.load_pem_x509_certificate(cert_pem)
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return constraints.ca


def verify_issued_by(cert_pem: bytes, ca_pem: bytes) -> None:
    """``CryptoError`` unless ``ca_pem``'s key signed ``cert_pem`` and names match."""
    certificate = x509.load_pem_x509_certificate(cert_pem)
    ca = x509.load_pem_x509_certificate(ca_pem)
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise CryptoError(f"the certificate was not issued by the given CA ({err!r})") from err
