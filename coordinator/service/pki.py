"""The coordinator's keys: a CA for node certificates, a TLS server key, a bundle-signing key
and an app-signing key.

``offsite coordinator init`` creates them in ``<state>/pki`` (private keys 0600, written
atomically). Node certificates are issued from CSRs: the node's private key never leaves it.
The two Ed25519 keys are kept apart on purpose: one signs bundle manifests (data the node
loads), the other signs the Flower app (code the node runs); nodes pin both at enrollment.
This module is the policy (which files, which names, what is issued to whom); the mechanics of
keys and certificates are ``offsite.crypto``'s.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from offsite.crypto import (
    CertificateRequest,
    CryptoError,
    SigningKey,
    generate_ec_key,
    generate_signing_key,
    issue_client_certificate,
    issue_server_certificate,
    load_certificate_request,
    load_private_key,
    load_signing_key,
    openssh_public_key,
    raw_public_key,
    self_signed_ca,
    write_private_key,
)
from offsite.errors import ExitCode, OffsiteError

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


def init_pki(folder: Path, hosts: list[str], days: int = 3650) -> Pki:
    """Create the CA, the server certificate for ``hosts`` and the signing key (refuses to
    overwrite an existing CA: that would orphan every enrolled node)."""
    pki = Pki(Path(folder))
    if pki.exists():
        raise PkiError(f"{pki.folder} already holds a coordinator CA; refusing to replace it")
    ca_key = generate_ec_key("secp256r1")
    ca_pem = self_signed_ca(ca_key, "Offsite coordinator CA", days)
    server_key = generate_ec_key("secp256r1")
    server_pem = issue_server_certificate(
        ca_key,
        ca_pem,
        server_key,
        hosts[0] if hosts else "localhost",
        list(dict.fromkeys(["localhost", "127.0.0.1", *hosts])),
        days,
    )
    write_private_key(pki.ca_key, ca_key)
    write_private_key(pki.server_key, server_key)
    write_private_key(pki.signing_key, generate_signing_key())
    write_private_key(pki.app_signing_key, generate_signing_key())
    # the server presents its chain (leaf + CA) so a joining node can pin the CA by fingerprint
    pki.server_cert.write_bytes(server_pem + ca_pem)
    pki.ca_cert.write_bytes(ca_pem)
    return pki


def check_csr(csr_pem: bytes, node_name: str) -> CertificateRequest:
    """The node's CSR, checked (name, PEM, self-signature, key type) without signing anything."""
    if not NODE_NAME.fullmatch(node_name):
        raise PkiError(f"node name {node_name!r} must match {NODE_NAME.pattern}")
    try:
        return load_certificate_request(csr_pem)
    except CryptoError as err:
        raise PkiError(str(err)) from err


def issue_certificate(pki: Pki, csr_pem: bytes, node_name: str, days: int = 365) -> bytes:
    """A client certificate for ``node_name`` from its CSR (the CSR is checked first)."""
    csr = check_csr(csr_pem, node_name)
    ca_key = load_private_key(pki.ca_key.read_bytes())
    return issue_client_certificate(ca_key, pki.ca_cert.read_bytes(), csr, node_name, days)


def _ed25519(path: Path) -> SigningKey:
    try:
        return load_signing_key(path.read_bytes())
    except CryptoError:
        raise PkiError(f"{path} is not an Ed25519 key") from None


def signing_key(pki: Pki) -> SigningKey:
    return _ed25519(pki.signing_key)


def app_signing_key(pki: Pki) -> SigningKey:
    """The key that signs the Flower app; made on first use for state folders that predate it
    (nodes enrolled before then must join again to pin it)."""
    if not pki.app_signing_key.is_file():
        write_private_key(pki.app_signing_key, generate_signing_key())
    return _ed25519(pki.app_signing_key)


@dataclass(frozen=True)
class AppSigner:
    """The app-signing public key as nodes pin it: OpenSSH text and its Flower entity id."""

    public_key: str  # "ssh-ed25519 AAAA…"
    key_id: str  # "fpk_<uuid>", derived from the key so every node names it alike


def app_signer(pki: Pki) -> AppSigner:
    key = app_signing_key(pki)
    raw, openssh = raw_public_key(key), openssh_public_key(key).decode()
    return AppSigner(openssh, f"fpk_{uuid.UUID(bytes=hashlib.sha256(raw).digest()[:16])}")


def signing_public_key(pki: Pki) -> bytes:
    return raw_public_key(signing_key(pki))
