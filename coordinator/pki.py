"""The coordinator's keys: a CA for node certificates, a TLS server key, a bundle-signing key
and an app-signing key.

``offsite coordinator init`` creates them in ``<state>/pki`` (private keys 0600, written
atomically). Node certificates are issued from CSRs: the node's private key never leaves it.
The two Ed25519 keys are kept apart on purpose: one signs bundle manifests (data the node
loads), the other signs the Flower app (code the node runs); nodes pin both at enrollment.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from offsite.errors import ExitCode, OffsiteError
from offsite.files import write_private

NODE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")  # whole name: fullmatch, never match


class PkiError(OffsiteError):
    exit_code = ExitCode.ENROLLMENT


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

    @property
    def app_signing_key(self) -> Path:
        return self.folder / "app-signing.key"

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
    write_private(pki.app_signing_key, _key_pem(Ed25519PrivateKey.generate()))
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    # the server presents its chain (leaf + CA) so a joining node can pin the CA by fingerprint
    pki.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM) + ca_pem)
    pki.ca_cert.write_bytes(ca_pem)
    return pki


def check_csr(csr_pem: bytes, node_name: str) -> x509.CertificateSigningRequest:
    """The node's CSR, checked (name, PEM, self-signature, key type) without signing anything."""
    if not NODE_NAME.fullmatch(node_name):
        raise PkiError(f"node name {node_name!r} must match {NODE_NAME.pattern}")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as err:
        raise PkiError(f"the certificate request is not a PEM CSR: {err}") from err
    if not csr.is_signature_valid:
        raise PkiError("the certificate request's signature does not verify")
    key = csr.public_key()
    strong = (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size >= 256) or (
        isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048
    )
    if not strong:
        raise PkiError("the certificate request's key must be ECDSA (P-256 or larger) or RSA-2048+")
    return csr


def issue_certificate(pki: Pki, csr_pem: bytes, node_name: str, days: int = 365) -> bytes:
    """A client certificate for ``node_name`` from its CSR (the CSR is checked first)."""
    csr = check_csr(csr_pem, node_name)
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


def _ed25519(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise PkiError(f"{path} is not an Ed25519 key")
    return key


def signing_key(pki: Pki) -> Ed25519PrivateKey:
    return _ed25519(pki.signing_key)


def app_signing_key(pki: Pki) -> Ed25519PrivateKey:
    """The key that signs the Flower app; made on first use for state folders that predate it
    (nodes enrolled before then must join again to pin it)."""
    if not pki.app_signing_key.is_file():
        write_private(pki.app_signing_key, _key_pem(Ed25519PrivateKey.generate()))
    return _ed25519(pki.app_signing_key)


@dataclass(frozen=True)
class AppSigner:
    """The app-signing public key as nodes pin it: OpenSSH text and its Flower entity id."""

    public_key: str  # "ssh-ed25519 AAAA…"
    key_id: str  # "fpk_<uuid>", derived from the key so every node names it alike


def app_signer(pki: Pki) -> AppSigner:
    public = app_signing_key(pki).public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    openssh = public.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()
    return AppSigner(openssh, f"fpk_{uuid.UUID(bytes=hashlib.sha256(raw).digest()[:16])}")


def signing_public_key(pki: Pki) -> bytes:
    return (
        signing_key(pki)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
