"""The coordinator's keys: a CA for node certificates, a TLS server key, a bundle-signing key.

``offsite coordinator init`` creates them in ``<state>/pki`` (private keys 0600, written
atomically). Node certificates are issued from CSRs: the node's private key never leaves it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from offsite.errors import OffsiteError
from offsite.files import write_private

NODE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class PkiError(OffsiteError):
    exit_code = 5


@dataclass(frozen=True)
class Pki:
    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    @property
    def signing_key(self) -> Path:
        return self.folder / "signing.key"

    def exists(self) -> bool:
        return self.ca_cert.is_file() and self.ca_key.is_file()


def _key_pem(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def init_pki(folder: Path, hosts: list[str], days: int = 3650) -> Pki:
    """Create the CA, the server certificate for ``hosts`` and the signing key (refuses to
    overwrite an existing CA: that would orphan every enrolled node)."""
    pki = Pki(Path(folder))
    if pki.exists():
        raise PkiError(f"{pki.folder} already holds a coordinator CA; refusing to replace it")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Offsite coordinator CA")])
    now = _now()
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(["localhost", "127.0.0.1", *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "localhost")])
        )
        .issuer_name(name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write_private(pki.ca_key, _key_pem(ca_key))
    write_private(pki.server_key, _key_pem(server_key))
    write_private(pki.signing_key, _key_pem(Ed25519PrivateKey.generate()))
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    # the server presents its chain (leaf + CA) so a joining node can pin the CA by fingerprint
    pki.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM) + ca_pem)
    pki.ca_cert.write_bytes(ca_pem)
    return pki


def issue_certificate(pki: Pki, csr_pem: bytes, node_name: str, days: int = 365) -> bytes:
    """A client certificate for ``node_name`` from its CSR (the CSR's signature is checked)."""
    if not NODE_NAME.match(node_name):
        raise PkiError(f"node name {node_name!r} must match {NODE_NAME.pattern}")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as err:
        raise PkiError(f"the certificate request is not a PEM CSR: {err}") from err
    if not csr.is_signature_valid:
        raise PkiError("the certificate request's signature does not verify")
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_name)]))
        .issuer_name(ca.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def signing_key(pki: Pki) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pki.signing_key.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise PkiError(f"{pki.signing_key} is not an Ed25519 key")
    return key


def signing_public_key(pki: Pki) -> bytes:
    return (
        signing_key(pki)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
